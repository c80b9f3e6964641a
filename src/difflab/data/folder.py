"""A folder of image files (searched recursively) loaded into memory as one square, [-1, 1] tensor."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from difflab.errors import DifflabError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
_PROGRESS_MIN_FILES = 500


def find_image_files(folder: Path) -> list[Path]:
    """All files under ``folder`` (recursively) whose extension is in IMAGE_EXTENSIONS, any case, sorted."""
    found = [p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    return sorted(found)


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


def _read_image(path: Path, resolution: int, mode: str) -> np.ndarray | None:
    """One file as uint8 (R, R) or (R, R, 3); None (after one warning naming the file) if Pillow cannot."""
    try:
        with Image.open(path) as image:
            image = image.convert(mode)
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
    if channels not in (1, 3):
        raise DifflabError(f"channels must be 1 (grey) or 3 (RGB), got {channels!r}")


def load_image_folder(path: str | Path, resolution: int, channels: int = 3) -> torch.Tensor:
    """Load every readable image under ``path`` as float32 (N, C, R, R) in [-1, 1], C = ``channels``.

    Files are found recursively by extension (png, jpg, jpeg, webp; any case) in sorted order, converted to
    RGB (C=3) or grey "L" (C=1), resized bicubically so the shorter side is R and centre-cropped to R x R.
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
