"""Sampler quality against network evaluations (NFE), and the samplers' own per-step overhead.

    python benchmarks/samplers.py                          # exact-denoiser settings + overhead (~2-3 min)
    python benchmarks/samplers.py --ckpt runs/demo/run     # ... plus the trained digits model (~4-5 min in all)
    python benchmarks/samplers.py --quick                  # smaller sample counts and repeats, a smoke test

Settings (each sampler of the registry at NFE 5, 10, 20, 50, 100; steps = spec.steps_for_nfe(nfe), pc with
corrector_steps=1, ald with its defaults, rk45 by sweeping rtol = atol and taking the run whose reported NFE
is nearest; a cell is skipped when the achievable NFE is more than 30 % off the target, or repeats the step
count of a smaller target):

* 2-D: exact denoiser of 8 Gaussians (std 0.08, equal weights) on the unit circle; Karras grid (sigma 0.002 to
  80, rho 7), and for the samplers with a grid of their own (`SamplerSpec.grid`: log-SNR) that grid too, as extra
  rows; 4,000 samples from x = 80 N(0, I) (same start for every sampler); error = sliced 2-Wasserstein distance
  (256 directions) to 20,000 exact mixture samples.
* 64-D: exact denoiser of 4 Gaussians (std 0.5, equal weights) at random means of norm 3 (seed 0); 2,000
  samples; error = Frechet distance of the raw 64-D vectors to 20,000 exact samples.
* 64-D on DDPM's default grid: the same mixture on the linear-schedule DDPM's respaced timesteps (sigma 0.01 to
  157, starting from 157 N(0, I)), with dpmpp_2m and dpmpp_2m_sde also without the step-ratio rule (as before
  issue 15).
  All three also report the mode-weight error: total variation between the share of samples assigned to each
  component (posterior at sigma = 0) and the true weights. The floor is the mean of 5 sets of fresh exact samples.
  The deterministic samplers also get the PF-ODE endpoint error: RMS distance per sample to the exact ODE
  solution from the same start (rk45 at rtol = atol = 1e-9), which has no sampling-noise floor.
* digits (with --ckpt): Frechet distance of the digits classifier's features (digits_quality) for 450 samples
  (seeds 0..449, PerSampleNoise; `Pipeline.sample`) on the model's default grid (`pipe.sigmas(steps)`: respaced
  DDPM timesteps for the demo's DDPM model) at NFE 5, 10, 20, 50 for ddim, euler, heun, dpmpp_2m, dpmpp_3m, unipc,
  lms, euler_ancestral, ddpm.
* overhead: wall time of each sampler with a zero-cost denoiser (returns a cached tensor) on a batch of 16
  3x32x32 images, against one forward call of the `tiny` U-Net at 32x32x3 on the same batch (no grad);
  median over interleaved repeats; per step and per network evaluation, as % of the U-Net call.

Stochastic samplers draw their noise from a seeded GeneratorNoise (toy settings). Writes
benchmarks/results/samplers.md and samplers_{2d,64d,64d_ddpm,digits}.png. Runs on 1 CPU thread by default (--threads):
on a shared 2-core machine, 2 threads were up to 15x slower for the digits U-Net under load.
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from difflab.errors import DifflabError
from difflab.eval.frechet import feature_statistics, frechet_distance
from difflab.eval.toy_metrics import sliced_wasserstein
from difflab.oracles import GaussianMixtureDenoiser
from difflab.sampling import SAMPLERS, GeneratorNoise, SamplerSpec, multistep
from difflab.schedules import karras_sigmas, log_snr_sigmas

NFES = (5, 10, 20, 50, 100)
DIGITS_NFES = (5, 10, 20, 50)
DIGITS_SAMPLERS = ("ddim", "euler", "heun", "dpmpp_2m", "dpmpp_3m", "unipc", "lms", "euler_ancestral", "ddpm")
OPTIONS: dict[str, dict] = {"pc": {"corrector_steps": 1}}
VARIANTS: dict[str, tuple[dict, ...]] = {"unipc": ({"order": 3},)}  # extra rows with these options
RK45_TOLS = (1.0, 0.3, 0.1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5)
NFE_TOLERANCE = 0.3  # skip a cell whose achievable NFE is more than 30 % off the target
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
GOAL_NFE, EULER_NFE, FLOOR_NFE, FLOOR_MARGIN = 10, 50, 20, 0.10
FLOOR_SETS = 5  # fresh exact sample sets averaged for the floor
ODE_SAMPLERS = ("ddim", "euler", "heun", "dpmpp_2m", "dpmpp_3m", "unipc", "lms", "rk45")  # deterministic (ddim: eta 0)
NO_RATIO_RULE = " [no step-ratio rule]"  # dpmpp_2m(_sde) as before issue 15, for the respaced grid's before/after


class CountingDenoiser:
    """Wraps a denoiser and counts its calls (checks each sampler's declared cost)."""

    def __init__(self, denoiser):
        self.denoiser, self.calls = denoiser, 0

    def __call__(self, x, sigma, cond=None):
        self.calls += 1
        return self.denoiser(x, sigma, cond)


@dataclass
class Cell:
    target: int
    nfe: int  # network evaluations actually made
    error: float  # main metric; nan if the run failed
    modes: float = float("nan")  # mode-weight total variation (toy settings)
    ode: float = float("nan")  # RMS distance to the exact PF-ODE solution from the same start (ODE samplers)
    note: str = ""


@dataclass
class Setting:
    key: str
    title: str
    metric: str
    targets: tuple[int, ...]
    cells: dict[str, dict[int, Cell]] = field(default_factory=dict)
    floor: float = float("nan")
    floor_sd: float = float("nan")
    floor_modes: float = float("nan")
    ode_level: float = float("nan")  # the metric of the exact PF-ODE endpoint from the same start
    notes: list[str] = field(default_factory=list)
    sweep: list[tuple[float, int, float]] = field(default_factory=list)  # rk45: (rtol, nfe, error)
    seconds: float = 0.0


def plan_steps(spec: SamplerSpec, targets: tuple[int, ...], options: dict) -> dict[int, tuple[int, int] | str]:
    """target NFE -> (steps, nfe) or the reason it is skipped."""
    plan: dict[int, tuple[int, int] | str] = {}
    used: set[int] = set()
    for target in targets:
        try:
            steps = spec.steps_for_nfe(target, options)
        except DifflabError:
            plan[target] = f"one step costs {spec.nfe(1, options)} NFE"
            continue
        nfe = spec.nfe(steps, options)
        if abs(nfe / target - 1) > NFE_TOLERANCE:
            plan[target] = f"nearest NFE {nfe} (steps {steps})"
        elif steps in used:
            plan[target] = f"same steps ({steps}) as a smaller target"
        else:
            plan[target] = (steps, nfe)
            used.add(steps)
    return plan


def mode_error(oracle: GaussianMixtureDenoiser, x: torch.Tensor) -> float:
    """Total variation between the share of samples per component (posterior at sigma = 0) and the weights."""
    r = oracle.responsibilities(x.double(), torch.zeros(x.shape[0], dtype=torch.float64))
    shares = torch.bincount(r.argmax(1), minlength=len(oracle.weights)).double() / x.shape[0]
    return float(0.5 * (shares - oracle.weights).abs().sum())


def sliced_w2_to(reference: torch.Tensor):
    return lambda x: sliced_wasserstein(x, reference)


def frechet_to(reference: torch.Tensor):
    mu, cov = feature_statistics(reference)  # once: np.cov of 20k x 64 is not free
    return lambda x: frechet_distance(*feature_statistics(x), mu, cov)


def toy_grid(grid: str, steps: int) -> torch.Tensor:
    """The toy settings' grids over sigma 0.002..80: Karras (rho 7), or a sampler's own grid (log-SNR)."""
    fn = {"karras": karras_sigmas, "log_snr": log_snr_sigmas}[grid]
    return fn(steps, SIGMA_MIN, SIGMA_MAX).double()


def ddpm_grid(grid: str, steps: int) -> torch.Tensor:
    """DDPM's grids (linear schedule, sigma 0.01..157): its default respaced timesteps, or a sampler's own grid."""
    from difflab.formulations import make_config, make_formulation

    return make_formulation(make_config("ddpm")).sigmas(steps, grid).double()


def rows(default_grid: str, before_after: bool = False) -> list[tuple[str, str, str, dict]]:
    """(label, sampler, grid, options): every sampler on the setting's grid (and its VARIANTS), those with a grid of
    their own on it too, and with `before_after` dpmpp_2m(_sde) without the step-ratio rule of `multistep_order`
    (as before issue 15)."""
    out = []
    for name, spec in SAMPLERS.items():
        if spec.family != "diffusion":
            continue
        grids = [default_grid] + ([spec.grid] if spec.grid and spec.grid != default_grid else [])
        for options in ({}, *VARIANTS.get(name, ())):
            variant = " ".join(f"{k}={v}" for k, v in options.items())
            for grid in grids:
                label = " ".join(part for part in (name, variant, f"@ {grid}" if grid != default_grid else "") if part)
                out.append((label, name, grid, OPTIONS.get(name, {}) | options))
        if before_after and name in ("dpmpp_2m", "dpmpp_2m_sde"):
            out.append((name + NO_RATIO_RULE, name, default_grid, OPTIONS.get(name, {})))
    return out


@contextmanager
def no_ratio_rule(active: bool):
    saved = multistep.MAX_STEP_RATIO
    multistep.MAX_STEP_RATIO = math.inf if active else saved
    try:
        yield
    finally:
        multistep.MAX_STEP_RATIO = saved


def run_toy(key: str, title: str, oracle: GaussianMixtureDenoiser, n: int, metric_name: str, metric_to, seed: int,
            grid_fn=toy_grid, default_grid: str = "karras", before_after: bool = False) -> Setting:  # fmt: skip
    """Every registered sampler (`rows`) at every target NFE on the exact denoiser `oracle` (float64), starting from
    sigma_max N(0, I) of the grid; grid_fn(grid, steps) -> sigmas. metric_to(reference) -> metric(samples) -> error."""
    setting = Setting(key, title, metric_name, NFES)
    start_time = time.perf_counter()
    reference = oracle.sample(20_000, torch.Generator().manual_seed(seed + 1))
    metric = metric_to(reference)
    floors = [metric(oracle.sample(n, torch.Generator().manual_seed(seed + 2 + k))) for k in range(FLOOR_SETS)]
    setting.floor, setting.floor_sd = statistics.mean(floors), statistics.stdev(floors)
    setting.floor_modes = mode_error(oracle, oracle.sample(n, torch.Generator().manual_seed(seed + 2)))
    d = oracle.means.shape[1]
    ends = grid_fn(default_grid, 2)
    sigma_max = float(ends[0])
    x0 = sigma_max * torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    # the PF-ODE map of x0, to 1e-9 tolerance: a noise-free error for the deterministic samplers
    ode_end = SAMPLERS["rk45"].fn(oracle, x0.clone(), ends, rtol=1e-9, atol=1e-9)
    setting.ode_level = metric(ode_end)

    def evaluate(label: str, spec: SamplerSpec, sigmas: torch.Tensor, options: dict, target: int, nfe: int) -> Cell:
        counter = CountingDenoiser(oracle)
        noise = GeneratorNoise(torch.Generator().manual_seed(seed + 3 + FLOOR_SETS))
        info: dict = {}
        extra = {"info": info} if spec.cost is None else {}
        try:
            with no_ratio_rule(label.endswith(NO_RATIO_RULE)):
                x = spec.fn(counter, x0.clone(), sigmas, noise=noise, **options, **extra)
        except DifflabError as err:
            setting.notes.append(f"{label} at NFE {target}: raised {err}")
            return Cell(target, counter.calls, float("nan"), note="error")
        actual = info.get("nfe", counter.calls)
        if actual != counter.calls or (nfe and actual != nfe):
            setting.notes.append(
                f"{label} at NFE {target}: declared NFE {nfe or info.get('nfe')}, counted {counter.calls} calls"
            )
        if not torch.isfinite(x).all():
            setting.notes.append(f"{label} at NFE {target}: non-finite samples ({int((~torch.isfinite(x)).sum())})")
            return Cell(target, actual, float("nan"), note="diverged")
        deterministic = spec.name in ODE_SAMPLERS
        ode = float((x - ode_end).pow(2).sum(1).mean().sqrt()) if deterministic else float("nan")
        return Cell(target, counter.calls, metric(x), mode_error(oracle, x), ode)

    for label, name, grid, options in rows(default_grid, before_after):
        spec = SAMPLERS[name]
        row: dict[int, Cell] = {}
        if spec.cost is None:  # adaptive: sweep the tolerance, keep the run nearest each target
            runs = []
            for tol in RK45_TOLS:
                cell = evaluate(label, spec, ends, {"rtol": tol, "atol": tol}, 0, 0)  # only the ends matter
                runs.append((tol, cell))
                setting.sweep.append((tol, cell.nfe, cell.error))
            taken: set[float] = set()
            for target in NFES:
                tol, cell = min(runs, key=lambda r: (abs(math.log(r[1].nfe / target)), r[0]))
                if abs(cell.nfe / target - 1) > NFE_TOLERANCE or tol in taken:
                    setting.notes.append(f"{label} at NFE {target}: skipped (nearest NFE {cell.nfe}, rtol {tol:g})")
                    continue
                taken.add(tol)
                row[target] = Cell(target, cell.nfe, cell.error, cell.modes, cell.ode, note=f"rtol {tol:g}")
        else:
            for target, planned in plan_steps(spec, NFES, options).items():
                if isinstance(planned, str):
                    setting.notes.append(f"{label} at NFE {target}: skipped ({planned})")
                    continue
                steps, nfe = planned
                row[target] = evaluate(label, spec, grid_fn(grid, steps), options, target, nfe)
        setting.cells[label] = row
    setting.seconds = time.perf_counter() - start_time
    return setting


def gmm_2d() -> GaussianMixtureDenoiser:
    angles = torch.arange(8, dtype=torch.float64) * 2 * math.pi / 8
    means = torch.stack([angles.cos(), angles.sin()], dim=1)
    return GaussianMixtureDenoiser(means, torch.full((8,), 0.08, dtype=torch.float64), torch.ones(8).double())


def gmm_64d() -> GaussianMixtureDenoiser:
    means = torch.randn(4, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    means = 3.0 * means / means.norm(dim=1, keepdim=True)
    return GaussianMixtureDenoiser(means, torch.full((4,), 0.5, dtype=torch.float64), torch.ones(4).double())


def describe_formulation(pipe) -> str:
    """The model's formulation as the report names it: name, then schedule and prediction where it has them
    ("ddpm linear eps-prediction")."""
    config = pipe.config.formulation
    words = [pipe.formulation.name] + [str(getattr(config, k)) for k in ("schedule",) if hasattr(config, k)]
    if hasattr(config, "prediction"):
        words.append(f"{config.prediction}-prediction")
    return " ".join(words)


def run_digits(ckpt: str, n: int) -> Setting:
    import difflab
    from difflab.eval.digits_classifier import load_digits_classifier
    from difflab.eval.quality import digits_quality

    start_time = time.perf_counter()
    pipe = difflab.load(ckpt)
    classifier = load_digits_classifier()
    setting = Setting(
        "digits",
        f"Digits (trained `{ckpt}`, step {pipe.step}; {describe_formulation(pipe)}; default grid; {n} samples)",
        "Frechet distance (classifier features)",
        DIGITS_NFES,
    )
    for name in DIGITS_SAMPLERS:
        spec, options = SAMPLERS[name], OPTIONS.get(name, {})
        row: dict[int, Cell] = {}
        for target, planned in plan_steps(spec, DIGITS_NFES, options).items():
            if isinstance(planned, str):
                setting.notes.append(f"{name} at NFE {target}: skipped ({planned})")
                continue
            steps, nfe = planned
            stats: dict = {}
            try:  # one batch: stats["nfe"] is the number of network calls
                x = pipe.sample(n, seed=0, sampler=name, steps=steps, batch_size=n, stats=stats, **options)
            except DifflabError as err:  # e.g. a noise-adding sampler on a Poisson-kernel model
                setting.notes.append(f"{name} at NFE {target}: raised {err}")
                row[target] = Cell(target, 0, float("nan"), note="error")
                continue
            calls = int(stats["nfe"])
            if calls != nfe:
                setting.notes.append(f"{name} at NFE {target}: declared NFE {nfe}, counted {calls} calls")
            if not torch.isfinite(x).all():
                setting.notes.append(f"{name} at NFE {target}: non-finite samples")
                row[target] = Cell(target, calls, float("nan"), note="diverged")
                continue
            q = digits_quality(x, classifier)
            setting.floor = q["frechet_floor"]
            row[target] = Cell(target, calls, q["frechet"])
            print(f"  digits {name:16s} NFE {calls:3d}: FD {q['frechet']:.2f}", flush=True)
        setting.cells[name] = row
    grid = ", ".join(f"{s:.3g}" for s in pipe.sigmas(5).tolist())
    setting.notes.append(f"default grid at 5 steps: [{grid}]")
    setting.seconds = time.perf_counter() - start_time
    return setting


def run_overhead(repeats: int, target_nfe: int = 50) -> tuple[list[tuple[str, int, int, float, float]], float]:
    """Per sampler: (name, steps, nfe, % per step, % per NFE) of a tiny U-Net call; and the U-Net time (s)."""
    from difflab.nets.unet import UNet, unet_preset

    net = UNet(unet_preset("tiny", 32, 3)).eval()
    batch = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    c_noise = torch.zeros(16)
    cached = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))

    def zero_cost(x, sigma, cond=None):
        return cached

    plans = {}
    for name, spec in SAMPLERS.items():
        options = dict(OPTIONS.get(name, {}))
        if spec.cost is None:
            plans[name] = (1, options | {"rtol": 1e-3, "atol": 1e-3}, karras_sigmas(2, SIGMA_MIN, SIGMA_MAX))
        else:
            steps = spec.steps_for_nfe(target_nfe, options)
            plans[name] = (steps, options, karras_sigmas(steps, SIGMA_MIN, SIGMA_MAX))

    def run(name: str) -> tuple[float, int]:
        steps, options, sigmas = plans[name]
        spec, info = SAMPLERS[name], {}
        extra = {"info": info} if spec.cost is None else {}
        counter = CountingDenoiser(zero_cost)
        x0 = SIGMA_MAX * batch
        noise = GeneratorNoise(torch.Generator().manual_seed(2))
        start = time.perf_counter()
        spec.fn(counter, x0, sigmas, noise=noise, **options, **extra)
        return time.perf_counter() - start, counter.calls

    times: dict[str, list[float]] = {name: [] for name in plans}
    nfes: dict[str, int] = {}
    unet_times = []
    with torch.no_grad():
        for _ in range(2):  # warm-up
            net(batch, c_noise)
            for name in plans:
                run(name)
        for _ in range(repeats):
            start = time.perf_counter()
            net(batch, c_noise)
            unet_times.append(time.perf_counter() - start)
            for name in plans:
                seconds, nfes[name] = run(name)
                times[name].append(seconds)
    unet = statistics.median(unet_times)
    rows = []
    for name, (steps, _, _) in plans.items():
        t = statistics.median(times[name])
        per_step = 100 * t / steps / unet if SAMPLERS[name].cost is not None else float("nan")
        rows.append((name, steps if SAMPLERS[name].cost is not None else 0, nfes[name], per_step,
                     100 * t / nfes[name] / unet))  # fmt: skip
    return rows, unet


def fmt(value: float) -> str:
    if not math.isfinite(value):
        return "nan"
    return f"{value:.3g}" if abs(value) >= 1e-3 else f"{value:.2e}"


def table(setting: Setting, attr: str = "error", floor: float | None = None) -> str:
    floor_label = "real digits (floor)" if setting.key == "digits" else "exact samples (floor)"
    lines = [
        "| sampler | " + " | ".join(f"NFE {t}" for t in setting.targets) + " |",
        "|---|" + "---|" * len(setting.targets),
    ]
    for name, row in setting.cells.items():
        if attr == "ode" and name.split()[0] not in ODE_SAMPLERS:
            continue
        cells = []
        for target in setting.targets:
            cell = row.get(target)
            if cell is None:
                cells.append("-")
                continue
            text = fmt(getattr(cell, attr)) if not cell.note or cell.note.startswith("rtol") else cell.note
            if cell.nfe != target:
                text += f" ({cell.nfe})"
            cells.append(text)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if floor is not None:
        lines.append(f"| {floor_label} | " + " | ".join(fmt(floor) for _ in setting.targets) + " |")
    if attr == "error" and math.isfinite(setting.ode_level):
        level = fmt(setting.ode_level)
        lines.append("| exact PF-ODE endpoint | " + " | ".join(level for _ in setting.targets) + " |")
    return "\n".join(lines)


def best_at(setting: Setting, target: int, attr: str = "error") -> tuple[float, str, int] | None:
    """(value, row label, NFE) of the best row at `target` NFE using at most that many evaluations; the
    before-issue-15 rows do not compete."""
    candidates = [
        (getattr(cell, attr), name, cell.nfe)
        for name, row in setting.cells.items()
        if not name.endswith(NO_RATIO_RULE)
        and (cell := row.get(target)) is not None
        and cell.nfe <= target
        and math.isfinite(getattr(cell, attr))
    ]
    return min(candidates) if candidates else None


def goal_check(setting: Setting, attr: str = "error") -> list[str]:
    """The issue's goals: the best sampler at 10 NFE at or below Euler at 50 NFE (on the cells' `attr`), and, on the
    main metric, the best at 20 NFE within 10 % of the floor (the mean of FLOOR_SETS fresh exact sample sets)."""
    key = setting.key if attr == "error" else f"{setting.key} (PF-ODE endpoint error, ODE samplers)"
    euler = setting.cells.get("euler", {}).get(EULER_NFE)
    best = best_at(setting, GOAL_NFE, attr)
    if best is None or euler is None or not math.isfinite(getattr(euler, attr)):
        return [f"{key}: not enough data for the goal check"]
    (error, name, nfe), reference = best, getattr(euler, attr)
    lines = [
        f"{key}: best at {GOAL_NFE} NFE is {name} ({nfe} NFE) with {fmt(error)}; euler at {EULER_NFE} NFE has "
        f"{fmt(reference)} (ratio {error / reference:.2f}) -> goal {'HOLDS' if error <= reference else 'does NOT hold'}"
    ]
    if attr == "error" and (best := best_at(setting, FLOOR_NFE)) is not None:
        (error, name, nfe), bound = best, (1 + FLOOR_MARGIN) * setting.floor
        lines.append(
            f"{key}: best at {FLOOR_NFE} NFE is {name} ({nfe} NFE) with {fmt(error)}; exact samples "
            f"{fmt(setting.floor)} +- {fmt(setting.floor_sd)} (ratio {error / setting.floor:.2f}; exact PF-ODE "
            f"endpoint {fmt(setting.ode_level)}) -> goal {'HOLDS' if error <= bound else 'does NOT hold'}"
        )
    return lines


def plot(setting: Setting, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.8))
    for i, (name, row) in enumerate(setting.cells.items()):
        points = sorted((c.nfe, c.error) for c in row.values() if math.isfinite(c.error) and c.error > 0)
        if name == "rk45" and setting.sweep:
            points = sorted((n, e) for _, n, e in setting.sweep if math.isfinite(e) and e > 0)
        if points:
            style = "-" if i < 10 else "--"
            ax.plot(*zip(*points, strict=True), style, marker="o", ms=3, label=name)
    if math.isfinite(setting.floor) and setting.floor > 0:
        ax.axhline(setting.floor, color="k", ls=":", lw=1, label="exact/real floor")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("network evaluations (NFE)")
    ax.set_ylabel(setting.metric)
    ax.set_title(setting.title, fontsize=8)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default=None, help="a trained digits run folder, e.g. runs/demo/run")
    parser.add_argument("--n2d", type=int, default=4000)
    parser.add_argument("--n64d", type=int, default=2000)
    parser.add_argument("--n-digits", type=int, default=450)
    parser.add_argument("--repeats", type=int, default=11, help="interleaved repeats for the overhead timing")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is steadier on a busy machine)")
    parser.add_argument("--quick", action="store_true", help="1,000 / 500 / 100 samples, 3 repeats: a smoke test")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    if args.quick:
        args.n2d, args.n64d, args.n_digits, args.repeats = 1000, 500, 100, 3
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    command = "python benchmarks/samplers.py " + " ".join(sys.argv[1:])
    machine = (
        f"{platform.machine()} CPU ({platform.processor() or 'unknown'}), no GPU, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s)"
    )
    date = datetime.date.today().isoformat()

    settings: list[Setting] = []
    print("2-D mixture ...", flush=True)
    settings.append(
        run_toy("2d", f"2-D: 8 Gaussians on the unit circle, std 0.08, exact denoiser, {args.n2d} samples",
                gmm_2d(), args.n2d, "sliced W2 to 20k exact samples", sliced_w2_to, seed=0)
    )  # fmt: skip
    print(f"  {settings[-1].seconds:.0f} s", flush=True)
    print("64-D mixture ...", flush=True)
    settings.append(
        run_toy("64d", f"64-D: 4 Gaussians, means of norm 3, std 0.5, exact denoiser, {args.n64d} samples",
                gmm_64d(), args.n64d, "Frechet distance to 20k exact samples", frechet_to, seed=10)
    )  # fmt: skip
    print(f"  {settings[-1].seconds:.0f} s", flush=True)
    print("64-D mixture on DDPM's respaced grid ...", flush=True)
    settings.append(
        run_toy("64d_ddpm", "64-D mixture on DDPM's default grid (linear schedule, respaced timesteps, sigma "
                f"0.01..157), {args.n64d} samples", gmm_64d(), args.n64d, "Frechet distance to 20k exact samples",
                frechet_to, seed=10, grid_fn=ddpm_grid, default_grid="respaced", before_after=True)
    )  # fmt: skip
    print(f"  {settings[-1].seconds:.0f} s", flush=True)
    digits_note = ""
    if args.ckpt is None:
        digits_note = "Digits: skipped (pass --ckpt runs/demo/run to include a trained model)."
    elif not Path(args.ckpt).exists():
        digits_note = f"Digits: skipped, '{args.ckpt}' does not exist (train one with `make demo`)."
    else:
        print("digits ...", flush=True)
        settings.append(run_digits(args.ckpt, args.n_digits))
        print(f"  {settings[-1].seconds:.0f} s", flush=True)
    print("overhead ...", flush=True)
    overhead, unet_seconds = run_overhead(args.repeats)

    parts = [
        "# Samplers: quality against NFE, and overhead",
        "",
        f"Command: `{command.strip()}`. Machine: {machine}. Date: {date}.",
        "",
        "Cells: error at the target NFE; `(n)` gives the NFE actually used where it differs from the target "
        f"(rk45: nearest run of an rtol = atol sweep; others: spec.steps_for_nfe). `-`: skipped (see notes). "
        f"Karras grid sigma {SIGMA_MIN:g}..{SIGMA_MAX:g} (rho 7) for the toy settings; `name @ log_snr`: the same "
        "sampler on the grid it gets when none is named (`SamplerSpec.grid`: uniform in log sigma over the same "
        f"range); `unipc order=3`: with that option. `{NO_RATIO_RULE.strip()}`: dpmpp_2m(_sde) as before issue 15. "
        f"pc uses corrector_steps=1, ald its defaults. Floor: the mean +- sd of {FLOOR_SETS} sets of fresh exact "
        "samples; the exact PF-ODE endpoint row is the metric of the exact ODE solution from the samplers' start "
        "(what a deterministic sampler converges to).",
    ]
    goal_lines = []
    for setting in settings:
        parts += ["", f"## {setting.title}", "", f"Error: {setting.metric}. ({setting.seconds:.0f} s)", ""]
        parts.append(table(setting, "error", setting.floor))
        if setting.key != "digits":
            parts += ["", "Mode-weight error (total variation of the per-component shares):", ""]
            parts.append(table(setting, "modes", setting.floor_modes))
            parts += [
                "",
                "PF-ODE endpoint error of the deterministic samplers (RMS distance per sample to the ODE "
                "solution from the same start, rk45 at rtol = atol = 1e-9; free of sampling noise):",
                "",
            ]
            parts.append(table(setting, "ode"))
        else:
            parts += [
                "",
                f"Real-vs-real floor (as many train digits as samples vs the test digits): {fmt(setting.floor)}.",
            ]
        if setting.sweep:
            sweep = ", ".join(f"{tol:g}: {nfe} / {fmt(err)}" for tol, nfe, err in setting.sweep)
            parts += ["", f"rk45 sweep (rtol = atol: NFE / error): {sweep}."]
        if setting.notes:
            parts += ["", "Notes:", ""] + [f"- {note}" for note in setting.notes]
        goal_lines += goal_check(setting)
        if setting.key != "digits":
            goal_lines += goal_check(setting, "ode")
        plot(setting, out / f"samplers_{setting.key}.png")
    if digits_note:
        parts += ["", digits_note]
    parts += [
        "",
        f"## Goals: the best sampler at {GOAL_NFE} NFE at or below Euler at {EULER_NFE} NFE; at {FLOOR_NFE} NFE within "
        f"{100 * FLOOR_MARGIN:.0f} % of the exact samples' floor",
        "",
        "(Candidates: every row of the setting (a sampler on the Karras grid or on its own grid) with at most that "
        f"many NFE; Euler at {EULER_NFE} NFE on the setting's default grid.)",
        "",
    ]
    parts += [f"- {line}" for line in goal_lines]
    parts += [
        "",
        "## Overhead per step without the network",
        "",
        f"Zero-cost denoiser (a cached tensor) on a batch of 16 x 3x32x32, Karras grid at about 50 NFE, against one "
        f"`tiny` U-Net (32x32x3) forward on the same batch without gradients ({1000 * unet_seconds:.1f} ms here); "
        f"medians of {args.repeats} interleaved repeats. Goal: < 5 % per step.",
        "",
        "| sampler | steps | NFE | overhead per step (% of a U-Net call) | per NFE (%) | < 5 % |",
        "|---|---|---|---|---|---|",
    ]
    for name, steps, nfe, per_step, per_nfe in overhead:
        check = per_step if math.isfinite(per_step) else per_nfe
        parts.append(f"| {name} | {steps or 'adaptive'} | {nfe} | {fmt(per_step) if steps else 'n/a'} | "
                     f"{fmt(per_nfe)} | {'yes' if check < 5 else 'NO'} |")  # fmt: skip
    total = time.perf_counter() - started
    parts += ["", f"Total runtime: {total:.0f} s.", ""]
    report = "\n".join(parts)
    print(report)
    (out / "samplers.md").write_text(report)
    print(f"wrote {out / 'samplers.md'} and the plots in {out}")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
