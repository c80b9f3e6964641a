"""A difflab DDPM U-Net as a diffusers DDPMPipeline folder (unet/ UNet2DModel + scheduler/ DDPMScheduler), where the
architecture maps block for block; otherwise a one-line DifflabError saying why.

difflab's U-Net (nets/unet.py) and diffusers' UNet2DModel are the same DDPM network when: the first level's width is
`channels` (channel_mult[0] = 1: diffusers sizes conv_in and the time embedding from block_out_channels[0]); every
GroupNorm has `norm_groups` groups (difflab takes min(groups, width)); attention heads fit one head width for every
attention layer (diffusers has one attention_head_dim; with one head each layer uses its own width); and the network
has no input diffusers' UNet2DModel lacks (text attention, an upsampler's low-res image, inpainting channels,
patches). Then: sinusoidal embedding [cos, sin] = flip_sin_to_cos with freq_shift 0; ResBlock = ResnetBlock2D
("default" time scale shift); SelfAttention's 1x1 qkv conv = to_q/to_k/to_v; the strided conv and nearest-upsample
conv = Downsample2D / Upsample2D; the class table (K + 1 rows, the last the null label) = num_class_embeds K + 1.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from difflab.errors import DifflabError
from difflab.formulations.ddpm import DDPMConfig
from difflab.interop.diffusers_folder import NULL_CLASS_KEY
from difflab.interop.diffusers_models import DiffusersUNet, import_diffusers
from difflab.nets.unet import UNet, UNetConfig

# difflab's schedule -> (diffusers' beta_schedule, beta_start, beta_end) with difflab's default betas
SCHEDULES = {"linear": ("linear", 1e-4, 0.02), "cosine": ("squaredcos_cap_v2", 1e-4, 0.02),
             "sigmoid": ("sigmoid", 1e-4, 0.02), "scaled_linear": ("scaled_linear", 0.00085, 0.012)}  # fmt: skip
PREDICTIONS = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
_RESNET = {"block1.0": "norm1", "block1.2": "conv1", "emb": "time_emb_proj", "block2.0": "norm2", "block2.3": "conv2",
           "skip": "conv_shortcut"}  # fmt: skip


def export_refusal(cfg: UNetConfig) -> str | None:
    """Why this U-Net has no UNet2DModel twin, or None when it has one."""
    if cfg.patch_size != 1:
        return f"patch_size {cfg.patch_size} (levels on pixel-unshuffled patches) has no UNet2DModel counterpart"
    if cfg.context_dim or cfg.pooled_dim:
        return ("its text conditioning (GLIDE's text tokens joined to every attention layer's keys and values) is "
                "not diffusers' cross-attention")  # fmt: skip
    if cfg.low_res_channels or cfg.inpaint_channels:
        return "its extra input channels (an upsampler's low-res image or inpainting's mask) have no UNet2DModel input"
    if cfg.channel_mult[0] != 1:
        return (f"channel_mult starts with {cfg.channel_mult[0]}, not 1: diffusers sizes conv_in and the time "
                "embedding from the first level's width, difflab from `channels`")  # fmt: skip
    if cfg.norm_groups > cfg.channels:
        return (f"norm_groups {cfg.norm_groups} > channels {cfg.channels}: difflab's narrow GroupNorms take fewer "
                "groups, diffusers' take norm_groups everywhere")  # fmt: skip
    if (cfg.out_channels or cfg.in_channels) != cfg.in_channels:
        return f"it has {cfg.out_channels} output channels for {cfg.in_channels} input ones"
    return None if _head_dim(cfg) is not False else (
        f"{cfg.attention_heads} attention heads over widths {sorted(set(_attention_widths(cfg)))}: diffusers' "
        "UNet2DModel has one attention_head_dim for every attention layer"
    )  # fmt: skip


def _attention_widths(cfg: UNetConfig) -> list[int]:
    widths = [cfg.channels * m for m in cfg.channel_mult]
    levels = [w for i, w in enumerate(widths) if cfg.resolution // 2**i in cfg.attention_resolutions]
    return [*levels, widths[-1]]  # the middle block always attends


def _head_dim(cfg: UNetConfig) -> int | None | bool:
    """diffusers' attention_head_dim: None (each layer one head of its width) for one head, the common head width for
    several, False when there is none."""
    if cfg.attention_heads == 1:
        return None
    widths = set(_attention_widths(cfg))
    return widths.pop() // cfg.attention_heads if len(widths) == 1 else False


def unet2d_config(cfg: UNetConfig) -> dict[str, Any]:
    """UNet2DModel's keyword arguments for the twin of a mappable U-Net."""
    widths = tuple(cfg.channels * m for m in cfg.channel_mult)
    res = [cfg.resolution // 2**i for i in range(len(widths))]
    attn = [r in cfg.attention_resolutions for r in res]
    return {
        "sample_size": cfg.resolution, "in_channels": cfg.in_channels, "out_channels": cfg.in_channels,
        "layers_per_block": cfg.num_res_blocks, "block_out_channels": widths, "norm_num_groups": cfg.norm_groups,
        "down_block_types": tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        "up_block_types": tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        "attention_head_dim": _head_dim(cfg), "dropout": cfg.dropout, "norm_eps": 1e-5, "flip_sin_to_cos": True,
        "freq_shift": 0, "num_class_embeds": cfg.num_classes + 1 if cfg.num_classes else None,
    }  # fmt: skip


def _rename(key: str) -> str:
    rules = [
        (r"embed\.mlp\.0\.", "time_embedding.linear_1."), (r"embed\.mlp\.2\.", "time_embedding.linear_2."),
        (r"label_embed\.table\.", "class_embedding."), (r"conv_in\.", "conv_in."),
        (r"downsample\.(\d+)\.", r"down_blocks.\1.downsamplers.0.conv."),
        (r"upsample\.(\d+)\.1\.", r"up_blocks.\1.upsamplers.0.conv."),
        (r"(down|up)\.(\d+)\.blocks\.(\d+)\.", r"\1_blocks.\2.resnets.\3."),
        (r"(down|up)\.(\d+)\.attn\.(\d+)\.", r"\1_blocks.\2.attentions.\3."),
        (r"mid1\.", "mid_block.resnets.0."), (r"mid2\.", "mid_block.resnets.1."),
        (r"mid_attn\.", "mid_block.attentions.0."), (r"out\.0\.", "conv_norm_out."), (r"out\.2\.", "conv_out."),
    ]  # fmt: skip
    for pattern, repl in rules:
        new, n = re.subn("^" + pattern, repl, key)
        if n:
            head, _, leaf = new.rpartition(".")  # leaf: weight or bias
            if ".resnets." in head:
                block, _, part = head.partition(".resnets.")
                index, _, inner = part.partition(".")
                head = f"{block}.resnets.{index}.{_RESNET[inner]}"
            return f"{head}.{leaf}"
    raise DifflabError(f"the U-Net parameter '{key}' has no diffusers counterpart")


def to_diffusers_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """difflab U-Net parameters -> UNet2DModel's (the qkv conv split into to_q/to_k/to_v, 1x1 convs as Linears)."""
    out = {}
    for key, value in state.items():
        if ".attentions." in _rename(key) or key.startswith("mid_attn."):
            head, leaf = _rename(key).rsplit(".", 1)
            block, _, part = head.rpartition(".")
            if part == "norm":
                out[f"{block}.group_norm.{leaf}"] = value
            elif part == "qkv":
                for name, chunk in zip(("to_q", "to_k", "to_v"), value.chunk(3, dim=0), strict=True):
                    out[f"{block}.{name}.{leaf}"] = chunk.reshape(chunk.shape[0], -1) if leaf == "weight" else chunk
            elif part == "proj":
                out[f"{block}.to_out.0.{leaf}"] = value.reshape(value.shape[0], -1) if leaf == "weight" else value
            else:
                raise DifflabError(f"the U-Net parameter '{key}' has no diffusers counterpart")
        else:
            out[_rename(key)] = value
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def export_diffusers(source: Any, out: str | Path, *, use_ema: bool = True) -> Path:
    """Write the DDPM U-Net of `source` (a Pipeline, or a run / checkpoint / weights path for difflab.load) as a
    diffusers DDPMPipeline folder `out` (new or empty): unet/ (UNet2DModel, safetensors) and scheduler/
    (DDPMScheduler with the run's schedule and prediction, clip_sample off as difflab samples). The exported U-Net is
    checked against the original on one input before the folder is written. Returns `out`."""
    from difflab.pipeline import Pipeline, load

    pipe = source if isinstance(source, Pipeline) else load(source, use_ema=use_ema)
    formulation = pipe.config.formulation
    if not isinstance(formulation, DDPMConfig):
        raise DifflabError(f"cannot export a {pipe.config.process} model to diffusers: a diffusers scheduler holds a "
                           "DDPM beta schedule; only ddpm runs map (their network takes the timestep)")  # fmt: skip
    net = pipe.denoiser.net
    if isinstance(net, DiffusersUNet):
        raise DifflabError("this model was loaded from a diffusers folder; copy that folder instead")
    if not isinstance(net, UNet):
        raise DifflabError(f"cannot export to diffusers: the network is a {type(net).__name__}, not difflab's U-Net "
                           "(a scratch text encoder in front of it has no diffusers counterpart)")  # fmt: skip
    reason = export_refusal(net.config)
    if reason:
        raise DifflabError(f"cannot export this U-Net to diffusers' UNet2DModel: {reason}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DifflabError(f"'{out}' exists and is not an empty folder; choose a new folder to export to")
    diffusers = import_diffusers("exporting to diffusers")
    unet = diffusers.UNet2DModel(**unet2d_config(net.config))
    try:
        unet.load_state_dict(to_diffusers_state(net.state_dict()), strict=True)
    except RuntimeError as err:
        raise DifflabError(f"the U-Net does not map onto UNet2DModel ({str(err).splitlines()[0]})") from None
    _check_twin(net, unet.eval())
    beta_schedule, beta_start, beta_end = SCHEDULES[formulation.schedule]
    scheduler = diffusers.DDPMScheduler(
        num_train_timesteps=formulation.timesteps, beta_schedule=beta_schedule, beta_start=beta_start,
        beta_end=beta_end, prediction_type=PREDICTIONS[formulation.prediction], clip_sample=False,
        variance_type="fixed_small", timestep_spacing="linspace",
    )  # fmt: skip
    tmp = out.with_name(f".{out.name}.tmp-export")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(str(tmp), safe_serialization=True)
        if net.config.num_classes:
            config_path = tmp / "unet" / "config.json"
            config = json.loads(config_path.read_text(encoding="utf-8"))
            config[NULL_CLASS_KEY] = net.config.num_classes
            config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DifflabError(f"cannot write '{out}': {err.strerror or err}") from None
    return out


@torch.no_grad()
def _check_twin(net: UNet, unet: Any) -> None:
    """The exported network equals the original on one random input (float32 rounding only)."""
    cfg = net.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.in_channels, cfg.resolution, cfg.resolution, generator=g)
    t = torch.tensor([17.0, 731.5])
    labels = torch.tensor([0, -1]) if cfg.num_classes else None
    ours = net.eval()(x, t, {"class_label": labels} if labels is not None else None)
    theirs = unet(x, t, class_labels=None if labels is None else torch.where(labels < 0, cfg.num_classes, labels))
    err = float((ours - theirs.sample).abs().max()) / max(float(ours.abs().max()), 1e-6)
    if not err < 1e-4:
        raise DifflabError(f"the exported UNet2DModel differs from the U-Net (relative error {err:.1e}); not written")
