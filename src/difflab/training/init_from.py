"""Fine-tuning from a trained run (GLIDE, Nichol et al. 2022, Sec. 3.3: the inpainting model is the base text model
fine-tuned "with four additional input channels", whose new input weights start at zero).

`finetune_config` gives a new run the network (backbone, sizes, scratch text encoder and its vocabulary, or the frozen
encoder's record), the formulation and the conditioning of a source checkpoint, keeping the new run's own extra
inputs (inpainting channels, an upsampler's low-res channels), caption dropout and training settings; the source is
recorded in `train.init_from`. `initial_weights` then copies the source's EMA weights into the new network: every
tensor of the same shape as it is, an input convolution that gained channels (the masked image and the mask) with the
source's weights on the old channels and zeros on the new ones, so that the fine-tuned model starts out computing
exactly what the source did. Any other difference in names or shapes is refused in one line.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from difflab.config import RunConfig
from difflab.errors import DifflabError, flag

TEXT_SIGNALS = ("text", "text_tokens")  # the caption signal of a frozen and of a scratch text encoder


def refuse_source_settings(text_encoder: str | None, attention_levels: int | None, formulation: dict) -> None:
    """What a fine-tuned run takes from its source may not be given again: its text encoder, its network's attention
    levels, its formulation's settings (any given, e.g. --p-mean) are one-line errors, not silently ignored."""
    if text_encoder is not None:
        raise DifflabError("--init-from takes the text encoder of the run it starts from: drop --text-encoder")
    if attention_levels is not None:
        raise DifflabError("--init-from takes the network of the run it starts from: drop --attention-levels")
    given = [flag(k) for k, v in formulation.items() if v not in (None, False)]
    if given:
        raise DifflabError(f"--init-from takes the formulation of the run it starts from: drop {', '.join(given)}")


def finetune_config(config: RunConfig, source: str | Path, caption_dropout: float) -> RunConfig:
    """`config` (a new run's) with the network, formulation and conditioning of the checkpoint `source` (a run
    folder, checkpoint folder or weights file), its own extra input channels, and train.init_from = the checkpoint."""
    from difflab.training.checkpoint import load_config, resolve_checkpoint

    ckpt = resolve_checkpoint(source)
    src = load_config(ckpt)
    if tuple(src.data.sample_shape) != tuple(config.data.sample_shape):
        raise DifflabError(
            f"--init-from '{source}' was trained on {_shape(src.data.sample_shape)} samples but this data gives "
            f"{_shape(config.data.sample_shape)}; fine-tune on data of the same size (--resolution)"
        )
    if src.upsampler is not None or src.inpainting is not None:
        raise DifflabError(f"--init-from '{source}' is an upsampler or inpainting model; start from a base model")
    extra = {k: getattr(config.model.settings, k, None) for k in ("low_res_channels", "inpaint_channels")}
    if any(v is not None for v in extra.values()) and not all(hasattr(src.model.settings, k) for k in extra):
        raise DifflabError(f"--init-from '{source}' has a {src.model.backbone} network, which takes no extra image "
                           "inputs; start from a U-Net run")  # fmt: skip
    settings = replace(src.model.settings, **{k: v for k, v in extra.items() if hasattr(src.model.settings, k)})
    conditioning = tuple(replace(s, dropout=caption_dropout) if s.name in TEXT_SIGNALS else s
                         for s in src.conditioning if s.name != "low_res")  # fmt: skip
    conditioning += tuple(s for s in config.conditioning if s.name == "low_res")
    return replace(config, model=replace(src.model, settings=settings), formulation=src.formulation,
                   conditioning=conditioning, train=replace(config.train, init_from=str(ckpt.resolve())))  # fmt: skip


def initial_weights(network: nn.Module, source: str | Path) -> None:
    """Load the EMA weights of the checkpoint `source` into `network` (built from `finetune_config`'s config):
    equal shapes copied, input channels the source lacks set to zero, anything else refused."""
    from difflab.pipeline import load

    weights = load(source).denoiser.net.state_dict()
    target = network.state_dict()
    unknown = sorted(set(weights) ^ set(target))
    if unknown:
        raise DifflabError(f"--init-from '{source}': the networks differ in {unknown[0]} (and {len(unknown) - 1} "
                           "more tensors); fine-tune a run with the same architecture")  # fmt: skip
    with torch.no_grad():
        for name, value in target.items():
            old = weights[name]
            if old.shape == value.shape:
                value.copy_(old)
            elif _gained_input_channels(old.shape, value.shape):
                value.zero_()
                value[:, : old.shape[1]].copy_(old)
            else:
                raise DifflabError(f"--init-from '{source}': {name} has shape {tuple(old.shape)} there but "
                                   f"{tuple(value.shape)} here; only new input channels can be added")  # fmt: skip


def _gained_input_channels(old: torch.Size, new: torch.Size) -> bool:
    """A convolution weight (out, in, k, k) with more input channels and otherwise the same shape."""
    return len(old) == len(new) == 4 and old[0] == new[0] and old[2:] == new[2:] and old[1] < new[1]


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


__all__ = ["finetune_config", "initial_weights"]
