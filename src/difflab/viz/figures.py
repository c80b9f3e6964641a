"""Figures: image grids with generation metadata, scatter plots, loss curves, the denoising process.

Images are torch tensors of shape (N, C, H, W) with float values in [-1, 1] and C in {1, 3}.
Matplotlib is used only through ``matplotlib.figure.Figure`` with the Agg canvas: no pyplot,
no windows, no global figure registry; every figure is cleared once written.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from difflab.atomic import atomic_output
from difflab.errors import DifflabError

__all__ = [
    "images_to_uint8",
    "make_grid",
    "read_png_metadata",
    "save_denoising_figure",
    "save_image_grid",
    "save_loss_curve",
    "save_scatter",
]

METADATA_KEY = "difflab"
_DPI = 100


def _check_images(images: torch.Tensor | np.ndarray, name: str = "images") -> torch.Tensor:
    """Return ``images`` as a float32 CPU tensor of shape (N, C, H, W), C in {1, 3}, or raise."""
    t = torch.as_tensor(images).detach().to("cpu", torch.float32)
    if t.ndim != 4 or t.shape[1] not in (1, 3):
        raise DifflabError(f"{name} must have shape (N, C, H, W) with C = 1 or 3, got {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[2] == 0 or t.shape[3] == 0:
        raise DifflabError(f"{name} is empty: shape {tuple(t.shape)}")
    return t


def images_to_uint8(images: torch.Tensor) -> np.ndarray:
    """Convert images in [-1, 1] to displayable bytes.

    images: (N, C, H, W) float, C in {1, 3}; values are clamped to [-1, 1].
    Returns (N, H, W, C) uint8 with ``round((x + 1) * 127.5)``; rounding is half-to-even,
    so -1 -> 0, 0 -> 128, 1 -> 255.
    """
    t = _check_images(images)
    return uint8_levels(t).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def uint8_levels(images: torch.Tensor) -> torch.Tensor:
    """Values in [-1, 1] (clamped; any shape) as the 256 levels of 8-bit data, round((x + 1) * 127.5), as floats;
    torch.round sends halves to the even level."""
    return torch.round((images.clamp(-1.0, 1.0) + 1.0) * 127.5)


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 1, pad_value: float = -1.0) -> np.ndarray:
    """Tile images into one picture.

    images: (N, C, H, W) float in [-1, 1]. ``nrow`` is the number of images per grid row
    (default ``ceil(sqrt(N))``, capped at N); there are ``ceil(N / nrow)`` grid rows. ``padding`` pixels of
    ``pad_value`` (in [-1, 1] units) surround every cell, outer border included, and fill unused cells.
    Returns (rows * (H + padding) + padding, nrow * (W + padding) + padding, C) uint8.
    """
    pix = images_to_uint8(images)
    n, h, w, c = pix.shape
    ncol = math.ceil(math.sqrt(n)) if nrow is None else nrow
    if ncol < 1:
        raise DifflabError(f"nrow must be >= 1, got {nrow}")
    if padding < 0:
        raise DifflabError(f"padding must be >= 0, got {padding}")
    ncol = min(ncol, n)
    nrows = math.ceil(n / ncol)
    fill = int(round((min(max(pad_value, -1.0), 1.0) + 1.0) * 127.5))
    grid = np.full((nrows * (h + padding) + padding, ncol * (w + padding) + padding, c), fill, np.uint8)
    for i in range(n):
        r, col = divmod(i, ncol)
        y = padding + r * (h + padding)
        x = padding + col * (w + padding)
        grid[y : y + h, x : x + w] = pix[i]
    return grid


def _png_texts(metadata: dict[str, Any], parameters: str | None = None) -> dict[str, str]:
    """PNG text chunks: ``difflab`` = sorted JSON of ``metadata``, one chunk per key, and ``parameters`` (the
    AUTOMATIC1111 convention) when given."""
    if not isinstance(metadata, dict):
        raise DifflabError(f"metadata must be a dict, got {type(metadata).__name__}")
    try:
        texts = {METADATA_KEY: json.dumps(metadata, sort_keys=True)}
    except (TypeError, ValueError) as e:
        raise DifflabError(f"metadata must be JSON-serialisable: {e}") from e
    for key, value in metadata.items():
        k = str(key)
        if k == METADATA_KEY:
            raise DifflabError(f"metadata key {METADATA_KEY!r} is reserved")
        if not 1 <= len(k) <= 79:
            raise DifflabError(f"metadata key {k!r} must be 1-79 characters (PNG text chunk keyword)")
        texts[k] = str(value)
    if parameters is not None:
        texts["parameters"] = parameters
    return texts


def _png_info(metadata: dict[str, Any], parameters: str | None = None) -> PngInfo:
    """The chunks of `_png_texts` as Pillow's PngInfo."""
    info = PngInfo()
    for key, value in _png_texts(metadata, parameters).items():
        info.add_text(key, value)
    return info


def prepare_path(path: str | Path) -> Path:
    """Return ``path`` as a Path after creating its parent directories."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def save_image_grid(
    images: torch.Tensor,
    path: str | Path,
    *,
    nrow: int | None = None,
    metadata: dict[str, Any] | None = None,
    upscale: int = 1,
    parameters: str | None = None,
    padding: int = 1,
) -> Path:
    """Write images (N, C, H, W) in [-1, 1] as one PNG grid (see ``make_grid``); returns the path.

    C = 1 is saved as mode "L", C = 3 as "RGB". ``upscale`` (int >= 1) enlarges every pixel to an
    ``upscale x upscale`` block (nearest neighbour). ``metadata`` is stored as PNG text: a ``difflab``
    chunk with ``json.dumps(metadata, sort_keys=True)`` (read back by ``read_png_metadata``) and one
    chunk per key holding ``str(value)``, so ordinary image viewers show e.g. "seed" and "sampler".
    """
    if not isinstance(upscale, int) or upscale < 1:
        raise DifflabError(f"upscale must be an integer >= 1, got {upscale!r}")
    info = _png_info(metadata, parameters) if metadata is not None else None
    grid = make_grid(images, nrow=nrow, padding=padding)
    if upscale > 1:
        grid = grid.repeat(upscale, axis=0).repeat(upscale, axis=1)
    # uint8 (H, W) becomes mode "L" and uint8 (H, W, 3) mode "RGB".
    img = Image.fromarray(np.ascontiguousarray(grid[:, :, 0] if grid.shape[2] == 1 else grid))
    p = Path(path)
    with atomic_output(p) as tmp:
        img.save(tmp, format="PNG", pnginfo=info)
    return p


def save_image_gif(frames: torch.Tensor, path: str | Path, *, upscale: int = 1, duration_ms: int = 250,
                   bounce: bool = True) -> Path:  # fmt: skip
    """An animated GIF of image frames (K, C, H, W) in [-1, 1], each enlarged `upscale` times (nearest neighbour),
    `duration_ms` per frame, looping; `bounce` plays the frames forwards then backwards."""
    pixels = images_to_uint8(frames)  # (K, H, W, C)
    if upscale > 1:
        pixels = pixels.repeat(upscale, axis=1).repeat(upscale, axis=2)
    images = [Image.fromarray(np.ascontiguousarray(f[:, :, 0] if f.shape[2] == 1 else f)) for f in pixels]
    if bounce and len(images) > 2:
        images = images + images[-2:0:-1]
    p = Path(path)
    with atomic_output(p) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=duration_ms, loop=0)
    return p


def read_png_metadata(path: str | Path) -> dict[str, Any]:
    """Return the dict stored by ``save_image_grid`` in the PNG's ``difflab`` chunk ({} if none)."""
    p = Path(path)
    if not p.is_file():
        raise DifflabError(f"no such image file: {p}")
    try:
        with Image.open(p) as img:
            img.load()
            text = dict(getattr(img, "text", {}) or {})
    except OSError as e:
        raise DifflabError(f"cannot read image {p}: {e}") from e
    blob = text.get(METADATA_KEY)
    if blob is None:
        return {}
    try:
        data = json.loads(blob)
    except json.JSONDecodeError as e:
        raise DifflabError(f"{p}: the {METADATA_KEY!r} text chunk is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise DifflabError(f"{p}: the {METADATA_KEY!r} text chunk is not a JSON object")
    return data


def new_figure(width_in: float, height_in: float) -> Figure:
    """Return a Figure with an Agg canvas attached (never shown on screen)."""
    fig = Figure(figsize=(width_in, height_in), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | Path, texts: dict[str, str] | None = None) -> Path:
    """Write ``fig`` as PNG to ``path`` (parents created; complete or not at all, see `difflab.atomic`), with PNG
    text chunks ``texts`` if given, then clear it to release its artists."""
    p = Path(path)
    try:
        with atomic_output(p) as tmp:
            fig.savefig(tmp, format="png", dpi=_DPI, metadata=texts)
    finally:
        fig.clear()
    return p


def points_2d(points: torch.Tensor | np.ndarray, name: str) -> np.ndarray:
    """Return ``points`` as a float64 numpy array of shape (N, 2), or raise DifflabError."""
    if isinstance(points, torch.Tensor):
        points = points.detach().to("cpu", torch.float64).numpy()
    arr = np.asarray(points, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise DifflabError(f"{name} must have shape (N, 2), got {arr.shape}")
    return arr


def save_scatter(
    points: torch.Tensor | np.ndarray,
    path: str | Path,
    *,
    reference: torch.Tensor | np.ndarray | None = None,
    title: str = "",
    lim: float = 1.5,
    metadata: dict[str, Any] | None = None,
    parameters: str | None = None,
) -> Path:
    """Scatter-plot 2-D points (N, 2), optionally over grey ``reference`` points (M, 2); returns the path.

    Equal aspect, both axes limited to [-lim, lim]; small translucent markers. ``metadata`` and ``parameters`` are
    stored as PNG text chunks as ``save_image_grid`` stores them (read back by ``read_png_metadata``).
    """
    texts = _png_texts(metadata, parameters) if metadata is not None else None
    pts = points_2d(points, "points")
    ref = points_2d(reference, "reference") if reference is not None else None
    if not lim > 0:
        raise DifflabError(f"lim must be > 0, got {lim}")
    fig = new_figure(5.0, 5.0)
    ax = fig.add_subplot(1, 1, 1)
    if ref is not None:
        ax.scatter(ref[:, 0], ref[:, 1], s=3, c="0.7", alpha=0.4, linewidths=0, label="reference")
    ax.scatter(pts[:, 0], pts[:, 1], s=3, c="tab:blue", alpha=0.6, linewidths=0, label="samples")
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    if title:
        ax.set_title(title)
    if ref is not None:
        ax.legend(loc="upper right", markerscale=4, fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, texts)


def _ema(values: np.ndarray, span: int) -> np.ndarray:
    """Bias-corrected exponential moving average of a 1-D array (N,) with decay ``1 - 2 / (span + 1)``."""
    beta = 1.0 - 2.0 / (span + 1.0)
    out = np.empty_like(values, dtype=np.float64)
    acc = 0.0
    for i, v in enumerate(values):
        acc = beta * acc + (1.0 - beta) * float(v)
        out[i] = acc / (1.0 - beta ** (i + 1))
    return out


def save_loss_curve(
    steps: Sequence[int], losses: Sequence[float], path: str | Path, *, title: str = "training loss"
) -> Path:
    """Plot losses (N,) against steps (N,): raw values light, an EMA on top; returns the path.

    The y-axis is logarithmic when all finite losses are positive (linear otherwise); non-finite
    losses are dropped. The EMA span is about 1/20 of the number of points (at least 1).
    """
    x = np.asarray(steps, dtype=np.float64).reshape(-1)
    y = np.asarray(losses, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise DifflabError(f"steps and losses differ in length: {x.size} vs {y.size}")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if x.size == 0:
        raise DifflabError("no finite loss values to plot")
    fig = new_figure(6.0, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(x, y, color="tab:blue", alpha=0.25, linewidth=0.8, label="loss")
    ax.plot(x, _ema(y, max(1, y.size // 20)), color="tab:blue", linewidth=1.8, label="moving average")
    if np.all(y > 0):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper right")
    fig.tight_layout()
    return save_figure(fig, path)


def _check_frames(
    frames_xt: Sequence[torch.Tensor], frames_x0: Sequence[torch.Tensor], sigmas: Sequence[float]
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Validate the trajectory; return per-point uint8 arrays (K, H, W, C) for x_t and x0_hat."""
    n = len(frames_xt)
    if n == 0 or len(frames_x0) != n or len(sigmas) != n:
        raise DifflabError(
            "frames_xt, frames_x0 and sigmas must be non-empty and of equal length, got "
            f"{len(frames_xt)}, {len(frames_x0)}, {len(sigmas)}"
        )
    xt = [images_to_uint8(_check_images(f, f"frames_xt[{j}]")) for j, f in enumerate(frames_xt)]
    x0 = [images_to_uint8(_check_images(f, f"frames_x0[{j}]")) for j, f in enumerate(frames_x0)]
    shape = xt[0].shape
    for j in range(n):
        if xt[j].shape != shape or x0[j].shape != shape:
            raise DifflabError(f"all frames must share one shape (K, C, H, W); point {j} differs from point 0")
    return xt, x0


def save_denoising_figure(
    frames_xt: Sequence[torch.Tensor],
    frames_x0: Sequence[torch.Tensor],
    sigmas: Sequence[float],
    path: str | Path,
    *,
    upscale: int = 4,
) -> Path:
    """Show the denoising process for K seeds along J trajectory points; returns the path.

    frames_xt[j], frames_x0[j]: (K, C, H, W) at noise level sigmas[j]; x_t should already be scaled
    to about [-1, 1] (e.g. divided by sqrt(1 + sigma^2)); both are clamped to [-1, 1] for display.
    Layout: 2K rows (per seed k: "seed k x_t" then "x0_hat") by J columns titled "sigma=...".
    ``upscale`` sets the displayed size: each image cell is about ``upscale * max(H, W)`` pixels
    (at least 64).
    """
    if not isinstance(upscale, int) or upscale < 1:
        raise DifflabError(f"upscale must be an integer >= 1, got {upscale!r}")
    xt, x0 = _check_frames(frames_xt, frames_x0, sigmas)
    k, h, w, c = xt[0].shape
    ncols = len(xt)
    cell_in = max(64, upscale * max(h, w)) / _DPI
    fig = new_figure(ncols * cell_in + 1.2, 2 * k * cell_in + 0.5)
    axes = fig.subplots(2 * k, ncols, squeeze=False)
    for j in range(ncols):
        for s in range(k):
            for row, (frames, label) in enumerate(((xt, f"seed {s} x_t"), (x0, "x0_hat"))):
                ax = axes[2 * s + row, j]
                img = frames[j][s]
                if c == 1:
                    ax.imshow(img[:, :, 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
                else:
                    ax.imshow(img, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if j == 0:
                    ax.set_ylabel(label, fontsize=8)
        axes[0, j].set_title(f"σ={float(sigmas[j]):.3g}", fontsize=8)
    fig.tight_layout(pad=0.3)
    return save_figure(fig, path)


def save_quality_vs_nfe(
    series: dict[str, Sequence[tuple[int, float]]], path: str | Path, *, metric: str = "FID", title: str = ""
) -> Path:
    """One line per sampler: metric against network evaluations (log-log); series maps name -> [(nfe, value)]."""
    if not series or not any(series.values()):
        raise DifflabError("nothing to plot: no (nfe, value) pairs were given")
    fig = new_figure(6.0, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    for name, points in series.items():
        nfe, value = zip(*sorted(points), strict=True)
        ax.plot(nfe, value, marker="o", label=name)
    ax.set_xscale("log")
    if all(v > 0 for pts in series.values() for _, v in pts):
        ax.set_yscale("log")
    ax.set_xlabel("network evaluations (NFE)")
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} vs NFE")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)
