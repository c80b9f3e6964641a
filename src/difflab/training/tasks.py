"""What the shared `Trainer` trains: a task holds the module whose weights are optimised, its config (saved with
every checkpoint) and its per-sample loss. A formulation's denoiser and a noise-aware classifier are both tasks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from difflab.cascade import augment_low_res
from difflab.conditioning import SIGNAL_GROUPS
from difflab.config import RunConfig
from difflab.errors import DifflabError
from difflab.formulations import make_formulation
from difflab.inpaint_model import training_inputs
from difflab.nets import build_network


class DenoiserTask:
    """Train the network F of a formulation's denoiser with the formulation's loss (Ho et al. 2020, Alg. 1;
    Karras et al. 2022, Eq. 2). Signals of `config.conditioning` are dropped to their nulls with their dropouts (a
    group such as a frozen encoder's caption, "text", as a whole); an
    upsampler's low-res input is noise-augmented (`difflab.cascade.augment_low_res`); an inpainting model gets random
    masks and masked images (`difflab.inpaint_model.training_inputs`)."""

    def __init__(self, config: RunConfig, autoencoder: torch.nn.Module | None = None):
        self.config = config
        self.autoencoder = autoencoder  # a latent model's frozen autoencoder: saved with every checkpoint
        self.formulation = make_formulation(config.formulation)
        self.denoiser = self.formulation.denoiser(build_network(config.model))
        self.module = self.denoiser.net
        if config.distill is not None:  # a student: the loss reads its teacher (difflab.distill)
            from difflab.distill.losses import distillation_loss

            self.loss_fn = distillation_loss(config, self.formulation, self.denoiser)
        else:
            self.loss_fn = self.formulation.loss(config.train.min_snr_gamma)
        # the signals the trainer hands over: a group (a frozen encoder's caption, "text") is its members
        self.signals = tuple(m for s in config.conditioning for m in SIGNAL_GROUPS.get(s.name, (s.name,)))
        self.dropout = {s.name: s.dropout for s in config.conditioning}
        self.training_network: torch.nn.Module | None = None  # the module the loss runs (DDP, compiled), if not F

    def to(self, device: torch.device) -> None:
        self.denoiser.to(device)
        if hasattr(self.loss_fn, "to"):  # a distillation loss's teacher and target network
            self.loss_fn.to(device)

    def frozen_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """Weights saved with every checkpoint but not trained: a latent model's autoencoder."""
        if self.autoencoder is None:
            return {}
        from difflab.latent import AUTOENCODER_FILE

        return {AUTOENCODER_FILE.removesuffix(".safetensors"): self.autoencoder.state_dict()}

    def loss(self, x0: torch.Tensor, cond: Any, generator: torch.Generator) -> torch.Tensor:
        """Per-sample losses (B,) of clean data x0 (B, *shape); an upsampler's augmentation, then an inpainting model's
        masks, are drawn from `generator` before the loss's own draws."""
        if self.config.upsampler is not None:
            cond = augment_low_res(cond, self.config.upsampler.noise_max, generator)
        if self.config.inpainting is not None:
            cond = training_inputs(x0, cond, self.config.inpainting, generator)
        with network_replaced(self.denoiser, self.module, self.training_network):
            return self.loss_fn(self.denoiser, x0, generator, cond)

    # A loss with its own training state (consistency training's schedule of N, iDDPM's loss history per t) has
    # begin_step / end_step / state_tensors / load_state_tensors; the trainer reaches them through the task.
    def begin_step(self, step: int) -> None:
        if hasattr(self.loss_fn, "begin_step"):
            self.loss_fn.begin_step(step, self.config.train.steps)

    def end_step(self, step: int) -> None:
        if hasattr(self.loss_fn, "end_step"):
            self.loss_fn.end_step(self.denoiser)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self.loss_fn.state_tensors() if hasattr(self.loss_fn, "state_tensors") else {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.loss_fn.load_state_tensors(tensors)

    def check_resume(self, ckpt: Path) -> None:
        """Refuse to continue a checkpoint of another model, formulation or conditioning."""
        from difflab.training.checkpoint import load_config

        saved = load_config(ckpt)
        same = (saved.model, saved.formulation, saved.conditioning, saved.upsampler, saved.inpainting, saved.latent,
                saved.unclip, saved.distill)  # fmt: skip
        config = self.config
        if same != (config.model, config.formulation, config.conditioning, config.upsampler, config.inpainting,
                    config.latent, config.unclip, config.distill):  # fmt: skip
            raise DifflabError(f"'{ckpt}' was trained with another model or formulation config; use a new --out")


@contextlib.contextmanager
def network_replaced(root: torch.nn.Module, net: torch.nn.Module, replacement: torch.nn.Module | None) -> Iterator:
    """Within: the submodule `net` of `root` is `replacement` (DistributedDataParallel or torch.compile around it), so
    that the loss's forward passes go through it; outside, `root` holds `net` itself (EMA, targets, checkpoints)."""
    if replacement is None:
        yield
        return
    owner, name = next((m, n) for m in root.modules() for n, child in m.named_children() if child is net)
    setattr(owner, name, replacement)
    try:
        yield
    finally:
        setattr(owner, name, net)
