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
class DiffusionConfig:
    process: str = "ddpm"  # ddpm (discrete), vp, subvp, ve, edm
    schedule: str = "linear"  # ddpm only
    num_steps: int = 1000  # ddpm only: T
    prediction: str = "eps"  # eps, x0, v (ddpm, vp), edm (edm)
    sigma_min: float | None = None  # ve/edm: None = the paper's value
    sigma_max: float | None = None
    sigma_data: float = 0.5  # edm preconditioning


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
