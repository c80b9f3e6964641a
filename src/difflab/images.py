"""Reading one user image or mask for editing (inpainting, image-to-image), with one-line errors for bad files.

Conventions (the same as the data loaders, `difflab.data.folder`): pixel values 0..255 map to [-1, 1] by
x = p / 127.5 - 1, so 0 -> -1, 255 -> 1. An image must already have the model's resolution (no resizing: an edit
must line up with its mask pixel for pixel) and a mode matching the model's channels: "L" (8-bit grey) for
1-channel models, "RGB" for 3-channel ones. "LA" / "RGBA" are accepted only when every pixel is fully opaque
(alpha 255), and then read as "L" / "RGB"; any other mode ("P", "1", "I;16", "CMYK", a grey image for an RGB
model or the reverse) is an error that says how to convert it. A mask is the same size, mode "L" or "1", and
binary: white (255) = the region to regenerate, black (0) = keep; grey values and an all-black mask are errors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from difflab.errors import DifflabError

IMAGE_MODES = {1: "L", 3: "RGB"}
_WITH_ALPHA = {"LA": "L", "RGBA": "RGB"}
_READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def _open(path: str | Path, what: str) -> Image.Image:
    """The decoded image at `path` (loaded into memory, its EXIF orientation applied), or a DifflabError for a missing
    or unreadable file."""
    p = Path(path)
    if not p.exists():
        raise DifflabError(f"{what} '{p}' does not exist; pass the path of a PNG file")
    if not p.is_file():
        raise DifflabError(f"{what} '{p}' is not a file; pass the path of a PNG file")
    try:
        with Image.open(p) as image:
            image.load()
            return ImageOps.exif_transpose(image)  # upright, as viewers show it (a copy)
    except _READ_ERRORS as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DifflabError(f"{what} '{p}' is not a readable image ({reason}); pass a PNG file") from None


def _check_size(image: Image.Image, path: str | Path, what: str, size: int, against: str) -> None:
    if image.size != (size, size):
        w, h = image.size
        raise DifflabError(f"{what} '{path}' is {w}x{h} pixels but {against} {size}x{size}; resize it to {size}x{size}")


def _drop_opaque_alpha(image: Image.Image, path: str | Path, target: str) -> Image.Image:
    """LA / RGBA with alpha 255 everywhere -> L / RGB; transparent pixels are an error."""
    alpha = np.asarray(image.getchannel("A"))
    if (alpha != 255).any():
        raise DifflabError(
            f"image '{path}' (mode {image.mode}) has transparent pixels; flatten it onto a background and save it "
            f"as {target} (e.g. Pillow's Image.alpha_composite, then .convert('{target}'))"
        )
    return image.convert(target)


def read_image(path: str | Path, resolution: int, channels: int) -> torch.Tensor:
    """The image at `path` as float32 (1, C, R, R) in [-1, 1] for a model of `channels` C and resolution R.

    The file must be R x R pixels with mode "L" (C = 1) or "RGB" (C = 3); fully opaque "LA" / "RGBA" also pass.
    """
    if channels not in IMAGE_MODES:
        raise DifflabError(f"editing needs a 1- or 3-channel image model, not {channels} channels")
    target = IMAGE_MODES[channels]
    image = _open(path, "image")
    _check_size(image, path, "image", resolution, "the model makes")
    if image.mode in _WITH_ALPHA and _WITH_ALPHA[image.mode] == target:
        image = _drop_opaque_alpha(image, path, target)
    if image.mode != target:
        kind = "grey (1 channel)" if channels == 1 else "colour (3 channels)"
        raise DifflabError(
            f"image '{path}' has mode {image.mode} but this model is {kind} and needs mode {target}; convert it, "
            f"e.g. Image.open(path).convert('{target}').save(...)"
        )
    pixels = np.array(image, dtype=np.uint8)  # a writable copy
    pixels = pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(pixels)).to(torch.float32).div_(127.5).sub_(1.0)[None]


def read_mask(path: str | Path, resolution: int) -> torch.Tensor:
    """The binary mask at `path` as float32 (1, 1, R, R): 1 where to regenerate (white), 0 where to keep (black).

    The file must be R x R pixels, mode "L" or "1", with only the values 0 and 255 and at least one white pixel.
    """
    mask = _open(path, "mask")
    _check_size(mask, path, "mask", resolution, "the image is")
    if mask.mode not in ("L", "1"):
        raise DifflabError(
            f"mask '{path}' has mode {mask.mode}; save it as mode L (or 1) with white (255) = regenerate and "
            "black (0) = keep, e.g. Image.open(path).convert('L')"
        )
    values = np.asarray(mask.convert("L"), dtype=np.uint8)
    grey = values[(values != 0) & (values != 255)]
    if grey.size:
        raise DifflabError(
            f"mask '{path}' is not binary: it holds grey values such as {int(grey[0])}; use only 255 (white) = "
            "regenerate and 0 (black) = keep"
        )
    if not (values == 255).any():
        raise DifflabError(f"mask '{path}' is all black: nothing to regenerate; paint the region to fill white (255)")
    return torch.from_numpy(values == 255).to(torch.float32)[None, None]
