"""A folder of image files (searched recursively) loaded into memory as one square, [-1, 1] tensor."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from difflab.errors import DifflabError
from difflab.limits import MAX_RESOLUTION

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
_PROGRESS_MIN_FILES = 500


def find_image_files(folder: Path) -> list[Path]:
    """All files under ``folder`` (recursively, following symlinked sub-folders) whose extension is in
    IMAGE_EXTENSIONS, any case, sorted. A folder reached twice (a link to an ancestor or a sibling) is walked once."""
    found, visited = [], set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in visited:  # a loop or a second way in: do not descend again
            dirs[:] = []
            continue
        visited.add(real)
        dirs.sort()
        found += [Path(root) / f for f in files if Path(f).suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(p for p in found if p.is_file())


def _square_crop(image: Image.Image, resolution: int) -> Image.Image:
    """Resize (bicubic) so that the shorter side equals ``resolution``, then centre-crop to a square."""
    width, height = image.size
    scale = resolution / min(width, height)
    new_w = max(resolution, round(width * scale))
    new_h = max(resolution, round(height * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left = (new_w - resolution) // 2
    top = (new_h - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def _to_8_bit(image: Image.Image) -> Image.Image:
    """16- and 32-bit integer grey images ("I;16*", "I": 16-bit PNGs) as "L", 0..65535 -> 0..255 (p / 257, rounded);
    Pillow's own convert() would clip them at 255 (nearly all white). Other modes are returned as they are."""
    if not image.mode.startswith("I"):
        return image
    levels = np.asarray(image, dtype=np.float64).clip(0, 65535) / 257.0
    return Image.fromarray(np.rint(levels).astype(np.uint8), "L")


def _read_image(path: Path, resolution: int, mode: str) -> np.ndarray | None:
    """One file as uint8 (R, R) or (R, R, 3), upright (its EXIF orientation applied), 16-bit levels scaled to 8
    bits; None (after one warning naming the file) if Pillow cannot read it."""
    try:
        with Image.open(path) as image:
            image = _to_8_bit(ImageOps.exif_transpose(image)).convert(mode)
            return np.asarray(_square_crop(image, resolution), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        warnings.warn(f"skipping unreadable image file '{path}': {exc}", UserWarning, stacklevel=3)
        return None


def _check_arguments(folder: Path, resolution: int, channels: int) -> None:
    if not folder.exists():
        raise DifflabError(
            f"data folder '{folder}' does not exist; pass the path of a folder of png/jpg/jpeg/webp images"
        )
    if not folder.is_dir():
        raise DifflabError(f"data path '{folder}' is a file, not a folder; pass the folder holding the images")
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise DifflabError(f"image resolution must be a positive integer, got {resolution!r}; try 32")
    if resolution > MAX_RESOLUTION:
        raise DifflabError(f"image resolution {resolution} is above difflab's limit of {MAX_RESOLUTION}; try 32")
    if channels not in (1, 3):
        raise DifflabError(f"channels must be 1 (grey) or 3 (RGB), got {channels!r}")


def load_image_folder(path: str | Path, resolution: int, channels: int = 3) -> torch.Tensor:
    """Load every readable image under ``path`` as float32 (N, C, R, R) in [-1, 1], C = ``channels``.

    Files are found recursively by extension (png, jpg, jpeg, webp; any case; symlinked sub-folders followed, each
    folder once) in sorted order, turned upright by their EXIF orientation, 16-bit levels scaled to 8 bits (p / 257),
    converted to RGB (C=3) or grey "L" (C=1), resized bicubically so the shorter side is R and centre-cropped to R x R.
    Unreadable files are skipped with a UserWarning naming each; other extensions are ignored silently.
    """
    folder = Path(path).expanduser()
    _check_arguments(folder, resolution, channels)
    files = find_image_files(folder)
    mode = "RGB" if channels == 3 else "L"
    iterator = tqdm(files, desc="loading images", unit="img") if len(files) > _PROGRESS_MIN_FILES else files
    arrays = [a for a in (_read_image(f, resolution, mode) for f in iterator) if a is not None]
    if not arrays:
        raise DifflabError(
            f"data folder '{folder}' has no readable png/jpg/jpeg/webp image; add images or pass another one"
        )
    stacked = np.stack(arrays)  # (N, R, R) or (N, R, R, 3), uint8
    stacked = stacked[:, None, :, :] if channels == 1 else stacked.transpose(0, 3, 1, 2)
    tensor = torch.from_numpy(np.ascontiguousarray(stacked)).to(torch.float32)
    return tensor.div_(127.5).sub_(1.0)
