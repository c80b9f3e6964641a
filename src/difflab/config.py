"""Run configuration: frozen dataclasses saved as config.json beside every checkpoint, enough to rebuild it."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from difflab.nets.mlp import MLPConfig
from difflab.nets.unet import UNetConfig

CONFIG_VERSION = 1


@dataclass(frozen=True)
class DataConfig:
    name: str  # a built-in name or an image-folder path
    kind: str  # "points" or "images"
    sample_shape: tuple[int, ...]
    resolution: int | None = None
    channels: int = 1


@dataclass(frozen=True)
class PFGMConfig:
    """Original PFGM hyper-parameters (Xu et al. 2022, App. B); `difflab.pfgm.pfgm_config_for` derives M, z_max and
    upper_norm from the data dimension and norm."""

    m_max: int = 291  # M: training perturbations scale by (1 + tau)^m, m ~ U[0, M]
    z_max: float = 40.0  # the hemisphere the prior lives on; sampling starts at z = z_max
    upper_norm: float = 3000.0  # the prior's radius bound
    sigma_end: float = 0.01  # the smallest perturbation (std of the Gaussian seed of each perturbation)
    tau: float = 0.03
    z_min: float = 1e-3  # sampling ends at z = z_min
    gamma: float = 5.0  # the field is normalised as sqrt(N) E / (||E|| + gamma)
    z_exp: float = 1.0  # below this z, E_z is taken from the normalisation instead of the network (App. B.2)
    restrict_m: bool = True  # perturbations with small z get m ~ U[0, 0.7 M] (App. B.1.1)
    small_batch: int = 128  # points perturbed per step; the whole training batch is the field's charges


@dataclass(frozen=True)
class DiffusionConfig:
    process: str = "ddpm"  # ddpm (discrete), vp, subvp, ve, edm, pfgmpp, pfgm
    schedule: str = "linear"  # ddpm only
    num_steps: int = 1000  # ddpm only: T
    prediction: str = "eps"  # eps, x0, v (ddpm, vp), edm (edm, pfgmpp), field (pfgm)
    sigma_min: float | None = None  # ve/edm: None = the paper's value
    sigma_max: float | None = None
    sigma_data: float = 0.5  # edm/pfgmpp preconditioning
    aug_dim: int | None = None  # pfgmpp: the number D of extra dimensions of the Poisson kernel
    pfgm: PFGMConfig | None = None  # pfgm: the original Poisson flow's hyper-parameters


@dataclass(frozen=True)
class ModelConfig:
    kind: str  # "unet" or "mlp"
    preset: str = "custom"
    unet: UNetConfig | None = None
    mlp: MLPConfig | None = None


@dataclass(frozen=True)
class TrainConfig:
    steps: int | None = 5000
    minutes: float | None = None
    batch_size: int = 128
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 200
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    min_snr_gamma: float | None = None
    label_dropout: float = 0.1  # conditional models: share of labels replaced by the null label (CFG training)
    mixed_precision: str = "no"
    seed: int = 0
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    log_every: int = 25


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig
    model: ModelConfig
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    version: int = CONFIG_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        return _from_dict(cls, json.loads(text))

    def save(self, path: Path) -> None:
        Path(path).write_text(self.to_json())


def _from_dict(cls: type, values: dict[str, Any]) -> Any:
    """Rebuild a (nested) frozen dataclass from its asdict() form; unknown keys are an error."""
    if not isinstance(values, dict):
        raise ValueError(f"expected an object for {cls.__name__}, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {', '.join(sorted(unknown))}")
    return cls(**{k: _convert(hints[k], v) for k, v in values.items()})


def _convert(hint: Any, value: Any) -> Any:
    if value is None:
        return None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value) if len(inner) == 1 else value
    if dataclasses.is_dataclass(hint):
        return _from_dict(hint, value)
    if origin is tuple:
        return tuple(value)
    return value
