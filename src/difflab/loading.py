"""`difflab.load(path)`: a run folder, checkpoint, weights file or diffusers folder -> a `Pipeline`, with every file
checked before anything is built."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from difflab.errors import DifflabError
from difflab.formulations import make_formulation
from difflab.nets import build_network
from difflab.training.checkpoint import checkpoint_step, load_config, load_tensors, resolve_checkpoint

if TYPE_CHECKING:
    from difflab.pipeline import Pipeline


def load(path: str | Path, *, use_ema: bool = True, device: str | torch.device = "cpu") -> Pipeline:
    """The pipeline of a run folder, a checkpoint folder (EMA weights by default) or one of its .safetensors weights
    files (that file), on `device`. Weights are only read with safetensors; version 1 configs are migrated.

    Nothing is allocated before the weights file is checked (`difflab.weights`): a regular file whose header's tensor
    names, shapes and floating-point dtypes match the network config.json describes; then its values must be finite.
    Any failure is a one-line DifflabError naming the file and the tensor."""
    from difflab.weights import check_header, meta_state

    if (Path(path) / "model_index.json").is_file():  # a diffusers pipeline folder (difflab[diffusers])
        from difflab.interop.diffusers_folder import load_diffusers

        return load_diffusers(path, device=device)
    ckpt = resolve_checkpoint(path)
    config = load_config(ckpt)
    if Path(path).is_file():  # a weights file named on purpose is the one loaded
        weights = Path(path)
    else:
        ema = ckpt / "ema.safetensors"  # present but broken (a directory, a dangling link) is refused, not skipped
        weights = ema if use_ema and (ema.exists() or ema.is_symlink()) else ckpt / "model.safetensors"
    check_header(weights, meta_state(lambda: build_network(config.model)))
    tensors = load_tensors(weights)
    net = build_network(config.model)
    try:
        net.load_state_dict(tensors)
    except RuntimeError as err:
        raise DifflabError(f"'{weights}' does not match its config.json ({str(err).splitlines()[0]})") from None
    formulation = make_formulation(config.formulation)
    denoiser = formulation.denoiser(net).to(device)
    autoencoder = None
    if config.latent is not None:
        from difflab.latent import load_latent_autoencoder

        autoencoder = load_latent_autoencoder(ckpt, config.latent, device)
    from difflab.pipeline import Pipeline

    return Pipeline(config, denoiser, checkpoint=ckpt, step=checkpoint_step(ckpt), weights=weights,
                    autoencoder=autoencoder)  # fmt: skip
