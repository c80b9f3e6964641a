"""Training data users can trust (issue 11): 16-bit PNGs keep their levels, EXIF orientation is applied, symlinked
sub-folders are followed without looping, special files are skipped without hanging, and size settings outside
`difflab.limits` are refused before any work."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import difflab
from difflab.config import DataConfig, RunConfig
from difflab.data.folder import find_image_files, load_image_folder
from difflab.errors import DifflabError
from difflab.formulations import make_config
from difflab.images import read_image
from difflab.nets import ModelConfig, model_config_for


def _levels(images) -> np.ndarray:
    """[-1, 1] tensors back to 0..255 pixel levels."""
    return np.rint((images.numpy() + 1) * 127.5).astype(int)


def _png16(path: Path, pixels: np.ndarray) -> None:
    """Write a 16-bit PNG by hand (Pillow cannot write 16-bit RGB): pixels uint16 (H, W, 1 or 3)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w, c = pixels.shape
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)
    header = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 3: 2}[c], 0, 0, 0)
    data = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + data)


GREY_16 = np.array([[0, 2570, 32896, 65535]] * 4, dtype=np.uint16)  # 8-bit levels 0, 10, 128, 255


def test_a_16_bit_grey_png_keeps_its_levels(tmp_path):
    """Pillow reads it as mode I;16; its convert("L") clips at 255, which made 99.6 % of a real image white."""
    Image.fromarray(GREY_16).save(tmp_path / "pillow.png")
    _png16(tmp_path / "hand.png", GREY_16[..., None])
    assert Image.open(tmp_path / "pillow.png").mode == "I;16"
    grey = _levels(load_image_folder(tmp_path, 4, channels=1))
    assert grey.shape == (2, 1, 4, 4) and (grey[:, 0] == [0, 10, 128, 255]).all()
    rgb = _levels(load_image_folder(tmp_path, 4, channels=3))
    assert (rgb == [0, 10, 128, 255]).all()


def test_a_16_bit_rgb_png_keeps_its_levels(tmp_path):
    pixels = np.zeros((4, 4, 3), dtype=np.uint16)
    pixels[..., 0], pixels[..., 1], pixels[..., 2] = 65535, 32896, 2570
    _png16(tmp_path / "rgb16.png", pixels)
    levels = _levels(load_image_folder(tmp_path, 4, channels=3))[0]
    assert (levels[0] == 255).all() and (levels[1] == 128).all() and (levels[2] == 10).all()


def _marked(path: Path, orientation: int | None) -> None:
    """A black 4x4 PNG with a white top-left pixel, stored with an EXIF orientation tag."""
    image = Image.fromarray(np.pad(np.full((1, 1), 255, np.uint8), ((0, 3), (0, 3))))
    exif = image.getexif()
    if orientation is not None:
        exif[0x0112] = orientation
    image.save(path, exif=exif)


@pytest.mark.parametrize(("orientation", "white"), [(None, (0, 0)), (6, (0, 3)), (8, (3, 0)), (3, (3, 3))])
def test_exif_orientation_is_applied(tmp_path, orientation, white):
    """6: shown rotated 90 degrees clockwise, so the top-left pixel is shown top-right; 8: counter-clockwise; 3: 180."""
    _marked(tmp_path / "a.png", orientation)
    grey = _levels(load_image_folder(tmp_path, 4, channels=1))[0, 0]
    assert grey[white] == 255 and grey.sum() == 255
    edit = _levels(read_image(tmp_path / "a.png", 4, 1))[0, 0]  # images given to inpainting / img2img too
    assert (edit == grey).all()


def _image(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (4, 4), value).save(path)


def test_symlinked_sub_folders_are_followed_once_without_looping(tmp_path):
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    _image(data / "a.png", 10)
    _image(elsewhere / "deep" / "b.png", 20)
    (data / "linked").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "deep" / "up").symlink_to(data, target_is_directory=True)  # data -> linked -> deep -> up -> data ...
    (data / "self").symlink_to(".", target_is_directory=True)
    (data / "again").symlink_to(elsewhere / "deep", target_is_directory=True)  # a second way into deep/
    found = find_image_files(data)
    assert [p.name for p in found] == ["a.png", "b.png"]
    assert sorted(_levels(load_image_folder(data, 4, channels=1))[:, 0, 0, 0]) == [10, 20]


def test_special_files_with_image_names_are_skipped_without_hanging(tmp_path):
    _image(tmp_path / "a.png", 10)
    os.mkfifo(tmp_path / "fifo.png")
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    assert [p.name for p in find_image_files(tmp_path)] == ["a.png"]


def test_training_sizes_beyond_the_limits_are_refused_before_any_work(tmp_path):
    _image(tmp_path / "a.png", 10)
    with pytest.raises(DifflabError, match="image resolution 4096 is above difflab's limit of 1024"):
        load_image_folder(tmp_path, 4096)
    with pytest.raises(DifflabError, match=r"formulation\.timesteps \(--timesteps\) is 1000000000, outside"):
        make_config("ddpm", timesteps=10**9)
    with pytest.raises(DifflabError, match=r"train\.batch_size is 1000000, outside difflab's limits 1\.\.65536"):
        difflab.run_config(difflab.load_dataset("moons", toy_size=64), batch_size=10**6)
    with pytest.raises(DifflabError, match=r"data\.resolution is 2048, outside difflab's limits 1\.\.1024"):
        DataConfig("x", "images", (1, 2048, 2048), 2048, 1)
    with pytest.raises(DifflabError, match=r"model\.settings\.num_res_blocks is 17, outside difflab's limits 1\.\.16"):
        ModelConfig("unet", _unet_with(num_res_blocks=17))
    with pytest.raises(DifflabError, match=r"model\.settings\.channels must be an integer, got 32\.0"):
        ModelConfig("unet", _unet_with(channels=32.0))
    assert RunConfig(DataConfig("x", "points", (2,)), model_config_for("points", (2,)), make_config("ddpm"))


def _unet_with(**changes):
    from dataclasses import replace

    return replace(model_config_for("images", (1, 8, 8), "tiny").settings, **changes)
