"""Training hooks run after each step: sample previews from the EMA weights and TensorBoard scalars. They use their own
generators, so they do not disturb exact resume."""

from __future__ import annotations

import copy
from pathlib import Path

from difflab.config import RunConfig
from difflab.errors import DifflabError
from difflab.training.trainer import Trainer


def add_hooks(trainer: Trainer, config: RunConfig, out: Path) -> None:
    if config.train.preview_every:
        trainer.hooks.append(PreviewHook(config, out / "previews", config.train.preview_every))
    if config.train.tensorboard:
        trainer.hooks.append(TensorBoardHook(out / "tensorboard", config.train.log_every))


class PreviewHook:
    """Every `every` steps, a grid of samples from the EMA weights (16 fixed seeds, the formulation's default
    sampler settings: 25 deterministic ddim steps) in folder/step_N.png, as diffusers' and
    k-diffusion's training scripts do. Uses its own seeded generators: training's RNG streams are untouched."""

    def __init__(self, config: RunConfig, folder: Path, every: int, n: int = 16, steps: int = 25):
        self.config, self.folder, self.every, self.n, self.steps = config, folder, every, n, steps

    def __call__(self, trainer: Trainer) -> None:
        if trainer.step % self.every:
            return
        from difflab.outputs import upscale_for
        from difflab.pipeline import Pipeline
        from difflab.viz import save_image_grid, save_scatter

        net = copy.deepcopy(trainer.module)
        net.load_state_dict(trainer.ema.state_dict())
        pipe = Pipeline(self.config, trainer.task.formulation.denoiser(net), autoencoder=trainer.task.autoencoder)
        sampler = "ddim"  # eta 0: deterministic, so it suits Poisson kernels too
        n = self.n if self.config.data.kind == "images" else 1000
        low_res = {}
        if self.config.upsampler is not None:  # upsample the first training examples' low-res images
            low = trainer.cond_data["low_res"]
            n = min(n, len(low))
            low_res = {"low_res": low[:n]}
        samples = pipe.sample(n, seed=0, sampler=sampler, steps=self.steps, **low_res)
        path = self.folder / f"step_{trainer.step:08d}.png"
        if self.config.data.kind == "images":
            save_image_grid(samples, path, metadata={"train_step": trainer.step, "sampler": sampler},
                            upscale=upscale_for(samples.shape[-1]))  # fmt: skip
        else:
            save_scatter(samples, path, title=f"step {trainer.step}: {sampler} {self.steps} steps")
        trainer.module.train()


class TensorBoardHook:
    """Loss and learning rate to TensorBoard every `every` steps (torch.utils.tensorboard; needs `tensorboard`)."""

    def __init__(self, folder: Path, every: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise DifflabError("--tensorboard needs TensorBoard: pip install 'difflab[tensorboard]'") from None
        self.writer, self.every = SummaryWriter(str(folder)), every

    def __call__(self, trainer: Trainer) -> None:
        if trainer.step % self.every == 0:
            self.writer.add_scalar("train/loss", trainer.last_loss, trainer.step)
            self.writer.add_scalar("train/lr", trainer.lr_at(trainer.step - 1), trainer.step)
            self.writer.flush()
