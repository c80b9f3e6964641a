"""The figures of Poisson flow on 2-D data (Xu et al. 2022, Fig. 1-2): the data as charges on the z = 0 plane of the
3-D space (x1, x2, z), the field lines of their exact empirical field, the lines' endpoints spread uniformly on a
large hemisphere, and a trained model's backward flow from z_max down to the data (a GIF and a strip of frames).

The empirical field at (x, z) is proportional to (x - D(x, z), z), D the posterior mean of the charges under the
weights ||(x, z) - (y_i, 0)||^-3 (`PointSetDenoiser` with `PoissonKernel(1)`, the field PFGM trains on). In
t = log z a field line solves dx/dt = x - D: z grows along every line, so each line crosses the hemisphere of radius
R by t = log R. Matplotlib is used through Agg figures only (as in `difflab.viz`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib import animation, colormaps
from mpl_toolkits.mplot3d.art3d import Line3DCollection
from scipy.stats import kstest

from difflab.atomic import atomic_output
from difflab.errors import DifflabError
from difflab.generate import generate
from difflab.kernels import Kernel, PoissonKernel
from difflab.oracles import PointSetDenoiser
from difflab.sampling import PerSampleNoise
from difflab.types import Denoiser, StepInfo
from difflab.viz.figures import new_figure, points_2d, prepare_path, save_figure

__all__ = [
    "FieldLines",
    "Flow",
    "field_lines",
    "sample_with_flow",
    "save_backward_flow_gif",
    "save_backward_flow_strip",
    "save_hemisphere_figure",
    "save_poisson_field_figure",
    "uniformity",
]

DATA_COLOR, SAMPLE_COLOR, END_COLOR = "tab:red", "tab:blue", "navy"


@dataclass(frozen=True)
class FieldLines:
    """Field lines in (x1, x2, z): paths[b] (L_b, 3) runs from its start near the charges to its end on the
    hemisphere; ends (B, 3) lie on the hemisphere of radius `radius`; charges (K, 2) made the field. Lines started on
    the plane z = h cover the cap z > h: `floor` = h / radius is the smallest cos(polar angle) they reach (else 0)."""

    paths: list[np.ndarray]
    ends: np.ndarray
    radius: float
    charges: np.ndarray
    floor: float = 0.0

    @property
    def cos_polar(self) -> np.ndarray:
        """cos of the ends' angle to the z axis, (B,): uniform on [floor, 1] for ends uniform on the hemisphere."""
        return self.ends[:, 2] / self.radius

    @property
    def azimuth(self) -> np.ndarray:
        """The endpoints' azimuth in [0, 1) turns, (B,): uniform for points uniform on the hemisphere."""
        return np.mod(np.arctan2(self.ends[:, 1], self.ends[:, 0]) / (2 * math.pi), 1.0)

    def clipped(self, radius: float) -> FieldLines:
        """The same lines cut where they first leave the smaller hemisphere of `radius`."""
        if not 0 < radius <= self.radius:
            raise DifflabError(f"can only clip field lines to a radius in (0, {self.radius:g}], got {radius}")
        paths, ends = [], []
        for p in self.paths:
            k = int(np.argmax(np.linalg.norm(p, axis=1) >= radius))  # the first vertex outside (the last one is)
            end = p[0] if k == 0 else _chord_exit(torch.from_numpy(p[k - 1 : k]), torch.from_numpy(p[k : k + 1]),
                                                  radius)[0].numpy()  # fmt: skip
            paths.append(np.concatenate([p[:k], end[None]]))
            ends.append(end)
        return FieldLines(paths, np.stack(ends), float(radius), self.charges, self.floor * self.radius / radius)


def _chord_exit(old: torch.Tensor, new: torch.Tensor, radius: float) -> torch.Tensor:
    """Where the chords old -> new (B, 3), old inside the sphere of `radius` and new outside, cross it."""
    d = new - old
    qa, qb, qc = d.pow(2).sum(1), 2 * (old * d).sum(1), old.pow(2).sum(1) - radius**2
    a = ((-qb + (qb**2 - 4 * qa * qc).clamp(min=0).sqrt()) / (2 * qa)).clamp(0, 1)
    return old + a[:, None] * d


def field_lines(
    charges: torch.Tensor | np.ndarray,
    n_lines: int,
    radius: float,
    *,
    start_radius: float = 1e-3,
    start_height: float | None = None,
    step: float = 0.1,
    seed: int = 0,
    kernel: Kernel | None = None,
) -> FieldLines:
    """Field lines of the empirical Poisson field of `charges` (K, 2) on the z = 0 plane, each from next to the charges
    to the hemisphere ||(x, z)|| = `radius`, started where the field's flux passes, so their ends follow the flux
    through the hemisphere (uniform as radius -> inf).

    By default every charge carries the same flux, spread evenly over the directions of the upper half space around
    it: line b starts at a uniformly chosen charge y, at (y, 0) + `start_radius` u with u uniform on the upper unit
    hemisphere (exact as start_radius -> 0 against the charges' spacing). With `start_height` h, lines start on the
    plane z = h instead, where the flux density is the charges' mixture of PFGM++ kernels with D = 1 at r = h, i.e.
    at y + PoissonKernel(1).noise(h) (exact for any h; starts outside the ball are drawn again), and their ends
    cover the cap z > h of the hemisphere.

    The lines are integrated with RK4 in t = log z, steps of `step`; the last step is cut where its chord meets the
    hemisphere. `kernel` replaces the field's weights (to check that a wrong field gives non-uniform ends); default
    PoissonKernel(1), the empirical field PFGM trains on.
    """
    y = torch.as_tensor(points_2d(charges, "charges"))  # float64
    lowest = start_radius if start_height is None else start_height
    if n_lines < 1 or not radius > 0 or not 0 < lowest < radius or not step > 0:
        raise DifflabError(f"field_lines needs n_lines >= 1, radius > start radius or height > 0, step > 0; got "
                           f"{n_lines}, {radius}, {lowest}, {step}")  # fmt: skip
    field = PointSetDenoiser(y, kernel or PoissonKernel(1))
    rng = np.random.default_rng(seed)
    which = rng.choice(len(y), n_lines, replace=n_lines > len(y))
    if start_height is None:
        cos = np.clip(1.0 - rng.random(n_lines), 1e-6, 1.0)
        phi = 2 * math.pi * rng.random(n_lines)
        sin = np.sqrt(1.0 - cos**2)
        x = y[which] + start_radius * torch.from_numpy(np.stack([sin * np.cos(phi), sin * np.sin(phi)], 1))
        t = torch.from_numpy(np.log(start_radius * cos))
    else:
        generator, x, flux = torch.Generator().manual_seed(seed), y[which].clone(), PoissonKernel(1)
        redo = torch.ones(n_lines, dtype=torch.bool)
        while redo.any():
            x[redo] = y[which][redo] + flux.noise((int(redo.sum()), 2), start_height, generator, dtype=y.dtype)
            redo = x.pow(2).sum(1) + start_height**2 >= radius**2
        t = torch.full((n_lines,), math.log(start_height), dtype=y.dtype)

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # dx/dlog z
        return x - field(x, t.exp())

    pos = torch.cat([x, t.exp()[:, None]], 1)
    frames, last = [pos.clone()], torch.zeros(n_lines, dtype=torch.long)
    active = torch.arange(n_lines)
    for k in range(1, math.ceil((math.log(radius) - float(t.min())) / step) + 2):  # z alone reaches R by then
        if len(active) == 0:
            break
        xa, ta, h = x[active], t[active], step
        k1 = velocity(xa, ta)
        k2 = velocity(xa + h / 2 * k1, ta + h / 2)
        k3 = velocity(xa + h / 2 * k2, ta + h / 2)
        k4 = velocity(xa + h * k3, ta + h)
        x[active] = xa + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        t[active] = ta + h
        old, new = pos[active], torch.cat([x[active], t[active].exp()[:, None]], 1)
        out = new.norm(dim=1) >= radius
        pos[active] = torch.where(out[:, None], _chord_exit(old, new, radius), new)
        last[active] = k
        active = active[~out]
        frames.append(pos.clone())
    if len(active):
        raise AssertionError("a field line did not reach the hemisphere")  # impossible: z = e^t reaches R
    traj = torch.stack(frames).numpy()
    paths = [traj[: int(last[b]) + 1, b] for b in range(n_lines)]
    return FieldLines(paths, pos.numpy(), float(radius), y.numpy(), 0.0 if start_height is None else lowest / radius)


def uniformity(lines: FieldLines) -> dict[str, float]:
    """Kolmogorov-Smirnov distances (and p-values) of the ends' cos(polar angle) to U[floor, 1] and of their azimuth
    to U[0, 1]: both are uniform, and independent, exactly when the ends are uniform on the hemisphere (in 3-D; on
    its cap z > floor radius)."""
    cos = kstest(lines.cos_polar, "uniform", args=(lines.floor, 1 - lines.floor))
    az = kstest(lines.azimuth, "uniform")
    return {
        "lines": len(lines.paths),
        "radius": lines.radius,
        "cos_polar_ks": float(cos.statistic),
        "cos_polar_p": float(cos.pvalue),
        "azimuth_ks": float(az.statistic),
        "azimuth_p": float(az.pvalue),
    }


def _hemisphere_wireframe(ax, radius: float) -> None:
    for polar in np.radians([30, 60, 90]):
        a = np.linspace(0, 2 * math.pi, 97)
        r, z = radius * math.sin(polar), radius * math.cos(polar)
        ax.plot(r * np.cos(a), r * np.sin(a), np.full_like(a, z), color="0.6", lw=0.6, alpha=0.5)
    for az in np.radians(np.arange(0, 360, 30)):
        p = np.linspace(0, math.pi / 2, 25)
        ax.plot(radius * np.sin(p) * math.cos(az), radius * np.sin(p) * math.sin(az), radius * np.cos(p),
                color="0.6", lw=0.6, alpha=0.5)  # fmt: skip


def _axes3d(fig, spec, lim: float, top: float, elev: float = 22, azim: float = -62, zoom: float = 1.0):
    ax = fig.add_subplot(spec, projection="3d")
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_zlim(0, top)
    ax.set_box_aspect((1, 1, top / lim), zoom=zoom)
    ax.view_init(elev=elev, azim=azim)
    ax.set_xlabel("x1")
    ax.set_ylabel("x2")
    ax.set_zlabel("z")
    return ax


def save_poisson_field_figure(lines: FieldLines, path, *, shown: int = 150, title: str = "") -> Path:
    """The charges on the z = 0 plane, `shown` of the field lines (coloured by where on the data they start) and
    every line's endpoint on the hemisphere, drawn as a faint wireframe; returns the path."""
    r = lines.radius
    fig = new_figure(7.5, 6.5)
    ax = _axes3d(fig, fig.add_gridspec(1, 1)[0], r, r, elev=28)
    ax.computed_zorder = False  # drawn in this order: the data stay visible under the lines
    _hemisphere_wireframe(ax, r)
    c = lines.charges
    centre = c.mean(0)
    starts = np.stack([p[0, :2] for p in lines.paths[:shown]])
    hue = np.mod(np.arctan2(starts[:, 1] - centre[1], starts[:, 0] - centre[0]) / (2 * math.pi), 1.0)
    ax.add_collection3d(Line3DCollection(lines.paths[:shown], colors=colormaps["twilight"](hue), lw=0.7, alpha=0.8))
    ax.scatter(c[:, 0], c[:, 1], np.zeros(len(c)), s=2, c=DATA_COLOR, depthshade=False, label="data (charges)")
    e = lines.ends
    ax.scatter(e[:, 0], e[:, 1], e[:, 2], s=3, c=END_COLOR, depthshade=False, label="line ends")
    ax.legend(loc="upper left", fontsize=8, markerscale=3)
    ax.set_title(title or f"{len(c)} data points as charges on z = 0, their field lines to the hemisphere r = {r:g}")
    fig.tight_layout()
    return save_figure(fig, path)


def save_hemisphere_figure(lines: FieldLines, path) -> tuple[Path, dict[str, float]]:
    """How evenly the line ends cover the hemisphere: an equal-area view from above (uniform on the hemisphere =
    uniform on the disc of radius sqrt(2)) and histograms of cos(polar angle) and azimuth against the uniform
    density, with the Kolmogorov-Smirnov distances in the titles. Returns (path, `uniformity(lines)`)."""
    stats = uniformity(lines)
    cos, az = lines.cos_polar, lines.azimuth
    rho = np.sqrt(2 * (1 - cos))  # Lambert's azimuthal equal-area projection of the unit hemisphere
    fig = new_figure(13.0, 4.4)
    ax = fig.add_subplot(1, 3, 1)
    ring = np.linspace(0, 2 * math.pi, 200)
    ax.plot(math.sqrt(2) * np.cos(ring), math.sqrt(2) * np.sin(ring), color="0.5", lw=0.8)
    ax.scatter(rho * np.cos(2 * math.pi * az), rho * np.sin(2 * math.pi * az), s=4, c=END_COLOR, linewidths=0)
    ax.set_aspect("equal")
    ax.set_title("line ends seen from above (equal-area)", fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    for i, (values, label, key) in enumerate(((cos, "cos(polar angle)", "cos_polar"), (az, "azimuth / 2π", "azimuth"))):
        ax = fig.add_subplot(1, 3, 2 + i)
        ax.hist(values, bins=20, range=(0, 1), density=True, color=END_COLOR, alpha=0.6, label="line ends")
        ax.axhline(1.0, color="k", lw=1.2, ls="--", label="uniform on the hemisphere")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 2)
        ax.set_xlabel(label)
        ax.set_ylabel("density")
        ax.set_title(f"KS distance to uniform {stats[key + '_ks']:.3f} (p = {stats[key + '_p']:.2g})", fontsize=10)
        ax.legend(loc="upper right", fontsize=8)
    fig.suptitle(
        f"{len(cos)} field lines of the exact field of {len(lines.charges)} data points: their ends on the "
        f"hemisphere of radius {lines.radius:g}"
    )
    fig.tight_layout()
    return save_figure(fig, path), stats


@dataclass(frozen=True)
class Flow:
    """A recorded backward flow: x (F, B, 2) at heights z (F,), from z_max (the prior draw) down to 0 (the samples)."""

    z: np.ndarray
    x: np.ndarray


def sample_with_flow(
    denoiser: Denoiser,
    kernel: Kernel,
    sigmas: torch.Tensor,
    seeds: Sequence[int],
    *,
    shown: int = 400,
    frames: int = 30,
    sampler: str = "euler",
    options: dict | None = None,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, Flow]:
    """Samples (len(seeds), 2) of a 2-D model, and the flow of the first `shown` of them at `frames` heights evenly
    spaced along the grid `sigmas` (z_max ... 0; the prior draw first, the samples last)."""
    steps = len(sigmas) - 1
    keep = set(np.linspace(1, steps, frames - 1).round().astype(int).tolist())
    start = PerSampleNoise(list(seeds[:shown])).initial((2,), float(sigmas[0]), kernel=kernel)
    z, xs = [float(sigmas[0])], [start.numpy()]

    def record(info: StepInfo) -> None:
        if info.i + 1 in keep:
            z.append(info.sigma_next)
            xs.append(info.x[:shown].detach().cpu().double().numpy())

    samples = generate(denoiser, (2,), sigmas, seeds, sampler=sampler, options=options, kernel=kernel,
                       batch_size=len(seeds), device=device, callback=record)  # fmt: skip
    return samples, Flow(np.array(z), np.stack(xs))


def _flow_panels(fig, flow: Flow, j: int, reference: np.ndarray, lim: float, zoom: float, trails: int = 60):
    """Frame j as two panels: the points in (x1, x2, z) with the paths of the first `trails` so far, and the x plane
    around the data."""
    grid = fig.add_gridspec(1, 2, width_ratios=(1.35, 1), wspace=0.45)
    ax = _axes3d(fig, grid[0], lim, float(flow.z[0]), elev=20, zoom=1.25)
    ax.scatter(reference[:, 0], reference[:, 1], np.zeros(len(reference)), s=1, c="0.6", depthshade=False)
    x = np.clip(flow.x[: j + 1], -lim, lim)
    heights = np.broadcast_to(flow.z[: j + 1, None, None], (j + 1, x.shape[1], 1))
    paths = np.concatenate([x, heights], axis=2)[:, :trails].transpose(1, 0, 2)
    ax.add_collection3d(Line3DCollection(list(paths), colors=SAMPLE_COLOR, lw=0.5, alpha=0.3))
    ax.scatter(x[j, :, 0], x[j, :, 1], np.full(len(x[j]), flow.z[j]), s=3, c=SAMPLE_COLOR, depthshade=False)
    ax.set_title(f"(x, z) at z = {flow.z[j]:.3g}")
    flat = fig.add_subplot(grid[1])
    flat.scatter(reference[:, 0], reference[:, 1], s=2, c="0.75", linewidths=0, label="data")
    flat.scatter(flow.x[j][:, 0], flow.x[j][:, 1], s=4, c=SAMPLE_COLOR, linewidths=0, label="samples")
    flat.set_xlim(-zoom, zoom)
    flat.set_ylim(-zoom, zoom)
    flat.set_aspect("equal")
    flat.set_xlabel("x1")
    flat.set_ylabel("x2")
    flat.set_title(f"x at z = {flow.z[j]:.3g}")
    flat.legend(loc="upper right", fontsize=8, markerscale=3)


def save_backward_flow_gif(flow: Flow, reference, path, *, lim: float, zoom: float = 1.5, fps: int = 8) -> Path:
    """An animated GIF of the flow: per frame the points in (x1, x2, z) (x limited to [-lim, lim]) beside the x
    plane around the data ([-zoom, zoom]); the last frame (the samples) is held for a second. Returns the path."""
    ref = points_2d(reference, "reference")
    p = prepare_path(path)
    fig = new_figure(11.0, 5.0)
    writer = animation.PillowWriter(fps=fps)
    order = list(range(len(flow.z))) + [len(flow.z) - 1] * fps
    try:
        with atomic_output(p) as tmp, writer.saving(fig, tmp, dpi=80):
            for j in order:
                fig.clear()
                _flow_panels(fig, flow, j, ref, lim, zoom)
                fig.suptitle("PFGM backward flow: from the prior at z_max to the data plane z = 0")
                writer.grab_frame()
    finally:
        fig.clear()
    return p


def save_backward_flow_strip(flow: Flow, reference, path, *, frames: int = 8, zoom: float = 1.5) -> Path:
    """`frames` frames of the flow, evenly spaced from z_max to 0, each the x plane titled with its z."""
    ref = points_2d(reference, "reference")
    picks = np.linspace(0, len(flow.z) - 1, frames).round().astype(int)
    fig = new_figure(2.3 * frames, 2.7)
    for k, j in enumerate(picks):
        ax = fig.add_subplot(1, frames, k + 1)
        ax.scatter(ref[:, 0], ref[:, 1], s=1, c="0.75", linewidths=0)
        ax.scatter(flow.x[j][:, 0], flow.x[j][:, 1], s=2, c=SAMPLE_COLOR, linewidths=0)
        ax.set_xlim(-zoom, zoom)
        ax.set_ylim(-zoom, zoom)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"z = {flow.z[j]:.3g}", fontsize=10)
    fig.suptitle("backward flow, x plane (grey: data)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)
