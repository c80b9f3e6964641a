"""Latent diffusion (Rombach et al. 2022, Sec. 3-4): any formulation trained on an autoencoder's scaled latents
z = s E(x) instead of pixels; sampling ends with the decoder. The diffusion side does not change: the denoiser
interface is the same, only the shape it works at is the latents'. A latent run keeps its frozen autoencoder in every
checkpoint (autoencoder.safetensors, its config and scale factor in config.json), so a checkpoint stands alone."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from difflab.autoencoder.nets import AutoencoderConfig, KLAutoencoder
from difflab.errors import DifflabError

AUTOENCODER_FILE = "autoencoder.safetensors"


@dataclass(frozen=True)
class LatentConfig:
    """The frozen autoencoder of a latent run: its network settings, the latent scale factor it was trained with, and
    where it came from (the checkpoint folder and the first 10 hex digits of its weights' SHA-256, for the record)."""

    autoencoder: AutoencoderConfig
    scale_factor: float
    source: str = ""
    weights_hash: str = ""

    def __post_init__(self):
        if not (self.scale_factor > 0 and self.scale_factor < float("inf")):
            raise DifflabError(f"latent.scale_factor must be a positive number, got {self.scale_factor}")

    def latent_shape(self, image_shape: tuple[int, ...]) -> tuple[int, int, int]:
        """(C_latent, H / f, W / f) of images (C, H, W)."""
        f = self.autoencoder.factor
        return (self.autoencoder.latent_channels, image_shape[-2] // f, image_shape[-1] // f)


def latent_config_of(path: str | Path, device: torch.device | str = "cpu") -> tuple[LatentConfig, KLAutoencoder]:
    """A trained autoencoder (`difflab train-autoencoder` folder, checkpoint or weights file) and the LatentConfig that
    records it."""
    from difflab.autoencoder.training import load_autoencoder
    from difflab.training.checkpoint import resolve_checkpoint

    model = load_autoencoder(path, device)
    ckpt = resolve_checkpoint(path)
    weights = Path(path) if Path(path).is_file() else ckpt / "ema.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:10]
    config = LatentConfig(model.config, float(model.scale_factor), str(ckpt.resolve()), digest)
    return config, model


def check_latent_images(latent: LatentConfig, image_shape: tuple[int, ...]) -> None:
    """Images the autoencoder can encode: its channel count, sizes divisible by its factor."""
    ae = latent.autoencoder
    if len(image_shape) != 3:
        raise DifflabError(f"--autoencoder is for images; this data has samples of shape {tuple(image_shape)}")
    if image_shape[0] != ae.image_channels:
        raise DifflabError(
            f"the autoencoder takes {ae.image_channels}-channel images but the data has {image_shape[0]}; train one on "
            "this data with difflab train-autoencoder"
        )
    if image_shape[-1] % ae.factor or image_shape[-2] % ae.factor:
        raise DifflabError(f"images of {image_shape[-2]}x{image_shape[-1]} do not divide by the autoencoder's factor "
                           f"{ae.factor}; use a --resolution that does")  # fmt: skip


_ENCODED: dict[tuple, torch.Tensor] = {}  # the last data set encoded: run_config and train in one process share it


@torch.no_grad()
def encode_images(autoencoder: KLAutoencoder, images: torch.Tensor, key: tuple | None = None,
                  batch: int = 256) -> torch.Tensor:  # fmt: skip
    """Scaled latents (N, C, h, w) on the CPU of images (N, C, H, W): the posterior means times the scale factor
    (deterministic; latent diffusion draws from the posterior instead, which with its KL weight of 1e-6 is nearly the
    mean). With `key`, the result is kept for the next call with the same key."""
    if key is not None and key in _ENCODED:
        return _ENCODED[key]
    device = next(autoencoder.parameters()).device
    latents = torch.cat([autoencoder.encode(images[i : i + batch].to(device)).cpu()
                         for i in range(0, len(images), batch)])  # fmt: skip
    if key is not None:
        _ENCODED.clear()
        _ENCODED[key] = latents
    return latents


def latent_dataset(data, latent: LatentConfig, autoencoder: KLAutoencoder):
    """The data set with its images replaced by their latents (labels, captions and scenes kept)."""
    check_latent_images(latent, tuple(data.sample_shape))
    key = (data.name, len(data.data), tuple(data.sample_shape), latent.weights_hash, float(data.data[:64].sum()))
    return replace(data, data=encode_images(autoencoder, data.data, key))


def training_autoencoder(latent: LatentConfig, ckpt: Path | None) -> KLAutoencoder:
    """The autoencoder a latent run trains with: its checkpoint's copy when continuing (`ckpt`), else the one it
    names (`latent.source`), which must still hold the weights it recorded."""
    if ckpt is not None:
        return load_latent_autoencoder(ckpt, latent)
    config, model = latent_config_of(latent.source)
    if config.weights_hash != latent.weights_hash or config.autoencoder != latent.autoencoder:
        raise DifflabError(
            f"the autoencoder in '{latent.source}' has changed since this run was configured (weights "
            f"{config.weights_hash}, recorded {latent.weights_hash}); configure the run again"
        )
    return model


def latent_fill(fill: torch.Tensor, pipe) -> torch.Tensor:
    """The region to regenerate (B, 1, H, W), 1 = fill, at the denoiser's resolution: a latent cell is regenerated
    when any pixel it covers is (max-pooled by the factor), so no pixel to fill is held to the original."""
    if pipe.autoencoder is None:
        return fill
    return torch.nn.functional.max_pool2d(fill.float(), pipe.autoencoder.factor)


def paste_known(results: torch.Tensor, image: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Decoded fills with the known pixels (fill = 0) taken from the original image exactly: the decoder only
    approximates them."""
    return image * (1 - fill) + results * fill


def load_latent_autoencoder(ckpt: Path, latent: LatentConfig, device: torch.device | str = "cpu") -> KLAutoencoder:
    """A latent run's autoencoder from its checkpoint folder (AUTOENCODER_FILE), header checked against the config
    before anything is read."""
    from difflab.training.checkpoint import load_tensors
    from difflab.weights import check_header, meta_state

    path = Path(ckpt) / AUTOENCODER_FILE
    if not path.exists():
        raise DifflabError(f"'{ckpt}' is a latent model's checkpoint but lacks {AUTOENCODER_FILE}; it is damaged")
    check_header(path, meta_state(lambda: KLAutoencoder(latent.autoencoder), "the autoencoder"))
    model = KLAutoencoder(latent.autoencoder, scale_factor=latent.scale_factor)
    model.load_state_dict(load_tensors(path))
    return model.to(device).eval()
