"""Network backbones by name: pure architecture F(x, c_noise, cond), no diffusion maths. Each backbone is a row of
`BACKBONES`: its settings dataclass, its module class and a preset function that sizes it for data of a shape.
Adding a backbone = a module in nets/ + a row here + tests. A network declares the conditioning signals it accepts
in its `accepts` attribute."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from difflab.errors import DifflabError
from difflab.limits import check_limits
from difflab.nets.dit import DiT, DiTConfig, dit_preset
from difflab.nets.mlp import MLP, MLPConfig
from difflab.nets.prior import DiffusionPrior, PriorConfig, prior_preset
from difflab.nets.unet import UNet, UNetConfig, unet_preset


@dataclass(frozen=True)
class Backbone:
    name: str
    config_cls: type
    module_cls: type[nn.Module]
    # (preset, sample_shape, dropout, extra_outputs, num_classes, context_dim=None, pooled_dim=None,
    #  low_res_channels=None, inpaint_channels=None) -> settings
    preset: Callable[..., Any]
    kinds: tuple[str, ...]  # data kinds it suits: "images", "points"


# Image settings a U-Net or DiT preset takes beyond the common ones: text (context_dim, pooled_dim), a cascade's low-res
# input (low_res_channels), GLIDE's inpainting channels (inpaint_channels), patches (patch_size), unCLIP's image
# embedding (image_embed_dim, image_embed_hidden, image_embed_scale, image_tokens). One list, for every preset.
IMAGE_INPUTS = ("context_dim", "pooled_dim", "low_res_channels", "inpaint_channels", "patch_size", "image_embed_dim",
                "image_embed_hidden", "image_embed_scale", "image_tokens")  # fmt: skip


def _unet(preset: str, sample_shape: tuple[int, ...], dropout: float, extra_outputs: int, num_classes: int | None,
          **inputs: int | None):  # fmt: skip
    channels, resolution = sample_shape[0], sample_shape[-1]
    patch_size = inputs.pop("patch_size", 1)
    unet = unet_preset(preset, resolution, channels, dropout, patch_size)
    unet = replace(unet, num_classes=num_classes, **inputs)
    return replace(unet, out_channels=channels + extra_outputs) if extra_outputs else unet


def _dit(preset: str, sample_shape: tuple[int, ...], dropout: float, extra_outputs: int, num_classes: int | None,
         **inputs: int | None):  # fmt: skip
    channels, resolution = sample_shape[0], sample_shape[-1]
    dit = dit_preset(preset, resolution, channels, dropout, inputs.pop("patch_size", None))
    dit = replace(dit, num_classes=num_classes, **inputs)
    return replace(dit, out_channels=channels + extra_outputs) if extra_outputs else dit


def _mlp(preset: str, sample_shape: tuple[int, ...], dropout: float, extra_outputs: int, num_classes: int | None,
         **inputs: int | None):  # fmt: skip
    given = sorted(k for k, v in inputs.items() if v is not None)
    if given:
        raise DifflabError(
            f"the mlp backbone takes no {', '.join(given)} (text conditioning, upsampling, inpainting and patches "
            "are for images); use the unet backbone"
        )
    hidden = {"tiny": 128, "small": 256, "base": 512}
    if preset not in hidden:
        raise DifflabError(f"unknown model preset '{preset}': choose one of {', '.join(hidden)}")
    dim = sample_shape[0]
    return MLPConfig(data_dim=dim, hidden=hidden[preset], out_dim=dim + extra_outputs, num_classes=num_classes)


def _prior(preset: str, sample_shape: tuple[int, ...], dropout: float, extra_outputs: int, num_classes: int | None,
           **inputs: int | None):  # fmt: skip
    given = sorted(k for k, v in inputs.items() if v is not None and k not in ("context_dim", "pooled_dim"))
    if given or num_classes or extra_outputs:
        raise DifflabError("the prior backbone takes text only (context_dim, pooled_dim): it is unCLIP's prior over "
                           "image embeddings; train it with difflab train-prior")  # fmt: skip
    return prior_preset(preset, sample_shape[0], dropout, inputs.get("context_dim"), inputs.get("pooled_dim"))


BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in (
        Backbone("unet", UNetConfig, UNet, _unet, ("images",)),
        Backbone("dit", DiTConfig, DiT, _dit, ("images",)),
        Backbone("mlp", MLPConfig, MLP, _mlp, ("points",)),
        Backbone("prior", PriorConfig, DiffusionPrior, _prior, ("points",)),
    )
}
DEFAULT_BACKBONE = {"images": "unet", "points": "mlp"}


def backbone(name: str) -> Backbone:
    if name not in BACKBONES:
        raise DifflabError(f"unknown network backbone '{name}': choose one of {', '.join(BACKBONES)}")
    return BACKBONES[name]


@dataclass(frozen=True)
class ModelConfig:
    """A backbone by name with its settings (the backbone's own config dataclass), and for a text-conditional network
    its own text encoder (`difflab.text.conditioned.TextConfig`: vocabulary and sizes), trained with it, or the frozen
    encoder whose embeddings it takes (`FrozenTextConfig`)."""

    backbone: str
    settings: Any
    preset: str = "custom"
    text: Any = None

    def __post_init__(self):
        """Size settings outside `difflab.limits`, or a network of more than MAX_PARAMETERS values, are refused here,
        before anything is allocated (the network is built on the meta device to count them)."""
        from difflab.weights import meta_state

        if dataclasses.is_dataclass(self.settings):
            check_limits(self.settings, "model.settings")
        meta_state(lambda: build_network(self), f"the {self.backbone} network")

    def to_dict(self) -> dict[str, Any]:
        values = {"backbone": self.backbone, "preset": self.preset, "settings": dataclasses.asdict(self.settings)}
        return values | ({"text": self.text.to_dict()} if self.text is not None else {})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """The model config from its to_dict() form; a missing or mistyped key is a ValueError naming it."""
        from difflab.config import check_keys, dataclass_from_dict, read_value
        from difflab.text.conditioned import text_config_from_dict

        check_keys(values, "model", {"backbone", "preset", "settings", "text"}, required=("backbone", "settings"))
        spec = backbone(read_value(str, values["backbone"], "model.backbone"))
        settings = dataclass_from_dict(spec.config_cls, values["settings"], "model.settings")
        text = text_config_from_dict(values["text"], "model.text") if "text" in values else None
        return cls(spec.name, settings, read_value(str, values.get("preset", "custom"), "model.preset"), text)

    @property
    def num_classes(self) -> int | None:
        """The class count of a class-conditional network, None otherwise."""
        return getattr(self.settings, "num_classes", None)


def model_config_for(
    kind: str,
    sample_shape: tuple[int, ...],
    preset: str = "tiny",
    dropout: float = 0.0,
    extra_outputs: int = 0,
    num_classes: int | None = None,
    backbone_name: str | None = None,
    **inputs: int | None,
) -> ModelConfig:
    """A preset network for data of this kind and shape (U-Net for images, MLP for points unless `backbone_name`, or
    a preset named "<backbone>-<preset>" such as "dit-tiny", says otherwise);
    `extra_outputs` adds output channels (PFGM's z component); `num_classes` makes it class-conditional;
    `inputs` (IMAGE_INPUTS, U-Net and DiT only): `context_dim` (D of text_embed) and `pooled_dim` (P of text_pooled)
    condition it on text; `low_res_channels` makes it an upsampler of a cascade; `inpaint_channels` GLIDE's
    inpainting model."""
    spec = backbone(preset_backbone(preset, backbone_name) or DEFAULT_BACKBONE[kind])
    if kind not in spec.kinds:
        raise DifflabError(f"backbone '{spec.name}' does not suit {kind}; use {DEFAULT_BACKBONE[kind]}")
    unknown = set(inputs) - set(IMAGE_INPUTS)
    if unknown:
        raise TypeError(f"model_config_for got unknown settings {sorted(unknown)}; known: {IMAGE_INPUTS}")
    # passed only when set, so that a preset function written before these inputs keeps working
    extra = {k: v for k, v in inputs.items() if v is not None}
    size = preset.removeprefix(f"{spec.name}-")  # "dit-tiny" -> the dit preset "tiny"
    settings = spec.preset(size, tuple(sample_shape), dropout, extra_outputs, num_classes, **extra)
    return ModelConfig(spec.name, settings, size)  # the preset's own name: the backbone is recorded beside it


def preset_backbone(preset: str, backbone_name: str | None) -> str | None:
    """The backbone a preset name asks for: "dit-tiny" is the dit backbone's "tiny" (a name "<backbone>-<preset>"
    names its backbone); `backbone_name` otherwise (None: the data kind's default). A backbone named twice, two ways,
    is refused in one line."""
    prefix = preset.split("-", 1)[0] if "-" in preset else None
    if prefix not in BACKBONES:
        return backbone_name
    if backbone_name is not None and backbone_name != prefix:
        raise DifflabError(f"--model {preset} is a {prefix} preset but --backbone is {backbone_name}; drop --backbone "
                           f"or give one of that backbone's presets")  # fmt: skip
    return prefix


def build_network(config: ModelConfig) -> nn.Module:
    """The raw network F described by `config` (with its scratch text encoder in front when it has one; a frozen
    encoder stays outside: the backbone takes its text_embed / text_mask / text_pooled)."""
    net = backbone(config.backbone).module_cls(config.settings)
    if config.text is None:
        return net
    from difflab.text.conditioned import FrozenTextConfig, TextConditionedNet

    return net if isinstance(config.text, FrozenTextConfig) else TextConditionedNet(net, config.text)


__all__ = ["BACKBONES", "ModelConfig", "backbone", "build_network", "model_config_for", "preset_backbone"]
