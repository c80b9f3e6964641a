"""Why DDIM sends a few seeds of a DDPM toy model far off the data, and what x0 clipping (Saharia et al. 2022, Sec. 2.3)
and the other remedies do about it.

    python benchmarks/thresholding.py [--work DIR] [--n 4000]     # about 8 minutes on one CPU thread

The model: the library's defaults for points (MLP 'tiny', ddpm linear schedule, T = 1000, eps-prediction, batch 256,
lr 1e-3), trained 4,000 steps on moons (seed 0) with `difflab.train`; a v-prediction twin for comparison. Samples:
seeds 0..n-1 (PerSampleNoise), scored by the sliced W2 against the moons test split (n points). Outliers: samples
farther than 0.2 from every training point (the data's noise std is 0.03). Writes thresholding.json and
thresholding_tables.md beside this script's results; the findings are in results/thresholding.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import difflab
from difflab.data import load_dataset
from difflab.eval.toy_metrics import sliced_wasserstein
from difflab.generate import generate
from difflab.guidance.thresholding import Thresholding, threshold_x0
from difflab.oracles import PointSetDenoiser
from difflab.sampling import SAMPLERS, PerSampleNoise
from difflab.types import StepInfo

RESULTS = Path(__file__).parent / "results"
OFF_DATA = 0.2  # distance to the nearest training point beyond which a sample is an outlier


def trained(work: Path, prediction: str) -> difflab.Pipeline:
    """The 4,000-step moons model (reused when `work` already holds it)."""
    run = work / f"moons-ddpm-{prediction}"
    if not (run / "checkpoints" / "step_00004000").is_dir():
        data = load_dataset("moons")
        config = difflab.run_config(data, process="ddpm", prediction=prediction, steps=4000, seed=0)
        start = time.perf_counter()
        difflab.train(config, run, data=data, progress=False)
        print(f"trained {prediction} in {time.perf_counter() - start:.0f} s")
    return difflab.load(run)


def nearest_distance(x: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Distance of each sample (N, 2) to its nearest point, in row blocks (N,)."""
    return torch.cat([torch.cdist(block, points).amin(1) for block in x.split(500)])


class Context:
    """What every experiment shares: the model, the data, the seeds' initial noise."""

    def __init__(self, pipe: difflab.Pipeline, n: int):
        self.pipe, self.n = pipe, n
        self.train = load_dataset("moons").data
        self.test = load_dataset("moons", split="test").data[:n]
        self.box = (self.train.amin(0), self.train.amax(0))
        self.noise = PerSampleNoise(range(n)).initial((2,), 1.0, "cpu")  # unit-sigma draws; x_T = sigma_max n

    def score(self, x: torch.Tensor) -> dict:
        off = nearest_distance(x, self.train) > OFF_DATA
        return {"sw2": round(sliced_wasserstein(x, self.test), 4),
                "sw2_without_outliers": round(sliced_wasserstein(x[~off], self.test), 4),
                "outliers": int(off.sum()), "max_abs": round(float(x.abs().max()), 2),
                "outlier_seeds": off.nonzero()[:, 0].tolist()[:20]}  # fmt: skip

    def sample(self, denoiser=None, sampler="ddim", steps=50, grid=None, callback=None, **options) -> torch.Tensor:
        denoiser = denoiser or self.pipe.denoiser
        sigmas = self.pipe.sigmas(steps, grid)
        return generate(denoiser, (2,), sigmas, range(self.n), sampler=sampler, options=options, batch_size=self.n,
                        callback=callback)  # fmt: skip


def from_noise(ctx: Context, n: torch.Tensor, denoiser=None, steps: int = 50, callback=None) -> torch.Tensor:
    """ddim from given unit noise n (B, 2): x_T = sigma_max n."""
    sigmas = ctx.pipe.sigmas(steps)
    return SAMPLERS["ddim"].fn(denoiser or ctx.pipe.denoiser, sigmas[0] * n, sigmas, callback=callback)


def noise_tail(ctx: Context, outliers: list[int]) -> dict:
    """H1: are the outliers' initial draws in the tail of |n|? And does |n| alone decide (any direction)?"""
    norms = ctx.noise.norm(dim=1)
    rank = norms.argsort(descending=True).argsort()
    directions = torch.randn(256, 2, generator=torch.Generator().manual_seed(1))
    directions = directions / directions.norm(dim=1, keepdim=True)
    by_norm = {}
    for r in (2.5, 3.0, 3.25, 3.5, 3.75, 4.0, 4.5):
        x = from_noise(ctx, r * directions)
        by_norm[r] = round(float((nearest_distance(x, ctx.train) > OFF_DATA).float().mean()), 3)
    rescaled = from_noise(ctx, ctx.noise[outliers] / norms[outliers, None] * 2.0)
    return {"outlier_noise_norms": [round(float(norms[i]), 3) for i in outliers],
            "outlier_norm_ranks": [int(rank[i]) + 1 for i in outliers],
            "largest_norms": [round(float(v), 3) for v in norms.sort(descending=True).values[:10]],
            "tail_probability_P(|n|>r)": {r: float(torch.exp(torch.tensor(-r * r / 2))) for r in by_norm},
            "outlier_fraction_by_noise_norm": by_norm,
            "outliers_rescaled_to_norm_2_max_abs": round(float(rescaled.abs().max()), 3)}  # fmt: skip


def binding(ctx: Context) -> dict:
    """How often clipping to the box binds: per step of ddim 50, the share of all n seeds whose x0_hat leaves it."""
    lo, hi = ctx.box
    shares = []
    ctx.sample(callback=lambda r: shares.append(float(((r.denoised < lo) | (r.denoised > hi)).any(1).float().mean())))
    sigmas = ctx.pipe.sigmas(50)
    return {f"step {i} (sigma {float(sigmas[i]):.3g})": round(shares[i], 4) for i in (0, 1, 2, 5, 10, 20, 30, 40, 49)}


def trace(ctx: Context, seeds: list[int]) -> dict:
    """H2: where along the 50 steps the outliers leave: |x0_hat| and |x| / sqrt(1 + sigma'^2) (the network's input
    scale) per step; the first step at which x0_hat leaves the training box by 0.1."""
    rows: list[StepInfo] = []
    from_noise(ctx, ctx.noise[seeds], callback=rows.append)
    lo, hi = ctx.box
    outside = torch.stack([((r.denoised < lo - 0.1) | (r.denoised > hi + 0.1)).any(1) for r in rows])  # (steps, B)
    first_out = [int(col.nonzero()[0]) if bool(col.any()) else None for col in outside.T]

    def norms(v: torch.Tensor, scale: float = 1.0) -> list[float]:
        return [round(float(e), 2) for e in v.norm(dim=1) / scale]

    picks = [0, 1, 5, 10, 20, 25, 30, 35, 40, 45, 49]
    return {"first_step_x0_out_of_box": first_out,
            "steps": [{"i": i, "sigma": round(rows[i].sigma, 3), "x0_norm": norms(rows[i].denoised),
                       "input_norm": norms(rows[i].x, (1 + rows[i].sigma_next**2) ** 0.5)} for i in picks]}  # fmt: skip


class Switch:
    """D_a for sigma > threshold, D_b at or below it: which part of the trajectory sends a seed off the data."""

    def __init__(self, high, low, threshold: float):
        self.high, self.low, self.threshold = high, low, threshold

    def __call__(self, x, sigma, cond=None):
        return self.high(x, sigma, cond) if float(sigma[0]) > self.threshold else self.low(x, sigma, cond)


def early_or_late(ctx: Context, outliers: list[int]) -> dict:
    """H2 by intervention on the outlier seeds: the exact denoiser of the training points (or the network clipped to
    the box) above or below sigma = 10 or 1, the network elsewhere: how many seeds stay off the data, and the largest
    distance of a result to it."""
    net, exact = ctx.pipe.denoiser, PointSetDenoiser(ctx.train)

    def clipped(x, sigma, cond=None):
        return threshold_x0(net(x, sigma, cond), ctx.box)

    def summary(denoiser) -> str:
        distance = nearest_distance(from_noise(ctx, ctx.noise[outliers], denoiser), ctx.train)
        return (
            f"{int((distance > OFF_DATA).sum())} of {len(outliers)} off the data, largest distance {distance.max():.2f}"
        )

    out = {"network throughout": summary(net), "clipped throughout": summary(clipped)}
    for threshold in (10.0, 1.0):
        for name, high, low in (("exact above", exact, net), ("exact below", net, exact),
                                ("clipped above", clipped, net), ("clipped below", net, clipped)):  # fmt: skip
            out[f"{name} sigma {threshold:g}"] = summary(Switch(high, low, threshold))
    return out


def extrapolation(ctx: Context) -> dict:
    """H3: the network's x0_hat against the exact one at input radius r (the network's input c_in x = r u) and
    sigma: mean |x0_hat| and mean |eps_hat - eps_exact| = |x0_hat - x0_exact| / sigma over 64 directions."""
    exact = PointSetDenoiser(ctx.train)
    directions = torch.randn(64, 2, generator=torch.Generator().manual_seed(2))
    directions = directions / directions.norm(dim=1, keepdim=True)
    table = {}
    for sigma in (157.4, 50.0, 10.0, 2.0, 0.5):
        for r in (0.0, 1.0, 2.0, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0):
            x = (1 + sigma**2) ** 0.5 * r * directions
            s = torch.full((64,), sigma)
            with torch.no_grad():
                net, ref = ctx.pipe.denoiser(x, s), exact(x, s)
            error = float((net - ref).norm(dim=1).mean() / sigma)
            eps_norm = float(((x - net) / sigma).norm(dim=1).mean())  # the network's |eps_hat|; the exact is about r
            table[f"sigma {sigma:g} r {r:g}"] = {"x0_norm": round(float(net.norm(dim=1).mean()), 3),
                                                 "eps_norm": round(eps_norm, 3),
                                                 "exact_x0_norm": round(float(ref.norm(dim=1).mean()), 3),
                                                 "eps_error": round(error, 4)}  # fmt: skip
    return table


def remedies(ctx: Context) -> dict:
    """SW2, outliers and max |x| of each remedy, on the same seeds."""
    net, box = ctx.pipe.denoiser, ctx.box
    rows = {
        "ddim 50 (no clipping)": ctx.sample(),
        "ddpm 50 (no clipping)": ctx.sample(sampler="ddpm"),
        "ddim 50 + clip to the training box (the default)": ctx.sample(Thresholding(net, box)),
        "ddim 50 + clip to [-1.1, 1.1]": ctx.sample(Thresholding(net, (-1.1, 1.1))),
        "ddim 50 + dynamic threshold 99.5 in the box": ctx.sample(Thresholding(net, box, 99.5)),
        "ddpm 50 + clip to the training box": ctx.sample(Thresholding(net, box), sampler="ddpm"),
    }
    for steps in (100, 200, 1000):
        rows[f"ddim {steps}"] = ctx.sample(steps=steps)
    for grid in ("karras", "log_snr", "uniform", "trailing"):
        rows[f"ddim 50, {grid} grid"] = ctx.sample(grid=grid)
    for eta in (0.5, 1.0):
        rows[f"ddim 50, eta {eta:g}"] = ctx.sample(eta=eta)
    rows["heun 25"] = ctx.sample(sampler="heun", steps=25)
    rows["dpmpp_2m 50"] = ctx.sample(sampler="dpmpp_2m")
    return {name: ctx.score(x) for name, x in rows.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/difflab-thresholding", help="where the two runs are trained")
    parser.add_argument("--n", type=int, default=4000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(args.work)
    start = time.perf_counter()
    ctx = Context(trained(work, "eps"), args.n)
    baseline = ctx.score(ctx.sample())
    outliers = baseline["outlier_seeds"]
    print("ddim 50, no clipping:", baseline)
    report = {"machine": f"{platform.machine()} CPU, torch {torch.__version__}, 1 thread", "n": args.n,
              "box": [v.tolist() for v in ctx.box], "baseline": baseline}  # fmt: skip
    report["noise_tail"] = noise_tail(ctx, outliers)
    report["trace"] = trace(ctx, outliers)
    report["clipping_binds"] = binding(ctx)
    report["early_or_late"] = early_or_late(ctx, outliers)
    report["extrapolation"] = extrapolation(ctx)
    report["remedies"] = remedies(ctx)
    v = Context(trained(work, "v"), args.n)
    clipped = Thresholding(v.pipe.denoiser, v.box)
    report["v_prediction"] = {"ddim 50": v.score(v.sample()), "ddpm 50": v.score(v.sample(sampler="ddpm")),
                              "ddim 50 + clip to the box": v.score(v.sample(clipped))}  # fmt: skip
    report["seconds"] = round(time.perf_counter() - start)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "thresholding.json").write_text(json.dumps(report, indent=1))
    (RESULTS / "thresholding_tables.md").write_text(tables(report))
    print(tables(report))


def tables(report: dict) -> str:
    """The remedies and the extrapolation as markdown tables."""
    lines = ["| setting | SW2 | SW2 without outliers | outliers | max abs x |", "|---|---|---|---|---|"]
    rows = report["remedies"] | {f"v-prediction: {k}": r for k, r in report["v_prediction"].items()}
    for name, r in rows.items():
        lines.append(f"| {name} | {r['sw2']} | {r['sw2_without_outliers']} | {r['outliers']} | {r['max_abs']} |")
    lines += ["", "| sigma | r | mean abs x0_hat | exact | mean abs eps_hat | eps error |", "|---|---|---|---|---|---|"]
    for key, row in report["extrapolation"].items():
        _, sigma, _, r = key.split()
        lines.append(f"| {sigma} | {r} | {row['x0_norm']} | {row['exact_x0_norm']} | {row['eps_norm']} | "
                     f"{row['eps_error']} |")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
