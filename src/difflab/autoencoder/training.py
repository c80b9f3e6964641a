"""Training the KL autoencoder with the shared `Trainer` (Rombach et al. 2022, App. G), measuring its latent scale
factor afterwards (1 / std of the latents, as Stable Diffusion's 0.18215 was found), and loading a trained one."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from difflab.autoencoder.losses import (
    AutoencoderLossConfig,
    PatchDiscriminator,
    adaptive_weight,
    generator_adversarial_loss,
    hinge_discriminator_loss,
    reconstruction_error,
)
from difflab.autoencoder.nets import AutoencoderConfig, KLAutoencoder, psnr
from difflab.config import DataConfig, TrainConfig
from difflab.errors import DifflabError
from difflab.training.checkpoint import latest_checkpoint, resolve_checkpoint
from difflab.training.trainer import Trainer

FORMAT = "difflab-autoencoder"
SCALE_IMAGES = 2048  # training images encoded to measure the latent scale factor and the reconstruction PSNR


def autoencoder_train_config(**overrides: Any) -> TrainConfig:
    """Training settings of an autoencoder: 3000 steps of batch 32, AdamW lr 1e-3 with 100 warm-up steps, EMA 0.999,
    one checkpoint every 1000 steps; keyword arguments override. (On the 32x32 shapes, width 16: L1 0.023 after 850
    steps at lr 1e-3, 0.053 after 450 and 0.055 after 500 at 5e-4.)"""
    base = TrainConfig(steps=3000, batch_size=32, lr=1e-3, warmup_steps=100, ema_decay=0.999, log_every=50)
    return dataclasses.replace(base, **overrides)


@dataclass(frozen=True)
class AutoencoderRun:
    """What an autoencoder folder's config.json holds: the data it was trained on, the network, the loss, the
    training settings."""

    data: DataConfig
    autoencoder: AutoencoderConfig
    loss: AutoencoderLossConfig = dataclasses.field(default_factory=AutoencoderLossConfig)
    train: TrainConfig = dataclasses.field(default_factory=autoencoder_train_config)

    def to_json(self) -> str:
        values = {"format": FORMAT, "version": 1} | {
            f.name: dataclasses.asdict(getattr(self, f.name)) for f in dataclasses.fields(self)
        }
        return json.dumps(values, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> AutoencoderRun:
        """Strict like RunConfig: unknown or missing keys and wrong types are a ValueError naming the key."""
        from difflab.config import check_keys, dataclass_from_dict

        values = json.loads(text)
        if not isinstance(values, dict) or values.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} config")
        if values.get("version") != 1:
            raise ValueError(f"autoencoder config version {values.get('version')!r} is not 1")
        check_keys(values, "autoencoder run", {"format", "version", "data", "autoencoder", "loss", "train"},
                   required=("data", "autoencoder", "loss", "train"))  # fmt: skip
        return cls(
            dataclass_from_dict(DataConfig, values["data"], "data"),
            dataclass_from_dict(AutoencoderConfig, values["autoencoder"], "autoencoder"),
            dataclass_from_dict(AutoencoderLossConfig, values["loss"], "loss"),
            dataclass_from_dict(TrainConfig, values["train"], "train"),
        )


def training_module(run: AutoencoderRun) -> nn.ModuleDict:
    """What is trained and saved: {"autoencoder", "discriminator" (when disc_weight > 0)}."""
    parts: dict[str, nn.Module] = {"autoencoder": KLAutoencoder(run.autoencoder)}
    if run.loss.disc_weight > 0:
        loss = run.loss
        parts["discriminator"] = PatchDiscriminator(run.autoencoder.image_channels, loss.disc_width, loss.disc_layers)
    return nn.ModuleDict(parts)


class AutoencoderTask:
    """The Trainer's view of the autoencoder and its discriminator (one module, one optimiser): per-sample loss
    rec + kl_weight KL / n (n = values per image; latent diffusion's summed losses divided by n), and from
    `disc_start` on, the discriminator's hinge loss plus the autoencoder's adaptive-weighted adversarial loss."""

    signals: tuple[str, ...] = ()
    dropout: dict[str, float] = {}

    def __init__(self, run: AutoencoderRun):
        self.config = run
        torch.manual_seed(run.train.seed)
        self.module = training_module(run)
        self.autoencoder: KLAutoencoder = self.module["autoencoder"]
        self.step = 0  # the trainer's step, kept current by a hook: the discriminator starts at loss.disc_start
        self.log_values: dict[str, float] = {}  # the last step's loss parts, for the training log

    def to(self, device: torch.device) -> None:
        self.module.to(device)

    def loss(self, x0: torch.Tensor, cond: Any, generator: torch.Generator) -> torch.Tensor:
        settings = self.config.loss
        posterior = self.autoencoder.posterior(x0)
        reconstruction = self.autoencoder.decoder(posterior.sample(generator))
        rec = reconstruction_error(x0, reconstruction, settings.reconstruction)
        kl = posterior.kl()
        total = rec + settings.kl_weight * kl / x0[0].numel()
        self.log_values = {"reconstruction": float(rec.detach().mean()), "kl": float(kl.detach().mean())}
        if "discriminator" not in self.module or self.step < settings.disc_start:
            return total
        disc = self.module["discriminator"]
        gan = generator_adversarial_loss(disc, reconstruction)
        last_layer = self.autoencoder.decoder.out[-1].weight
        weight = settings.disc_weight * adaptive_weight(rec.mean(), gan.mean(), last_layer)
        d_loss = hinge_discriminator_loss(disc(x0), disc(reconstruction.detach()))
        self.log_values |= {"generator": float(gan.detach().mean()), "gan_weight": float(weight),
                            "discriminator": float(d_loss.detach().mean())}  # fmt: skip
        return total + weight * gan + d_loss

    def check_resume(self, ckpt: Path) -> None:
        saved = read_run(ckpt)
        if (saved.data, saved.autoencoder, saved.loss) != (self.config.data, self.config.autoencoder, self.config.loss):
            raise DifflabError(f"'{ckpt}' was trained with other data, network or loss settings; use a new --out")


@dataclass
class AutoencoderResult:
    checkpoint: Path
    step: int
    stopped_by: str  # "steps", "minutes" or "signal"
    scale_factor: float | None  # None when a stop signal ended training before it was measured
    psnr_db: float | None
    signal: str | None = None


@torch.no_grad()
def measure_latents(autoencoder: KLAutoencoder, images: torch.Tensor, batch: int = 256) -> tuple[float, float]:
    """(scale factor, PSNR in dB): 1 / std of the posterior means of `images` (all elements together), and the PSNR
    of their reconstructions from those means."""
    device = next(autoencoder.parameters()).device
    latents, errors = [], []
    for i in range(0, len(images), batch):
        x = images[i : i + batch].to(device)
        mean = autoencoder.posterior(x).mean
        latents.append(mean.cpu())
        errors.append((x - autoencoder.decoder(mean).clamp(-1, 1)).square().flatten(1).mean(1).cpu())
    std = float(torch.cat(latents).std())
    mse = float(torch.cat(errors).mean())
    return 1.0 / max(std, 1e-8), (math.inf if mse == 0 else 10 * math.log10(4.0 / mse))


def train_autoencoder(
    run: AutoencoderRun,
    images: torch.Tensor,
    out: str | Path,
    *,
    device: torch.device | str = "cpu",
    resume: bool = False,
    progress: bool = False,
) -> AutoencoderResult:
    """Train `run`'s autoencoder on images (N, C, H, W) in [-1, 1] into `out`; then measure the latent scale factor
    and reconstruction PSNR on the first SCALE_IMAGES images with the EMA weights and save them with the final
    checkpoint (training_state.json: scale_factor, psnr_db)."""
    task = AutoencoderTask(run)
    trainer = Trainer(task, images, Path(out), torch.device(device))
    if resume:
        trainer.resume()
    task.step = trainer.step
    trainer.hooks.append(lambda t: setattr(task, "step", t.step))
    result = trainer.run(progress=progress)
    if result.stopped_by == "signal":
        return AutoencoderResult(latest_checkpoint(out), result.step, "signal", None, None, result.signal)
    final = KLAutoencoder(run.autoencoder).to(device)
    final.load_state_dict(_autoencoder_weights(trainer.ema.state_dict()))
    final.eval()
    scale, quality = measure_latents(final, images[:SCALE_IMAGES])
    trainer.extra_state = {"stopped_by": result.stopped_by, "scale_factor": scale, "psnr_db": quality}
    ckpt = trainer.save()  # the same step again, now with the scale factor
    return AutoencoderResult(ckpt, result.step, result.stopped_by, scale, quality)


def _autoencoder_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    prefix = "autoencoder."
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


def read_run(ckpt: Path) -> AutoencoderRun:
    """The AutoencoderRun of a checkpoint folder; anything else is a one-line error."""
    from difflab.weights import read_config_text

    path = Path(ckpt) / "config.json"
    try:
        return AutoencoderRun.from_json(read_config_text(path))
    except (ValueError, TypeError, KeyError) as err:
        raise DifflabError(
            f"'{path}' is not a difflab autoencoder ({err}); train one with `difflab train-autoencoder`"
        ) from None


def is_autoencoder_config(text: str) -> bool:
    try:
        return json.loads(text).get("format") == FORMAT
    except (ValueError, AttributeError):
        return False


def load_autoencoder(path: str | Path, device: torch.device | str = "cpu", *, use_ema: bool = True) -> KLAutoencoder:
    """The autoencoder of a `difflab train-autoencoder` folder (or checkpoint, or weights file), EMA weights by
    default, in eval mode with its measured scale factor. The weights file's header is checked against the config
    before anything is read; a checkpoint saved before the scale factor was measured is refused."""
    from difflab.training.checkpoint import load_tensors
    from difflab.weights import check_header, meta_state

    hint = f"train one with `difflab train-autoencoder --data NAME --out {path}`"
    given = Path(path)
    ckpt = resolve_checkpoint(path, hint)
    run = read_run(ckpt)
    weights = given if given.is_file() else ckpt / ("ema.safetensors" if use_ema else "model.safetensors")
    check_header(weights, meta_state(lambda: training_module(run), "the autoencoder"))
    state = json.loads((ckpt / "training_state.json").read_text())
    if not isinstance(state.get("scale_factor"), float) or not math.isfinite(state["scale_factor"]):
        raise DifflabError(
            f"'{ckpt}' was saved before its latent scale factor was measured (training was stopped); continue it "
            "with `difflab train-autoencoder --resume` to finish"
        )
    model = KLAutoencoder(run.autoencoder, scale_factor=state["scale_factor"])
    model.load_state_dict(_autoencoder_weights(load_tensors(weights)))
    return model.to(device).eval()


__all__ = [
    "AutoencoderResult",
    "AutoencoderRun",
    "autoencoder_train_config",
    "load_autoencoder",
    "measure_latents",
    "psnr",
    "train_autoencoder",
]
