"""Poisson flow against Gaussian diffusion: sample quality against NFE at an equal training budget.

    python benchmarks/pfgm.py                           # heart + digits (~45 min on 1 CPU thread of a busy machine)
    python benchmarks/pfgm.py --data heart moons digits # ... plus moons (~12 min more)
    python benchmarks/pfgm.py --quick                   # tiny budgets and sample counts: a smoke test (~3 min)

Tests the claim that PFGM (Xu et al. 2022) matches diffusion quality with 10-20x fewer sampling steps.

Models, trained from scratch on each data set with the same budget: the same network (MLP preset `tiny` for the
2-D toys, U-Net preset `tiny` for the 8x8 digits), the same number of steps, network batch (256 toys / 128
digits), lr (1e-3), warm-up, EMA (0.999) and seed (0); each model's own objective and prior:

* pfgm: the original Poisson flow (field regression, Alg. 2). Its network sees the same batch as the others
  (small_batch), but the target field of each step is the empirical field of 1,024 data points (the charges).
* pfgmpp-D, D in {1, 8, 64, 2048}: PFGM++ (EDM's loss and preconditioning, Poisson kernel with D extra dims).
  Needs the library's upper-only clip of B ~ Beta(N/2, D/2) (commit 510ec1b): the PFGM++ reference clips B into
  [1e-3, 1 - 1e-3], and in 2-D with D = 2048 (B's mean 1/1025) the lower bound moved 64 % of the training draws
  to radius >= 1.43 sigma; pfgmpp-2048 on heart then converged to a sliced W2 of 0.34 against EDM's 0.025.
* edm: Karras et al. 2022 (Gaussian kernel, sigma 0.002..80).
* vp: the VP SDE (Song et al. 2021), eps-prediction, continuous time.

Samplers (rows), each on the model's default grid (pfgm: uniform in log z from z_max to 1e-3; others: Karras,
rho 7) and starting from the model's prior (Poisson kernel for pfgm/pfgmpp, Gaussian otherwise):

* pfgm: `euler` with log_sigma (PFGM's forward Euler in t = log z), `heun`, `rk45` (adaptive; PFGM's own solver).
* pfgmpp-D and edm: `heun` (Karras et al. Alg. 2, 2n - 1 NFE for n steps), `rk45`.
* vp: `ddpm` (the ancestral / reverse-diffusion step, 1 NFE per step), `euler_maruyama` (reverse SDE) and `heun`
  on its probability-flow ODE (not a baseline of the claim; separates the sampler from the process).

Fixed-step rows run at target NFE 4, 6, 10, 20, 35, 50, 100, 200 (stochastic rows also 500; digits stop at 100,
stochastic rows at 500, to keep the run short) with steps = spec.steps_for_nfe(nfe); a cell repeating a smaller
target's step count is skipped. rk45 rows sweep rtol = atol (1e-2, 1e-3, 1e-4; digits 1e-2, 1e-3) and report the
NFE each run actually used.

Quality: 2-D: sliced 2-Wasserstein distance (256 directions) of --n-toy samples to the 20,000 points of the test
split, floor = a fresh real draw of --n-toy points against the same test points; also the share of samples with a
coordinate beyond 1.5 (outliers: the data lie in [-1, 1]). Digits: Frechet distance of the digits classifier's
features of 450 samples to the 450 test digits, floor = 450 train digits (`digits_quality`), and the share
classified with confidence >= 0.9. Samples use seeds 0..n-1 (PerSampleNoise), one batch (rk45's step size is
shared by a batch). The metric's noise: edm heun at 35 NFE and vp ddpm at 100 NFE are measured again with seeds
n..2n-1 and 2n..3n-1.

Verdict ("matches diffusion quality with k x fewer steps"): a baseline row B (vp ddpm, vp euler_maruyama, edm heun)
converges to c, the mean of its two largest-NFE cells; the target is floor + (1 + tol) (c - floor), i.e. an
excess over the real-vs-real floor at most tol = 50 % above B's converged excess (the excess counts at least 5 %
of the floor). A row's NFE to the target is the smallest NFE from which every larger-NFE cell of the row meets it
(a lucky early cell does not count); a model's is the smallest over its rows (its best sampler). The ratio
NFE(B) / NFE(model) is the "k x fewer steps"; the claim holds against B where it is >= 10. Also reported: the
ratios at tol 0.2 and 1.0, and each row's NFE to converge (the same rule with its own converged value).

Trained runs are kept in --runs (default runs/pfgm_bench/<data>_<model>_<steps>) and reused when their final
checkpoint exists. Writes benchmarks/results/pfgm.{md,json} and pfgm_<data>.png (--quick: pfgm_quick*);
--from-json benchmarks/results/pfgm.json rewrites the report and plots from a saved run without sampling.
Runs on 1 CPU thread by default (--threads): on the shared 2-core machine 2 threads were several times slower.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

import difflab
from difflab.data import TOY_NAMES, load_dataset, sample_toy
from difflab.errors import DifflabError
from difflab.eval.toy_metrics import sliced_wasserstein
from difflab.pipeline import Pipeline
from difflab.sampling import SAMPLERS
from difflab.training.checkpoint import latest_checkpoint
from difflab.training.run import run_config, train_run
from difflab.training.trainer import read_log

# (key, process, aug_dim)
MODELS = [("pfgm", "pfgm", None)] + [(f"pfgmpp-{d}", "pfgmpp", d) for d in (1, 8, 64, 2048)]
MODELS += [("edm", "edm", None), ("vp", "vp", None)]
# model key -> rows (sampler, options, label)
ROWS: dict[str, list[tuple[str, dict, str]]] = {
    "pfgm": [("euler", {"log_sigma": True}, "euler (log z)"), ("heun", {}, "heun"), ("rk45", {}, "rk45")],
    "vp": [("ddpm", {}, "ddpm (ancestral)"), ("euler_maruyama", {}, "euler_maruyama"), ("heun", {}, "heun")],
}
DEFAULT_ROWS = [("heun", {}, "heun"), ("rk45", {}, "rk45")]
ODE_NFES = (4, 6, 10, 20, 35, 50, 100, 200)
SDE_NFES = ODE_NFES + (500,)
DIGITS_MAX_NFE = {"ode": 100, "sde": 500}
FLOOR_SEED = 2_000_003  # the floor's fresh real draw (training data: seed 0; test split: seed 1,000,003)
OUTLIER = 1.5  # toy data lie in [-1, 1]^2; a sample with a coordinate beyond 1.5 counts as an outlier
RK45_TOLS = (1e-2, 1e-3, 1e-4)
DIGITS_RK45_TOLS = (1e-2, 1e-3)
SPREAD = {"edm": ("heun", 35), "vp": ("ddpm", 100)}  # cells re-measured on two more seed sets (metric noise)
BASELINES = [("vp", "ddpm"), ("vp", "euler_maruyama"), ("edm", "heun")]
TOL = 0.5  # the target: excess over the floor at most 50 % above the baseline's converged excess
SENSITIVITY = (0.2, 1.0)
MIN_EXCESS = 0.05  # ... with the excess counted as at least 5 % of the floor
PLOT_TOP = 50  # the plots show quality up to 50 x the floor
CLAIM = 10  # the article's "10-20x fewer steps": holds where the ratio is >= 10
LR = 1e-3


@dataclass
class Cell:
    nfe: float
    value: float  # nan: diverged or failed
    extra: dict = field(default_factory=dict)  # rk45: rtol; digits: confident share
    note: str = ""
    target: int = 0  # the target NFE of a fixed-step cell (0: rk45)


@dataclass
class Row:
    model: str
    sampler: str
    label: str
    cells: list[Cell] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.model} {self.label}"

    def points(self) -> list[tuple[float, float]]:
        return sorted((c.nfe, c.value) for c in self.cells)

    def converged(self) -> float:
        """What the sampler gives with plenty of steps: the mean of the row's two largest-NFE cells."""
        tail = [v for _, v in self.points()[-2:]]
        return sum(tail) / len(tail) if tail else math.nan


@dataclass
class Result:
    data: str
    metric: str
    floor: float
    n: int
    train: dict = field(default_factory=dict)  # model -> {steps, final_loss, skipped, seconds}
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    spread: dict = field(default_factory=dict)  # "edm heun @ 35": [value for seeds 0.., n.., 2n..]


# ---- training ----------------------------------------------------------------------------------------------


def train_or_load(data: str, key: str, process: str, aug_dim: int | None, steps: int, runs: Path) -> tuple:
    """The EMA model of one (data, model) pair, trained unless a finished run exists; and its training summary."""
    run_dir = runs / f"{data}_{key}_{steps}"
    ckpt = latest_checkpoint(run_dir) if run_dir.exists() else None
    seconds = math.nan
    if ckpt is None or ckpt.name != f"step_{steps:08d}":
        shutil.rmtree(run_dir, ignore_errors=True)
        start = time.perf_counter()
        dataset = load_dataset(data, resolution=8 if data == "digits" else None)
        # the data kind's default batch (pfgm: 1,024 charges, its network batch the usual one); aug_dim: pfgmpp only
        config = run_config(dataset, process=process, model="tiny", steps=steps, lr=LR, seed=0,
                            checkpoint_every=10 * steps, aug_dim=aug_dim)  # fmt: skip
        train_run(config, run_dir, data=dataset, device="cpu", progress=False)
        seconds = time.perf_counter() - start
    log = read_log(run_dir)
    tail = [r["loss"] for r in log[-8:]]
    summary = {
        "steps": steps,
        "final_loss": sum(tail) / len(tail) if tail else math.nan,
        "skipped_steps": log[-1].get("skipped_steps", 0) if log else 0,
        "train_seconds": seconds if math.isfinite(seconds) else (log[-1].get("elapsed_s") if log else None),
    }
    return difflab.load(run_dir), summary


# ---- sampling ----------------------------------------------------------------------------------------------


def quality_fn(data: str, n: int):
    """samples -> (value, extra); and the floor."""
    if data == "digits":
        from difflab.eval.digits_classifier import load_digits_classifier
        from difflab.eval.quality import digits_quality

        classifier = load_digits_classifier()
        floor = digits_quality(torch.zeros(n, 1, 8, 8), classifier)["frechet_floor"]

        def measure(x: torch.Tensor) -> tuple[float, dict]:
            q = digits_quality(x, classifier)
            return q["frechet"], {"confident": q["confident_share"]}

        return measure, floor, "Frechet distance (digits classifier features)"
    reference = load_dataset(data, split="test").data  # 20,000 held-out points
    floor = sliced_wasserstein(sample_toy(data, n, FLOOR_SEED), reference)

    def measure_toy(x: torch.Tensor) -> tuple[float, dict]:
        return sliced_wasserstein(x, reference), {"outliers": float((x.abs() > OUTLIER).any(1).float().mean())}

    return measure_toy, floor, "sliced W2 to the 20,000 test points"


def sample_cell(pipe: Pipeline, sampler: str, options: dict, steps: int, n: int, measure) -> Cell:
    stats: dict = {}
    try:  # seeds 0..n-1, one batch, the model's default grid, starting from its prior kernel
        x = pipe.sample(n, seed=0, sampler=sampler, steps=steps, batch_size=n, stats=stats, **options)
    except DifflabError as err:
        return Cell(stats.get("nfe", math.nan), math.nan, note=f"error: {err}")
    nfe = stats["nfe"]
    bad = int((~torch.isfinite(x)).flatten(1).any(1).sum())
    if bad:
        return Cell(nfe, math.nan, note=f"diverged ({bad} non-finite samples)")
    value, extra = measure(x)
    return Cell(nfe, value, extra)


def run_data(data: str, args, log) -> Result:
    start = time.perf_counter()
    toy = data in TOY_NAMES
    n = args.n_toy if toy else args.n_digits
    steps = args.toy_steps if toy else args.digits_steps
    measure, floor, metric = quality_fn(data, n)
    result = Result(data, metric, floor, n)
    ode_nfes = [t for t in ODE_NFES if toy or t <= DIGITS_MAX_NFE["ode"]]
    sde_nfes = [t for t in SDE_NFES if toy or t <= DIGITS_MAX_NFE["sde"]]
    tols = RK45_TOLS if toy else DIGITS_RK45_TOLS
    if args.quick:
        ode_nfes, sde_nfes, tols = [4, 10, 35], [4, 10, 35, 100], (1e-2,)
    for key, process, aug_dim in MODELS:
        t0 = time.perf_counter()
        pipe, summary = train_or_load(data, key, process, aug_dim, steps, Path(args.runs))
        result.train[key] = summary
        log(f"  {key}: trained ({summary['final_loss']:.4g} final loss) in {time.perf_counter() - t0:.0f} s")
        t0 = time.perf_counter()
        for sampler, options, label in ROWS.get(key, DEFAULT_ROWS):
            spec = SAMPLERS[sampler]
            row = Row(key, sampler, label)
            if spec.cost is None:
                for tol in tols:
                    cell = sample_cell(pipe, sampler, {**options, "rtol": tol, "atol": tol}, 2, n, measure)
                    cell.extra["rtol"] = tol
                    row.cells.append(cell)
            else:
                used: set[int] = set()
                for target in sde_nfes if not spec.deterministic(options) else ode_nfes:
                    steps_n = spec.steps_for_nfe(target, options)
                    if steps_n in used:
                        continue
                    used.add(steps_n)
                    cell = sample_cell(pipe, sampler, options, steps_n, n, measure)
                    cell.target = target
                    row.cells.append(cell)
            for cell in row.cells:
                if cell.note:
                    result.notes.append(f"{row.name} at NFE {cell.nfe:g}: {cell.note}")
            result.rows.append(row)
        if key in SPREAD and not args.quick:
            sampler, target = SPREAD[key]
            steps_n = SAMPLERS[sampler].steps_for_nfe(target)
            values = []
            for k in range(3):
                x = pipe.sample(n, seed=k * n, sampler=sampler, steps=steps_n, batch_size=n)
                values.append(measure(x)[0])
            result.spread[f"{key} {sampler} at {SAMPLERS[sampler].nfe(steps_n)} NFE"] = values
        log(f"  {key}: sampled in {time.perf_counter() - t0:.0f} s")
    result.seconds = time.perf_counter() - start
    return result


# ---- verdict -----------------------------------------------------------------------------------------------


def nfe_to_reach(row: Row, target: float) -> float:
    """The smallest NFE from which every cell of the row is at or below `target` (nan: never)."""
    points = row.points()
    reached = math.nan
    for nfe, value in reversed(points):
        if not (math.isfinite(value) and value <= target):
            break
        reached = nfe
    return reached


def target_for(best: float, floor: float, tol: float) -> float:
    return floor + (1 + tol) * max(best - floor, MIN_EXCESS * floor)


def model_nfe(result: Result, model: str, target: float, rows: tuple[str, ...] | None = None) -> tuple[float, str]:
    """A model's smallest NFE to `target` over its rows (optionally only the samplers in `rows`), and the row."""
    options = [
        (nfe_to_reach(r, target), r.label)
        for r in result.rows
        if r.model == model and (rows is None or r.sampler in rows)
    ]
    options = [o for o in options if math.isfinite(o[0])]
    return min(options) if options else (math.nan, "")


def verdict(result: Result, tol: float = TOL) -> list[dict]:
    """Per baseline: its target, its NFE, and each Poisson model's NFE and ratio."""
    out = []
    for model, sampler in BASELINES:
        row = next((r for r in result.rows if r.model == model and r.sampler == sampler), None)
        if row is None or not math.isfinite(row.converged()):
            continue
        target = target_for(row.converged(), result.floor, tol)
        base = nfe_to_reach(row, target)
        entry = {"baseline": row.name, "converged": row.converged(), "target": target, "nfe": base, "models": {}}
        for key, _, _ in MODELS:
            nfe, label = model_nfe(result, key, target)
            best = min((r.converged() for r in result.rows if r.model == key), default=math.nan)
            entry["models"][key] = {"nfe": nfe, "row": label, "ratio": base / nfe, "converged": best}
        pfgmpp = [  # fewest NFE; ties: the better converged quality
            (v["nfe"], v["converged"], k)
            for k, v in entry["models"].items()
            if k[:6] == "pfgmpp" and math.isfinite(v["nfe"])
        ]
        entry["pfgmpp_best"] = min(pfgmpp)[2] if pfgmpp else None
        out.append(entry)
    return out


# ---- report ------------------------------------------------------------------------------------------------


def fmt(value: float) -> str:
    if not math.isfinite(value):
        return "nan"
    return f"{value:.3g}" if abs(value) >= 1e-3 else f"{value:.2e}"


def fmt_ratio(ratio: float) -> str:
    return f"{ratio:.2g}x" if math.isfinite(ratio) else "never"


def fmt_nfe(nfe: float) -> str:
    return "never" if not math.isfinite(nfe) else f"{nfe:g}"


def table(result: Result) -> str:
    """Rows: model + sampler; columns: target NFE (fixed-step rows); then rk45 by tolerance."""
    header = sorted({c.target for r in result.rows for c in r.cells if c.target})
    lines = [
        "| model | sampler | " + " | ".join(f"NFE {t}" for t in header) + " | converged | NFE to converge |",
        "|---|---|" + "---|" * (len(header) + 2),
    ]
    for row in result.rows:
        if row.sampler == "rk45":
            continue
        by_target = {c.target: c for c in row.cells}
        cells = []
        for t in header:
            cell = by_target.get(t)
            if cell is None:
                cells.append("-")
                continue
            text = fmt(cell.value) if math.isfinite(cell.value) else (cell.note.split(" (")[0] or "nan")
            cells.append(text + (f" ({cell.nfe:g})" if cell.nfe != t else ""))
        own = nfe_to_reach(row, target_for(row.converged(), result.floor, TOL))
        lines.append(f"| {row.model} | {row.label} | " + " | ".join(cells) + f" | {fmt(row.converged())} | "
                     f"{fmt_nfe(own)} |")  # fmt: skip
    lines.append("| real data (floor) | | " + " | ".join(fmt(result.floor) for _ in header) + " | | |")
    rk = [r for r in result.rows if r.sampler == "rk45"]
    if rk:
        tols = sorted({c.extra["rtol"] for r in rk for c in r.cells}, reverse=True)
        lines += ["", "Adaptive rk45 (rtol = atol): value (NFE used)", ""]
        lines += ["| model | " + " | ".join(f"tol {t:g}" for t in tols) + " |", "|---|" + "---|" * len(tols)]
        for row in rk:
            by_tol = {c.extra["rtol"]: c for c in row.cells}
            cells = [f"{fmt(c.value)} ({fmt_nfe(c.nfe)})" if (c := by_tol.get(t)) else "-" for t in tols]
            lines.append(f"| {row.model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def confident_table(result: Result) -> str:
    lines = [
        "| model | sampler | confident >= 0.9 at its largest NFE (NFE) | at its best Frechet (NFE) |",
        "|---|---|---|---|",
    ]
    for row in result.rows:
        ok = [c for c in row.cells if math.isfinite(c.value)]
        if not ok:
            continue
        last = max(ok, key=lambda c: c.nfe)
        best = min(ok, key=lambda c: c.value)
        lines.append(f"| {row.model} | {row.label} | {100 * last.extra['confident']:.1f} % ({last.nfe:g}) | "
                     f"{100 * best.extra['confident']:.1f} % ({best.nfe:g}) |")  # fmt: skip
    return "\n".join(lines)


def outlier_line(result: Result) -> str:
    """Toys: the share of samples beyond OUTLIER at each row's largest NFE, where it is not zero."""
    found = []
    for row in result.rows:
        cells = [c for c in row.cells if "outliers" in c.extra]
        if cells and (last := max(cells, key=lambda c: c.nfe)).extra["outliers"] > 0:
            found.append(f"{row.name} {100 * last.extra['outliers']:.2g} % ({last.nfe:g} NFE)")
    listed = "; ".join(found) if found else "none"
    return f"Samples with a coordinate beyond {OUTLIER:g} (data lie in [-1, 1]) at each row's largest NFE: {listed}."


def verdict_table(result: Result, tol: float = TOL) -> str:
    """Rows: baselines; columns: each model's NFE to the baseline's target (and the ratio to the baseline's)."""
    keys = [m[0] for m in MODELS]
    lines = [
        "| baseline (converged) | target | baseline NFE | " + " | ".join(keys) + " |",
        "|---|---|---|" + "---|" * len(keys),
    ]
    for entry in verdict(result, tol):
        cells = []
        for key in keys:
            m = entry["models"][key]
            cells.append("never" if not math.isfinite(m["nfe"]) else f"{m['nfe']:g} ({m['ratio']:.2g}x)")
        lines.append(f"| {entry['baseline']} ({fmt(entry['converged'])}) | {fmt(entry['target'])} | "
                     f"{fmt_nfe(entry['nfe'])} | " + " | ".join(cells) + " |")  # fmt: skip
    return "\n".join(lines)


def claim_lines(result: Result) -> list[str]:
    """The 10-20x claim, per baseline, for PFGM and for the best PFGM++ D; and its sensitivity to tol."""
    lines = []
    for entry in verdict(result):
        pfgm, pp = entry["models"]["pfgm"], entry["pfgmpp_best"]
        if math.isfinite(pfgm["nfe"]):
            text = f"PFGM needs {pfgm['nfe']:g} NFE ({pfgm['row']}), ratio {pfgm['ratio']:.2g}"
        else:
            text = f"PFGM never reaches it (its best sampler converges to {fmt(pfgm['converged'])})"
        holds = math.isfinite(pfgm["ratio"]) and pfgm["ratio"] >= CLAIM
        text += f" -> the {CLAIM}-20x claim {'HOLDS' if holds else 'does NOT hold'} for PFGM"
        if pp is not None:
            m = entry["models"][pp]
            pp_holds = m["ratio"] >= CLAIM
            text += (f"; best PFGM++ ({pp}, {m['row']}) needs {m['nfe']:g}, ratio {m['ratio']:.2g} -> "
                     f"{'holds' if pp_holds else 'does not hold'} for PFGM++")  # fmt: skip
        else:
            text += "; no PFGM++ model reaches it"
        edm = entry["models"]["edm"]
        if entry["baseline"] != "edm heun" and math.isfinite(edm["nfe"]):
            text += f" (edm heun/rk45 itself: {edm['nfe']:g} NFE, ratio {edm['ratio']:.2g})"
        lines.append(f"against **{entry['baseline']}** (it needs {fmt_nfe(entry['nfe'])} NFE): {text}.")
    for tol in SENSITIVITY:
        ratios = []
        for e in verdict(result, tol):
            pp = e["pfgmpp_best"]
            pp_text = f"{pp} {fmt_ratio(e['models'][pp]['ratio'])}" if pp else "never"
            ratios.append(f"{e['baseline']} {fmt_ratio(e['models']['pfgm']['ratio'])} / {pp_text}")
        lines.append(f"with tol {tol:g} instead of {TOL:g} (PFGM / best PFGM++ ratio): " + "; ".join(ratios) + ".")
    return lines


def plot(result: Result, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = dict(zip([m[0] for m in MODELS], plt.get_cmap("tab10").colors, strict=False))
    styles = {"heun": "-", "rk45": ":", "euler": "--", "ddpm": "-", "euler_maruyama": "--"}
    fig, ax = plt.subplots(figsize=(10, 5.2))
    for row in result.rows:
        points = [(n, v) for n, v in row.points() if math.isfinite(v) and v > 0]
        if not points:
            continue
        style = styles.get(row.sampler, "-")
        if row.model == "vp" and row.sampler == "heun":
            style = "-."
        off = " (off the chart)" if min(v for _, v in points) > PLOT_TOP * result.floor else ""
        ax.plot(*zip(*points, strict=True), style, marker="o" if row.sampler != "rk45" else "s", ms=3,
                color=colours[row.model], label=row.name + off, lw=1.2)  # fmt: skip
    ax.axhline(result.floor, color="k", ls=":", lw=1, label="real-vs-real floor")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylim(0.7 * result.floor, PLOT_TOP * result.floor)
    ax.set_xlabel("network evaluations (NFE)")
    ax.set_ylabel(result.metric)
    steps = next(iter(result.train.values()))["steps"]
    ax.set_title(f"{result.data}: {steps} training steps per model, {result.n} samples", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def to_json(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=["heart", "digits"], help="toys (heart, moons, ...) and/or digits")
    parser.add_argument("--toy-steps", type=int, default=4000)
    parser.add_argument("--digits-steps", type=int, default=1500)
    parser.add_argument("--n-toy", type=int, default=4000)
    parser.add_argument("--n-digits", type=int, default=450)
    parser.add_argument("--runs", default="runs/pfgm_bench", help="trained runs (reused when finished)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="300 / 60 training steps, 500 / 100 samples, 3 NFEs")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--from-json", help="rewrite the report and plots from a saved pfgm.json, without sampling")
    args = parser.parse_args()
    if args.quick:
        args.toy_steps, args.digits_steps, args.n_toy, args.n_digits = 300, 60, 500, 100
    torch.set_num_threads(args.threads)
    prefix = "pfgm_quick" if args.quick else "pfgm"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", flush=True)

    if args.from_json:
        payload = json.loads(Path(args.from_json).read_text())
        results = [result_from_json(r) for r in payload["results"]]
        meta = {k: payload[k] for k in ("command", "machine", "date", "seconds")}
    else:
        results = []
        for data in args.data:
            log(f"{data} ...")
            results.append(run_data(data, args, log))
            log(f"{data}: {results[-1].seconds:.0f} s")
        meta = {
            "command": ("python benchmarks/pfgm.py " + " ".join(sys.argv[1:])).strip(),
            "machine": f"{platform.machine()} CPU ({platform.processor() or 'unknown'}), no GPU, torch "
            f"{torch.__version__}, {torch.get_num_threads()} thread(s)",
            "date": datetime.date.today().isoformat(),
            "seconds": time.perf_counter() - started,
        }
    write_report(results, meta, out, prefix)
    log(f"wrote {out / prefix}.md, .json and the plots")


def result_from_json(data: dict) -> Result:
    """A Result as `write_report` stored it (None = nan)."""

    def nan(value):
        return math.nan if value is None else value

    rows = [
        Row(r["model"], r["sampler"], r["label"], [Cell(nan(c["nfe"]), nan(c["value"]), c["extra"], c["note"],
                                                        c["target"]) for c in r["cells"]])
        for r in data["rows"]
    ]  # fmt: skip
    return Result(data["data"], data["metric"], data["floor"], data["n"], data["train"], rows, data["notes"],
                  data["seconds"], data.get("spread", {}))  # fmt: skip


def write_report(results: list[Result], meta: dict, out: Path, prefix: str) -> None:
    """<prefix>.md, <prefix>.json and <prefix>_<data>.png in `out`."""
    parts = [
        "# Poisson flow (PFGM, PFGM++) against Gaussian diffusion: quality against NFE",
        "",
        f"Command: `{meta['command']}`. Machine: {meta['machine']}. Date: {meta['date']}.",
        "",
        f"Same budget for every model: network preset `tiny`, lr {LR:g}, seed 0, EMA 0.999, the same steps and "
        "network batch (toys 256, digits 128); pfgm's target field of each step is computed from 1,024 data points "
        "(its charges). Cells: quality at the target NFE; `(n)` is the NFE used where it differs (heun: 2 steps - 1).",
    ]
    for result in results:
        steps = next(iter(result.train.values()))["steps"]
        parts += ["", f"## {result.data} ({steps} training steps per model, {result.n} samples)", ""]
        parts += [f"Quality: {result.metric}; lower is better; floor {fmt(result.floor)}.", ""]
        parts.append(table(result))
        if result.data in TOY_NAMES:
            parts += ["", outlier_line(result)]
        if result.data == "digits":
            parts += ["", "Share of samples classified with confidence >= 0.9 (real test digits: 94.2 %):", ""]
            parts.append(confident_table(result))
        if result.spread:
            spread = "; ".join(f"{k}: {', '.join(fmt(v) for v in vals)}" for k, vals in result.spread.items())
            parts += [
                "",
                f"Noise of the metric: the same cell with seeds 0..{result.n - 1}, {result.n}..{2 * result.n - 1} and "
                f"{2 * result.n}..{3 * result.n - 1}: {spread}.",
            ]
        losses = ", ".join(f"{k} {fmt(v['final_loss'])}" for k, v in result.train.items())
        parts += ["", f"Final training losses (each model's own objective, not comparable across models): {losses}."]
        parts += [
            "",
            f"NFE each model needs to reach a baseline's converged quality (target = floor + {1 + TOL:g} x the "
            "baseline's converged excess over the floor; from that NFE on every cell of the row meets it; best "
            "sampler per model), and the ratio baseline NFE / model NFE:",
            "",
        ]
        parts.append(verdict_table(result))
        parts += ["", "Verdict:", ""]
        parts += [f"- {line}" for line in claim_lines(result)]
        if result.notes:
            parts += ["", "Notes:", ""] + [f"- {note}" for note in result.notes]
        parts += ["", f"![{result.data}]({prefix}_{result.data}.png)", "", f"({result.seconds:.0f} s)"]
        plot(result, out / f"{prefix}_{result.data}.png")
    parts += ["", f"Total runtime: {meta['seconds']:.0f} s.", ""]
    report = "\n".join(parts)
    print(report)
    (out / f"{prefix}.md").write_text(report)
    payload = {
        **meta,
        "results": [
            {**{k: v for k, v in asdict(r).items() if k != "rows"}, "rows": [asdict(row) for row in r.rows],
             "verdict": verdict(r), "verdict_sensitivity": {str(t): verdict(r, t) for t in SENSITIVITY}}
            for r in results
        ],
    }  # fmt: skip
    (out / f"{prefix}.json").write_text(json.dumps(to_json(payload), indent=1))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
