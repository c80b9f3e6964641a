"""GLIDE's inpainting model (Nichol et al. 2022, GLIDE, Sec. 3.3): a model trained with extra input channels, the
masked image and the mask, on training examples with random regions erased, so that it fills a region itself rather
than through a training-free method (`difflab.editing.inpaint`: replacement, RePaint).

Conventions (GLIDE's): mask (B, 1, R, R) is 1 on a known pixel and 0 on one to fill; masked_image (B, C, R, R) is the
image times the mask (the fill region zeroed). The files `difflab inpaint` reads say the opposite (white = regenerate,
`difflab.images.read_mask`); `inpainting_signals` turns one into the other. The U-Net concatenates both to x inside
the network (`UNetConfig.inpaint_channels`), so only x carries the preconditioning's input scale c_in, and classifier-
free guidance keeps both in its unconditional branch (`difflab.conditioning.GUIDANCE_KEEPS`): it guides on the caption.

The training masks (`random_keep_masks`), drawn per example and per step from the trainer's noise generator (exact
resume holds):
- with probability `full_share` (default 0.1) everything is to be filled: mask and masked image all zeros, the nulls
  of both signals, so the model also learns to generate freely (what it does when sampled without a mask);
- otherwise one or two axis-aligned rectangles (equal odds) are to be filled, each with a height and a width drawn
  uniformly from the integers round(R/4) .. round(3R/4) (at least 1) and a position uniform over those inside the
  image: one rectangle covers 1/16 to 9/16 of the image (1/4 on average); two may overlap.
GLIDE erases "random regions" without saying which; rectangles of these sizes are our choice, not the paper's.

Sampling (`inpaint_with_model`, `difflab inpaint` with such a model): the sampler runs from pure noise with cond
{masked_image, mask, and the prompt's tokens}; the known pixels are then pasted back exactly (GLIDE returns the raw
sample; `paste=False` does too), so the result keeps the original where the mask says so, as the training-free
methods do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from difflab import distributed
from difflab.errors import DifflabError

if TYPE_CHECKING:
    from difflab.pipeline import Pipeline

DEFAULT_FULL_SHARE = 0.1


@dataclass(frozen=True)
class InpaintingConfig:
    """What makes a run an inpainting model: the share of training examples whose whole image is to be filled (the
    rest get one or two random rectangles; see the module's docstring)."""

    full_share: float = DEFAULT_FULL_SHARE

    def __post_init__(self):
        share = self.full_share
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share < 1:
            raise DifflabError(f"inpainting.full_share must be a number in [0, 1), got {share!r}")


def rectangle_sides(resolution: int) -> tuple[int, int]:
    """The smallest and largest side (in pixels) of a training rectangle: round(R/4) .. round(3R/4), at least 1."""
    low = max(1, round(resolution / 4))
    return low, max(low, round(3 * resolution / 4))


def random_keep_masks(
    n: int, resolution: int, generator: torch.Generator | None, full_share: float = DEFAULT_FULL_SHARE,
    device: torch.device | str = "cpu",
) -> torch.Tensor:  # fmt: skip
    """GLIDE's random erasures (Nichol et al. 2022, Sec. 3.3) as keep masks (n, 1, R, R) float: 0 on the pixels to
    fill, 1 on the known ones. Per example: everything filled with probability `full_share`, else one or two
    rectangles (the module's docstring gives the sizes). Always draws, in this order, n uniforms (full), n integers
    (one or two), 2 x 2n side lengths and 2 x 2n positions from `generator` (never the global RNG)."""
    low, high = rectangle_sides(resolution)
    full = distributed.rand(n, generator=generator, device=device) < full_share
    two = distributed.randint(0, 2, (n,), generator=generator, device=device).bool()
    # (height/width, n, rect): the samples are the middle dimension
    sides = distributed.randint(low, high + 1, (2, n, 2), batch_dim=1, generator=generator, device=device)
    starts = distributed.rand(2, n, 2, batch_dim=1, generator=generator, device=device)
    starts = (starts * (resolution - sides + 1)).floor().long()
    pixels = torch.arange(resolution, device=device)
    inside = (pixels >= starts[..., None]) & (pixels < (starts + sides)[..., None])  # (2, n, 2, R)
    rects = inside[0][..., :, None] & inside[1][..., None, :]  # (n, 2, R, R)
    fill = rects[:, 0] | (rects[:, 1] & two[:, None, None]) | full[:, None, None]
    return (~fill).to(torch.float32)[:, None]


def training_inputs(x0: torch.Tensor, cond: Any, config: InpaintingConfig, generator: torch.Generator | None):
    """cond (or None) with an inpainting model's training signals for clean images x0 (B, C, R, R): mask = random keep
    masks (B, 1, R, R) drawn from `generator`, masked_image = x0 * mask."""
    mask = random_keep_masks(x0.shape[0], x0.shape[-1], generator, config.full_share, x0.device).to(x0.dtype)
    return {**(cond or {}), "masked_image": x0 * mask, "mask": mask}


def inpainting_signals(image: torch.Tensor, fill: torch.Tensor) -> dict[str, torch.Tensor]:
    """{"masked_image", "mask"} (1 or B rows) from an image (1 or B, C, R, R) in [-1, 1] and a fill mask (1 or B, 1,
    R, R), 1 where to regenerate (`difflab.images.read_mask`'s convention): mask = 1 - fill, masked_image = image *
    mask. Shapes that do not fit are a one-line error."""
    if image.ndim != 4 or fill.ndim != 4 or fill.shape[1] != 1 or fill.shape[2:] != image.shape[2:]:
        raise DifflabError(f"the mask {tuple(fill.shape)} does not fit the image {tuple(image.shape)}: give a mask "
                           "(1, 1, R, R) of the image's size, 1 where to regenerate")  # fmt: skip
    if bool(((fill != 0) & (fill != 1)).any()):
        raise DifflabError("the fill mask must hold only 0 (keep) and 1 (regenerate)")
    keep = (1 - fill).to(torch.float32)
    return {"masked_image": image.to(torch.float32) * keep, "mask": keep}


def inpainting_method(pipe: Pipeline, repaint: bool) -> str:
    """How `difflab inpaint` fills a region with this model: "model" for an inpainting model (its own channels),
    else "repaint" when RePaint is asked for, else "replacement". RePaint for an inpainting model is refused."""
    if pipe.config.inpainting is None:
        return "repaint" if repaint else "replacement"
    if repaint:
        raise DifflabError("this model was trained with --inpainting and fills the region itself; drop --repaint-jump"
                           "/--repaint-resamplings (they are for models without inpainting channels)")  # fmt: skip
    return "model"


def inpaint_with_model(
    pipe: Pipeline,
    image: torch.Tensor,
    fill: torch.Tensor,
    n: int | None = None,
    *,
    paste: bool = True,
    cond: Any = None,
    stats: dict[str, Any] | None = None,
    **settings: Any,
) -> torch.Tensor:
    """Fill the region `fill` = 1 of `image` with an inpainting model (Nichol et al. 2022, Sec. 3.3): (n, C, R, R) on
    the CPU. image (1 or n, C, R, R) in [-1, 1], fill (1 or n, 1, R, R); `settings` are `Pipeline.sample`'s (seed,
    seeds, sampler, steps, prompt, negative_prompt, guidance, ...), whose guidance keeps the known region in both
    branches. With `paste` the known pixels are the original's exactly; without, the raw samples (GLIDE's output)."""
    if pipe.config.inpainting is None:
        raise DifflabError("this model was not trained with --inpainting; use difflab.editing.inpaint (replacement "
                           "or RePaint) or train with --inpainting")  # fmt: skip
    channels, resolution = pipe.sample_shape[0], pipe.sample_shape[-1]
    if image.ndim != 4 or tuple(image.shape[1:]) != (channels, resolution, resolution):
        raise DifflabError(f"the image must be (n or 1, {channels}, {resolution}, {resolution}) for this model, got "
                           f"{tuple(image.shape)}")  # fmt: skip
    signals = inpainting_signals(image, fill)
    settings_cond = {**(dict(cond) if cond else {}), **signals}
    samples = pipe.sample(n, cond=settings_cond, stats=stats, **settings)
    if not paste:
        return samples
    keep = signals["mask"]
    return keep * image.to(samples.dtype) + (1 - keep) * samples


__all__ = ["InpaintingConfig", "inpaint_with_model", "inpainting_method", "inpainting_signals", "random_keep_masks",
           "training_inputs"]  # fmt: skip
