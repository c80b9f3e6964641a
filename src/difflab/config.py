"""Run configuration: frozen dataclasses saved as config.json beside every checkpoint, enough to rebuild the run.

    RunConfig(data, model, formulation, train, conditioning, upsampler=None, inpainting=None)

`model` names a network backbone with its settings (`difflab.nets.ModelConfig`), `formulation` is the settings
dataclass of one formulation (`difflab.formulations`: DDPMConfig, EDMConfig, ...), and `conditioning` lists the
signals the model is trained on, each with its training dropout; `upsampler` (`difflab.cascade.UpsamplerConfig`, only
in the file when set) makes the run the super-resolution stage of a cascade, `inpainting`
(`difflab.inpaint_model.InpaintingConfig`, only in the file when set) GLIDE's inpainting model. Version 1 files (a
flat `diffusion` block with a `process` name) are migrated on load (`migrate_v1`).

Reading config.json is strict: a missing required key, a value of the wrong type (an integer where one is expected;
true is not an integer), an unknown key, a version newer than CONFIG_VERSION or a size outside `difflab.limits` is a
ValueError naming the key. Unknown keys are refused rather than ignored: a newer difflab that adds keys writes a newer
version, which this one refuses as a whole, so an unknown key at a known version is a typo or damage.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from difflab.cascade import UpsamplerConfig, check_upsample_from
from difflab.distill.config import DistillConfig
from difflab.errors import DifflabError
from difflab.formulations import config_from_dict, config_to_dict
from difflab.formulations.ddpm import DDPMConfig
from difflab.inpaint_model import InpaintingConfig
from difflab.latent import LatentConfig
from difflab.limits import check_limits
from difflab.nets import ModelConfig
from difflab.unclip.config import UnclipConfig

CONFIG_VERSION = 2


@dataclass(frozen=True)
class DataConfig:
    name: str  # a built-in name or an image-folder path
    kind: str  # "points" or "images"
    sample_shape: tuple[int, ...]
    resolution: int | None = None
    channels: int = 1

    def __post_init__(self):
        """An unknown data kind or sizes outside `difflab.limits` are refused before any data is read."""
        if self.kind not in ("points", "images"):
            raise DifflabError(f"data.kind must be 'points' or 'images', got {self.kind!r}")
        check_limits(self, "data")


@dataclass(frozen=True)
class SignalConfig:
    """A conditioning signal the model is trained on, and the share of rows nulled in training (for CFG)."""

    name: str  # class_label, text_tokens, text_pooled, image_embed, low_res, mask, masked_image
    dropout: float = 0.1

    def __post_init__(self):
        if not 0 <= self.dropout < 1:
            raise DifflabError(
                f"the dropout of signal '{self.name}' (--label-dropout for class labels) must lie in "
                f"[0, 1), got {self.dropout}"
            )


LR_SCHEDULES = ("constant", "cosine", "linear")


@dataclass(frozen=True)
class TrainConfig:
    steps: int | None = 5000
    minutes: float | None = None
    batch_size: int = 128
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 200
    lr_schedule: str = "constant"  # after warm-up: constant, or cosine / linear decay to 0 at the end of the budget
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    min_snr_gamma: float | None = None
    mixed_precision: str = "no"
    seed: int = 0
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    log_every: int = 25
    preview_every: int | None = None  # write a sample grid every N steps (RUN/previews/)
    tensorboard: bool = False  # also log to RUN/tensorboard through torch.utils.tensorboard
    init_from: str | None = None  # the checkpoint whose weights a fine-tuning run started from (--init-from)

    def __post_init__(self):
        """Values that make no sense are refused here, in one line, never replaced by defaults."""
        positive = {"--steps": self.steps, "--minutes": self.minutes, "--batch-size": self.batch_size,
                    "--lr": self.lr, "--checkpoint-every": self.checkpoint_every, "--log-every": self.log_every,
                    "--preview-every": self.preview_every, "--min-snr-gamma": self.min_snr_gamma,
                    "grad_clip": self.grad_clip}  # fmt: skip
        for flag, value in positive.items():
            if value is not None and not (math.isfinite(value) and value > 0):
                raise DifflabError(f"{flag} must be a positive number, got {value}")
        if not 0 <= self.ema_decay < 1:
            raise DifflabError(f"--ema-decay must lie in [0, 1), got {self.ema_decay}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise DifflabError(f"unknown --lr-schedule '{self.lr_schedule}'; choose one of {', '.join(LR_SCHEDULES)}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.keep_checkpoints < 1:
            raise DifflabError("--warmup and weight decay must be >= 0 and at least one checkpoint must be kept")
        check_limits(self, "train")


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig
    model: ModelConfig
    formulation: Any = field(default_factory=DDPMConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    conditioning: tuple[SignalConfig, ...] = ()
    version: int = CONFIG_VERSION
    upsampler: UpsamplerConfig | None = None  # the super-resolution stage of a cascade: its low-res input
    inpainting: InpaintingConfig | None = None  # GLIDE's inpainting model: its training masks
    latent: LatentConfig | None = None  # latent diffusion: the frozen autoencoder whose latents the model generates
    unclip: UnclipConfig | None = None  # unCLIP's prior or decoder: the frozen CLIP whose embeddings it reads
    distill: DistillConfig | None = None  # a distilled student: its teacher and how it samples

    def __post_init__(self):
        """The formulation's sizes (ddpm timesteps, pfgm batch) are checked against `difflab.limits`; an upsampler
        needs a network with low-res input channels and a low-res size dividing the data's resolution."""
        if dataclasses.is_dataclass(self.formulation):
            check_limits(self.formulation, "formulation")
        low_res_channels = getattr(self.model.settings, "low_res_channels", None)
        if (self.upsampler is None) != (low_res_channels is None):
            raise DifflabError("upsampler and model.settings.low_res_channels must be set together (an upsampler's "
                               "network takes its low-res image as extra channels)")  # fmt: skip
        if self.upsampler is not None:
            check_upsample_from(self.data.resolution or 0, self.upsampler.low_res)
        if self.latent is not None:
            from difflab.latent import check_latent_images

            check_latent_images(self.latent, tuple(self.data.sample_shape))
            if self.upsampler is not None:
                raise DifflabError("a latent model cannot be a cascade's upsampler: drop --upsample-from or "
                                   "--autoencoder")  # fmt: skip
        if self.unclip is not None:
            check_unclip(self)
        if (self.inpainting is None) != (getattr(self.model.settings, "inpaint_channels", None) is None):
            raise DifflabError("inpainting and model.settings.inpaint_channels must be set together (an inpainting "
                               "model takes the masked image and the mask as extra channels)")  # fmt: skip

    @property
    def model_shape(self) -> tuple[int, ...]:
        """The shape the network generates: the data's samples, or for a latent model their latents."""
        shape = tuple(self.data.sample_shape)
        return self.latent.latent_shape(shape) if self.latent is not None else shape

    @property
    def process(self) -> str:
        """The formulation's registered name (for display; code asks the formulation object, not the name)."""
        from difflab.formulations import name_of_config

        return name_of_config(self.formulation)

    def to_dict(self) -> dict[str, Any]:
        return (
            {
                "version": self.version,
                "data": dataclasses.asdict(self.data),
                "model": self.model.to_dict(),
                "formulation": config_to_dict(self.formulation),
                "train": dataclasses.asdict(self.train),
                "conditioning": [dataclasses.asdict(s) for s in self.conditioning],
            }
            | ({"upsampler": dataclasses.asdict(self.upsampler)} if self.upsampler is not None else {})
            | ({"inpainting": dataclasses.asdict(self.inpainting)} if self.inpainting is not None else {})
            | ({"latent": dataclasses.asdict(self.latent)} if self.latent is not None else {})
            | ({"unclip": dataclasses.asdict(self.unclip)} if self.unclip is not None else {})
            | ({"distill": dataclasses.asdict(self.distill)} if self.distill is not None else {})
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        """The config from its to_dict() form (version 1 files migrated); any problem is a ValueError naming the key."""
        if not isinstance(values, dict):
            raise ValueError(f"expected an object, got {_show(values)}")
        version = values.get("version", 1)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError(f"version must be an integer from 1 to {CONFIG_VERSION}, got {_show(version)}")
        if version > CONFIG_VERSION:
            raise ValueError(
                f"config version {version} is newer than this difflab reads ({CONFIG_VERSION}); upgrade difflab"
            )
        if version == 1:
            values = migrate_v1(values)
        check_keys(values, "config", {"version", "data", "model", "formulation", "train", "conditioning", "upsampler",
                                      "inpainting", "latent", "unclip", "distill"},
                   required=("data", "model", "formulation"))  # fmt: skip
        conditioning = values.get("conditioning", [])
        if not isinstance(conditioning, list):
            raise ValueError(f"conditioning must be a list, got {_show(conditioning)}")
        return cls(
            data=dataclass_from_dict(DataConfig, values["data"], "data"),
            model=ModelConfig.from_dict(values["model"]),
            formulation=config_from_dict(values["formulation"]),
            train=dataclass_from_dict(TrainConfig, values.get("train", {}), "train"),
            conditioning=tuple(
                dataclass_from_dict(SignalConfig, s, f"conditioning[{i}]") for i, s in enumerate(conditioning)
            ),
            upsampler=dataclass_from_dict(UpsamplerConfig, values["upsampler"], "upsampler")
            if values.get("upsampler") is not None
            else None,
            inpainting=dataclass_from_dict(InpaintingConfig, values["inpainting"], "inpainting")
            if values.get("inpainting") is not None
            else None,
            latent=dataclass_from_dict(LatentConfig, values["latent"], "latent")
            if values.get("latent") is not None
            else None,
            unclip=dataclass_from_dict(UnclipConfig, values["unclip"], "unclip")
            if values.get("unclip") is not None
            else None,
            distill=dataclass_from_dict(DistillConfig, values["distill"], "distill")
            if values.get("distill") is not None
            else None,
        )

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        return cls.from_dict(json.loads(text))


def check_unclip(config: RunConfig) -> None:
    """An unCLIP prior generates E-dimensional embeddings (data of kind points, shape (E,)); a decoder is an image model
    whose network takes image_embed of size E; neither is a cascade stage, an inpainting or a latent model yet."""
    unclip, shape = config.unclip, tuple(config.data.sample_shape)
    if unclip.role == "prior" and (config.data.kind != "points" or shape != (unclip.embed_dim,)):
        raise DifflabError(f"an unCLIP prior generates embeddings of shape ({unclip.embed_dim},), not {shape}")
    if unclip.role == "decoder" and getattr(config.model.settings, "image_embed_dim", None) != unclip.embed_dim:
        raise DifflabError(f"an unCLIP decoder's network must take image_embed of size {unclip.embed_dim}")
    if config.upsampler is not None or config.inpainting is not None or config.latent is not None:
        raise DifflabError(
            "an unCLIP prior or decoder cannot also be an upsampler, an inpainting or a latent model yet"
        )


_V1_FORMULATION_FIELDS = {
    "ddpm": {"schedule": "schedule", "num_steps": "timesteps", "prediction": "prediction"},
    "vp": {"prediction": "prediction"},
    "subvp": {},
    "ve": {"sigma_min": "sigma_min", "sigma_max": "sigma_max"},
    "edm": {"sigma_min": "sigma_min", "sigma_max": "sigma_max", "sigma_data": "sigma_data"},
    "pfgmpp": {"sigma_min": "sigma_min", "sigma_max": "sigma_max", "sigma_data": "sigma_data", "aug_dim": "aug_dim"},
    "pfgm": {},
}


def migrate_v1(values: dict[str, Any]) -> dict[str, Any]:
    """A version 1 config (difflab 0.1 run folders: a flat `diffusion` block switched on `process`, `model` with
    `kind` + `unet`/`mlp`, `train.label_dropout`) in the version 2 layout."""
    values = json.loads(json.dumps(values))  # a deep copy
    diffusion = values.pop("diffusion", None)
    if not isinstance(diffusion, dict) or "process" not in diffusion:
        raise ValueError("a version 1 config needs diffusion.process (ddpm, vp, subvp, ve, edm, pfgmpp or pfgm)")
    process = diffusion["process"]
    formulation = {"name": process, **(diffusion.get("pfgm") or {})}  # pfgm kept its settings in a nested block
    renames = _V1_FORMULATION_FIELDS.get(process, {})
    formulation |= {new: diffusion[old] for old, new in renames.items() if diffusion.get(old) is not None}
    model = values.pop("model", None)
    if not isinstance(model, dict) or "kind" not in model:
        raise ValueError("a version 1 config needs model.kind (unet or mlp) and its settings under model.<kind>")
    kind = model.get("kind")
    settings = model.get(kind) if isinstance(kind, str) else None
    if not isinstance(settings, dict):
        raise ValueError(f"model config names kind '{kind}' without its settings")
    train = values.get("train", {})
    label_dropout = train.pop("label_dropout", 0.1) if isinstance(train, dict) else 0.1
    conditioning = [{"name": "class_label", "dropout": label_dropout}] if settings.get("num_classes") else []
    return {
        "version": CONFIG_VERSION,
        "data": values.get("data"),
        "model": {"backbone": kind, "preset": model.get("preset", "custom"), "settings": settings},
        "formulation": formulation,
        "train": train,
        "conditioning": conditioning,
    }


def _show(value: Any) -> str:
    """A JSON value as it reads in config.json, cut to 40 characters."""
    text = json.dumps(value, default=repr) if not isinstance(value, float) or math.isfinite(value) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_keys(values: Any, where: str, known: set[str], required: tuple[str, ...] = ()) -> None:
    """Refuse a non-object, unknown keys or a missing required key, naming them under `where`."""
    if not isinstance(values, dict):
        raise ValueError(f"{where} must be an object, got {_show(values)}")
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{where} has unknown keys {', '.join(unknown)}")
    missing = [k for k in required if k not in values]
    if missing:
        raise ValueError(f"{where}.{missing[0]} is missing")


def dataclass_from_dict(cls: type, values: dict[str, Any], where: str | None = None) -> Any:
    """Rebuild a (nested) frozen dataclass from its asdict() form, each value checked against the field's type;
    unknown keys and missing required ones are ValueErrors naming the key under `where` (its path in config.json)."""
    where = where or cls.__name__
    fields = [f for f in dataclasses.fields(cls) if f.init]
    required = tuple(f.name for f in fields if f.default is f.default_factory is dataclasses.MISSING)
    check_keys(values, where, {f.name for f in fields}, required)
    hints = typing.get_type_hints(cls)
    return cls(**{k: read_value(hints[k], v, f"{where}.{k}") for k, v in values.items()})


_KINDS = {bool: (bool, "true or false"), int: (int, "an integer"), float: ((int, float), "a number"),
          str: (str, "a string")}  # fmt: skip


def read_value(hint: Any, value: Any, where: str) -> Any:
    """`value` read from JSON as type `hint` (int, float, str, bool, tuple[X, ...], X | None, a dataclass); a value
    of another type is a ValueError naming `where`. A bool is not an int; an int is a float."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return read_value(inner[0], value, where) if len(inner) == 1 else value
    if dataclasses.is_dataclass(hint):
        return dataclass_from_dict(hint, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where} must be a list, got {_show(value)}")
        item = args[0] if args else Any
        return tuple(read_value(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if hint in _KINDS:
        accepted, name = _KINDS[hint]
        if not isinstance(value, accepted) or (hint is not bool and isinstance(value, bool)):
            raise ValueError(f"{where} must be {name}, got {_show(value)}")
        return float(value) if hint is float else value
    return value
