"""Tests for difflab.viz: uint8 conversion, grids, PNG metadata round trip, and figure files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.errors import DifflabError
from difflab.viz import (
    images_to_uint8,
    make_grid,
    read_png_metadata,
    save_denoising_figure,
    save_image_grid,
    save_loss_curve,
    save_scatter,
)
from difflab.viz.figures import _ema


def test_images_to_uint8_values_and_clamp() -> None:
    # 0 -> round(127.5) = 128 (half-to-even rounding); values outside [-1, 1] are clamped.
    x = torch.tensor([-1.0, 0.0, 1.0, -5.0, 7.0, 0.5]).reshape(1, 1, 1, 6)
    out = images_to_uint8(x)
    assert out.dtype == np.uint8
    assert out.shape == (1, 1, 6, 1)
    assert out[0, 0, :, 0].tolist() == [0, 128, 255, 0, 255, 191]


def test_images_to_uint8_channel_last_rgb() -> None:
    x = torch.full((2, 3, 4, 5), -1.0)
    x[1, 2] = 1.0  # blue channel of the second image
    out = images_to_uint8(x)
    assert out.shape == (2, 4, 5, 3)
    assert (out[0] == 0).all()
    assert (out[1, :, :, 2] == 255).all() and (out[1, :, :, :2] == 0).all()


@pytest.mark.parametrize("shape", [(2, 2, 4, 4), (4, 4), (0, 1, 4, 4)])
def test_images_to_uint8_rejects_bad_shapes(shape: tuple[int, ...]) -> None:
    with pytest.raises(DifflabError):
        images_to_uint8(torch.zeros(shape))


def _four_images() -> torch.Tensor:
    """Four grey 2x2 images; image i has uint8 values 10*i + (0, 1, 2, 3) in raster order. (4, 1, 2, 2)"""
    u8 = torch.tensor([[10 * i + j for j in range(4)] for i in range(4)], dtype=torch.float32)
    return (u8 / 127.5 - 1.0).reshape(4, 1, 2, 2)


def test_make_grid_layout_and_pixels() -> None:
    grid = make_grid(_four_images(), nrow=2, padding=1, pad_value=1.0)
    assert grid.shape == (7, 7, 1)
    g = grid[:, :, 0]
    # cell (row r, col c) holds image 2r + c at top-left (1 + 3r, 1 + 3c)
    for i in range(4):
        r, c = divmod(i, 2)
        y, x = 1 + 3 * r, 1 + 3 * c
        assert g[y : y + 2, x : x + 2].tolist() == [[10 * i, 10 * i + 1], [10 * i + 2, 10 * i + 3]]
    # padding lines (rows/cols 0, 3, 6) are pad_value = 1.0 -> 255
    for k in (0, 3, 6):
        assert (g[k, :] == 255).all() and (g[:, k] == 255).all()


def test_make_grid_default_nrow_and_empty_cells() -> None:
    imgs = torch.ones(5, 3, 2, 3)  # 5 white images -> ceil(sqrt(5)) = 3 per row, 2 rows
    grid = make_grid(imgs, padding=2)  # pad_value -1 -> 0
    assert grid.shape == (2 * (2 + 2) + 2, 3 * (3 + 2) + 2, 3)
    assert (grid[2:4, 2:5] == 255).all()
    last = grid[6:8, 12:15]  # 6th cell is unused: pad colour
    assert (last == 0).all()
    assert int(grid.sum()) == 5 * 2 * 3 * 3 * 255


def test_make_grid_rejects_bad_args() -> None:
    with pytest.raises(DifflabError):
        make_grid(torch.zeros(2, 1, 2, 2), nrow=0)
    with pytest.raises(DifflabError):
        make_grid(torch.zeros(2, 1, 2, 2), padding=-1)


def test_save_image_grid_grey_round_trip(tmp_path: Path) -> None:
    meta = {"seed": 7, "sampler": "heun", "steps": 18, "sigmas": [80.0, 0.002], "model": {"ch": 32}}
    path = save_image_grid(_four_images(), tmp_path / "sub" / "dir" / "g.png", nrow=2, metadata=meta, upscale=4)
    assert path == tmp_path / "sub" / "dir" / "g.png" and path.is_file()
    with Image.open(path) as img:
        img.load()
        assert img.mode == "L"
        assert img.size == (28, 28)
        arr = np.asarray(img)
        text = dict(img.text)
    # nearest-neighbour upscale: grid pixel (1, 4) = image 1's top-left (10) covers a 4x4 block
    assert (arr[4:8, 16:20] == 10).all()
    assert (arr[0:4, :] == 0).all()
    assert read_png_metadata(path) == meta
    assert text["difflab"] == json.dumps(meta, sort_keys=True)
    assert text["seed"] == "7" and text["sampler"] == "heun" and text["sigmas"] == "[80.0, 0.002]"


def test_save_image_grid_rgb_no_metadata(tmp_path: Path) -> None:
    imgs = torch.zeros(3, 3, 8, 8)
    imgs[:, 0] = 1.0
    path = save_image_grid(imgs, tmp_path / "rgb.png")
    with Image.open(path) as img:
        assert img.mode == "RGB"
        # 3 images -> 2 per row, 2 rows, padding 1
        assert img.size == (2 * 9 + 1, 2 * 9 + 1)
        assert img.getpixel((1, 1)) == (255, 128, 128)
    assert read_png_metadata(path) == {}


def test_save_image_grid_rejects_bad_input(tmp_path: Path) -> None:
    imgs = torch.zeros(1, 1, 2, 2)
    with pytest.raises(DifflabError):
        save_image_grid(imgs, tmp_path / "a.png", upscale=0)
    with pytest.raises(DifflabError):
        save_image_grid(imgs, tmp_path / "b.png", metadata={"x": object()})
    with pytest.raises(DifflabError):
        save_image_grid(imgs, tmp_path / "c.png", metadata={"difflab": 1})
    assert not list(tmp_path.iterdir())


def test_read_png_metadata_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DifflabError):
        read_png_metadata(tmp_path / "nope.png")


def _png_size(path: Path) -> tuple[int, int]:
    assert path.is_file() and path.stat().st_size > 1000
    with Image.open(path) as img:
        assert img.format == "PNG"
        return img.size


def test_save_scatter(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    pts = torch.randn(500, 2, generator=gen)
    ref = np.random.default_rng(0).normal(size=(300, 2))
    w, h = _png_size(save_scatter(pts, tmp_path / "s" / "scatter.png", reference=ref, title="x"))
    assert w > 200 and h > 200
    w2, _ = _png_size(save_scatter(pts.numpy(), tmp_path / "plain.png"))
    assert w2 > 200
    with pytest.raises(DifflabError):
        save_scatter(torch.zeros(10, 3), tmp_path / "bad.png")


def test_ema_bias_corrected() -> None:
    assert np.allclose(_ema(np.full(10, 3.0), span=5), 3.0)
    out = _ema(np.array([1.0, 0.0, 0.0]), span=3)  # beta = 0.5
    assert out[0] == pytest.approx(1.0)
    assert out[1] == pytest.approx(0.25 / 0.75)
    assert out[2] == pytest.approx(0.125 / 0.875)


def test_save_loss_curve(tmp_path: Path) -> None:
    steps = list(range(0, 2000, 10))
    losses = [1.0 / (1 + s / 100) + 0.01 * ((s // 10) % 3) for s in steps]
    w, _ = _png_size(save_loss_curve(steps, losses, tmp_path / "loss.png"))
    assert w > 200
    with pytest.raises(DifflabError):
        save_loss_curve([1, 2, 3], [0.1, 0.2], tmp_path / "bad.png")


def test_save_denoising_figure(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    sigmas = [80.0, 5.0, 0.5]
    xt = [torch.randn(2, 1, 8, 8, generator=gen) * 3 for _ in sigmas]  # out of range: clamped
    x0 = [torch.rand(2, 1, 8, 8, generator=gen) * 2 - 1 for _ in sigmas]
    w, h = _png_size(save_denoising_figure(xt, x0, sigmas, tmp_path / "d" / "denoise.png"))
    assert w > 200 and h > 200
    rgb = [torch.zeros(1, 3, 8, 8) for _ in sigmas]
    w, _ = _png_size(save_denoising_figure(rgb, rgb, sigmas, tmp_path / "rgb.png"))
    assert w > 200


def test_save_denoising_figure_rejects_mismatch(tmp_path: Path) -> None:
    f = [torch.zeros(2, 1, 8, 8)] * 3
    with pytest.raises(DifflabError):
        save_denoising_figure(f, f[:2], [1.0, 2.0, 3.0], tmp_path / "a.png")
    with pytest.raises(DifflabError):
        save_denoising_figure(f, f, [1.0, 2.0], tmp_path / "b.png")
    with pytest.raises(DifflabError):
        save_denoising_figure([], [], [], tmp_path / "c.png")
    with pytest.raises(DifflabError):
        save_denoising_figure(f, [torch.zeros(3, 1, 8, 8)] * 3, [1.0, 2.0, 3.0], tmp_path / "d.png")
    assert not list(tmp_path.iterdir())
