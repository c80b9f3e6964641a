"""Guidance on the 8x8 digits: class accuracy against diversity for classifier-free and classifier guidance.

    python benchmarks/guidance.py            # the full run (~25-35 min on 1 CPU thread, training included)
    python benchmarks/guidance.py --quick    # tiny models and sample counts: a smoke test (~2 min)

Models (the demo's settings: U-Net preset `tiny`, DDPM eps-prediction, linear schedule, batch 128, lr 1e-3, seed 0),
kept in --runs (default runs/guidance) and reused when finished (a folder without this script's `benchmark.json`
marker is an interrupted run and is trained again):

* uncond: unconditional. If missing, runs/demo/run is copied in when it was trained with exactly these settings
  (--no-reuse-demo turns that off); otherwise trained for --minutes (default 5, the demo's budget).
* cond: class-conditional (`--conditional`, label dropout 0.1), trained for as many steps as uncond reached (an
  equal step budget that does not depend on the machine's load); --cond-minutes trains it for minutes instead.
* clf: the noise-aware classifier `difflab train-classifier --for <uncond>` trains (on the digits, over uncond's
  sigma range, default 2,000 steps; here through `difflab.guidance.classifier_training.train_classifier`), used for
  classifier guidance only.

Settings, each through `Pipeline.sample` (the guidance composition `difflab sample` uses):

* cfg: the conditional model under classifier-free guidance, w in {0, 1, 1.5, 2, 3, 5} (w = 1 is the plain
  conditional model, w = 0 its unconditional branch).
* classifier: the unconditional model with classifier guidance, s in {0, 0.5, 1, 2, 4, 8} (s = 0: unguided, the
  requested label has no effect).
* cfg1+classifier: classifier guidance on top of the conditional model at w = 1, s in {0.5, 1, 2, 4}.

Sampling: `ddim` eta 0, 50 steps on the model's default grid (respaced DDPM timesteps); n = --per-class samples
per class (default 100, so 1,000 samples), sample i requests class i mod 10 and uses seed --seed + i (default 0;
PerSampleNoise), the same seeds in every setting.

Evaluation with an independent classifier: difflab.eval.digits_classifier (a small CNN trained on the clean train
digits; not the noise-aware guidance classifier; the one `digits_quality` uses). Samples are clamped to [-1, 1].

* accuracy: share of samples whose argmax class is the requested one (also per class);
* per-class FD: Frechet distance, in that classifier's 64-d penultimate features, between the samples of class k
  and the 43-46 test digits of class k, averaged over the classes ("mean per-class FD"). With 100 vs ~45 points
  in 64 dimensions the FD is strongly biased upwards, so each class also gets a real-vs-real floor: FD between
  min(n, all) random train digits of class k and the same test digits (mean over 5 random subsets);
* overall FD: all samples against the 450 test digits (floor: as many random train digits, 5 subsets);
* confident: share of samples whose top probability is >= 0.9 (as `digits_quality`).

Goal (the issue): >= 99 % class accuracy at a Frechet distance no worse than 1.5 x the unguided model's. The
reference ("unguided") FD is the mean per-class FD of the plain conditional model (cfg, w = 1); the same reference
serves both methods. Verdict: which settings meet both; per method the smallest scale with accuracy >= 99 %.

Writes benchmarks/results/guidance.{md,json}, guidance.png (accuracy against mean per-class FD, one curve per
method) and guidance_samples.png (two samples per class for some settings); --quick writes guidance_quick*.
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
from difflab.config import RunConfig
from difflab.data import load_dataset
from difflab.data.digits import load_digits_split
from difflab.eval.digits_classifier import classify, extract_features, load_digits_classifier
from difflab.eval.frechet import frechet_distance_between
from difflab.eval.quality import CONFIDENT_PROB
from difflab.formulations import make_formulation
from difflab.formulations.ddpm import DDPMConfig
from difflab.guidance.classifier import classifier_config_for, load_classifier
from difflab.guidance.classifier_training import classifier_train_config, train_classifier, training_state
from difflab.pipeline import Pipeline
from difflab.training.checkpoint import latest_checkpoint, load_config, resolve_checkpoint
from difflab.training.run import run_config, train_run
from difflab.training.trainer import read_log

NUM_CLASSES = 10
METHODS = {
    "cfg": ("classifier-free guidance (conditional model)", "w", (0.0, 1.0, 1.5, 2.0, 3.0, 5.0)),
    "classifier": ("classifier guidance (unconditional model)", "s", (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)),
    "cfg1+classifier": ("classifier guidance on the conditional model at w = 1", "s", (0.5, 1.0, 2.0, 4.0)),
}
QUICK_SCALES = {"cfg": (0.0, 1.0, 3.0), "classifier": (0.0, 2.0), "cfg1+classifier": (1.0,)}
REFERENCE = ("cfg", 1.0)  # the "unguided model" of the goal: the plain conditional model
TARGET_ACCURACY = 0.99
FD_RATIO = 1.5
FLOOR_DRAWS = 5
SAMPLER, STEPS, OPTIONS = "ddim", 50, {"eta": 0.0}
DEMO_RUN = Path("runs/demo/run")
MARKER = "benchmark.json"
GRID_SETTINGS = [("cfg", 0.0), ("cfg", 1.0), ("cfg", 3.0), ("cfg", 5.0), ("classifier", 0.0), ("classifier", 2.0),
                 ("classifier", 8.0), ("cfg1+classifier", 2.0)]  # fmt: skip


# ---- models ------------------------------------------------------------------------------------------------


def demo_settings(c: RunConfig) -> bool:
    """Whether a run was trained with the demo's settings (unconditional tiny U-Net, DDPM eps linear, 8x8 digits,
    batch 128, lr 1e-3, seed 0)."""
    f = c.formulation
    return (
        c.data.name == "digits" and c.data.resolution == 8 and c.model.backbone == "unet" and c.model.preset == "tiny"
        and c.model.num_classes is None and isinstance(f, DDPMConfig) and f.prediction == "eps"
        and f.schedule == "linear" and c.train.batch_size == 128 and c.train.lr == 1e-3 and c.train.seed == 0
    )  # fmt: skip


def finished(run_dir: Path) -> bool:
    return (run_dir / MARKER).is_file() and latest_checkpoint(run_dir) is not None


def train_diffusion(run_dir: Path, conditional: bool, steps: int | None, minutes: float | None) -> str | None:
    """Train a DDPM (eps, linear) tiny U-Net on the 8x8 digits, for `steps` or else `minutes`; conditional: on the
    class labels with label dropout 0.1. Returns the trainer's short-run warning, if any."""
    data = load_dataset("digits", resolution=8)
    config = run_config(data, process="ddpm", model="tiny", conditional=conditional, label_dropout=0.1,
                        steps=steps, minutes=None if steps is not None else minutes, batch_size=128, lr=1e-3,
                        seed=0)  # fmt: skip
    return train_run(config, run_dir, data=data, device="cpu", progress=False).warning


def train_guidance_classifier(uncond: Path, clf: Path, steps: int | None) -> None:
    """`difflab train-classifier --for UNCOND`: a noise-aware classifier on uncond's data over the sigma range it
    samples, with the library's classifier training settings (2,000 steps unless `steps`, seed 0)."""
    config = load_config(resolve_checkpoint(uncond))
    lo, hi = make_formulation(config.formulation).sigma_range()
    train = load_dataset(config.data.name, resolution=config.data.resolution)
    test = load_dataset(config.data.name, split="test", resolution=config.data.resolution)
    classifier = classifier_config_for(train, sigma_range=(float(lo), float(hi)))
    tc = classifier_train_config(train.kind, steps=2000 if steps is None else steps, seed=0)
    train_classifier(classifier, tc, (train.data, train.labels), (test.data, test.labels), clf, device="cpu",
                     progress=False)  # fmt: skip


def prepare_models(args, log) -> dict:
    """Train (or reuse) uncond, cond and clf; returns their paths and training summaries."""
    runs = Path(args.runs)
    uncond, cond, clf = runs / "uncond", runs / "cond", runs / "clf"
    info: dict = {}
    if not finished(uncond):
        shutil.rmtree(uncond, ignore_errors=True)
        if (
            not args.quick
            and args.reuse_demo
            and latest_checkpoint(DEMO_RUN) is not None
            and demo_settings(load_config(resolve_checkpoint(DEMO_RUN)))
        ):
            log(f"uncond: copying {DEMO_RUN} (trained with the demo's settings)")
            shutil.copytree(DEMO_RUN, uncond)
            source = str(DEMO_RUN)
        else:
            budget = f"{args.quick_steps} steps" if args.quick else f"{args.minutes:g} minutes"
            log(f"uncond: training ({budget}) ...")
            start = time.perf_counter()
            warning = train_diffusion(uncond, False, args.quick_steps if args.quick else None, args.minutes)
            source = f"trained here in {time.perf_counter() - start:.0f} s"
            if warning:
                log(f"uncond: {warning}")
        (uncond / MARKER).write_text(json.dumps({"source": source}))
    info["uncond"] = run_summary(uncond)
    uncond_steps = info["uncond"]["steps"]
    if not finished(cond):
        shutil.rmtree(cond, ignore_errors=True)
        steps = None if args.cond_minutes is not None else uncond_steps
        log(f"cond: training ({f'{steps} steps' if steps else f'{args.cond_minutes:g} minutes'}) ...")
        start = time.perf_counter()
        warning = train_diffusion(cond, True, steps, args.cond_minutes)
        if warning:
            log(f"cond: {warning}")
        (cond / MARKER).write_text(json.dumps({"source": f"trained here in {time.perf_counter() - start:.0f} s"}))
    info["cond"] = run_summary(cond)
    if not finished(clf):
        shutil.rmtree(clf, ignore_errors=True)
        log("clf: training the noise-aware classifier ...")
        start = time.perf_counter()
        train_guidance_classifier(uncond, clf, args.quick_steps if args.quick else None)
        (clf / MARKER).write_text(json.dumps({"source": f"trained here in {time.perf_counter() - start:.0f} s"}))
    state = training_state(clf)
    info["clf"] = {"path": str(clf), "steps": state["step"], "elapsed_s": state.get("elapsed_s"),
                   "test_accuracy": state.get("test_accuracy"),
                   "source": json.loads((clf / MARKER).read_text())["source"]}  # fmt: skip
    for key in ("uncond", "cond", "clf"):
        log(f"{key}: {info[key]}")
    return info


def run_summary(run_dir: Path) -> dict:
    pipe = difflab.load(run_dir)
    log = read_log(run_dir)
    tail = [r["loss"] for r in log[-8:]]
    label_dropout = next((s.dropout for s in pipe.config.conditioning if s.name == "class_label"), None)
    return {
        "path": str(run_dir),
        "steps": pipe.step,
        "elapsed_s": log[-1].get("elapsed_s") if log else None,
        "final_loss": sum(tail) / len(tail) if tail else None,
        "conditional": pipe.num_classes is not None,
        "label_dropout": label_dropout,  # None for the unconditional model
        "source": json.loads((run_dir / MARKER).read_text())["source"],
    }


# ---- evaluation --------------------------------------------------------------------------------------------


@dataclass
class Reference:
    """The evaluation classifier and the real digits' features."""

    model: torch.nn.Module
    test_features: torch.Tensor
    test_labels: torch.Tensor
    train_features: torch.Tensor
    train_labels: torch.Tensor
    test_accuracy: float = 0.0
    test_confident: float = 0.0
    floors: dict = field(default_factory=dict)  # "per_class": [floor_k], "per_class_std", "mean", "overall", ...


def build_reference(per_class: int) -> Reference:
    model = load_digits_classifier()
    test_x, test_y = load_digits_split("test")
    train_x, train_y = load_digits_split("train")
    probs = classify(model, test_x)
    ref = Reference(model, extract_features(model, test_x), test_y, extract_features(model, train_x), train_y)
    ref.test_accuracy = float((probs.argmax(1) == test_y).float().mean())
    ref.test_confident = float((probs.max(1).values >= CONFIDENT_PROB).float().mean())
    rng = np.random.default_rng(0)
    per, per_std = [], []
    for k in range(NUM_CLASSES):
        pool = ref.train_features[ref.train_labels == k]
        target = ref.test_features[ref.test_labels == k]
        draws = 1 if per_class >= len(pool) else FLOOR_DRAWS
        values = [fd(pool[torch.from_numpy(rng.choice(len(pool), min(per_class, len(pool)), replace=False))], target)
                  for _ in range(draws)]  # fmt: skip
        per.append(float(np.mean(values)))
        per_std.append(float(np.std(values)))
    n = per_class * NUM_CLASSES
    size = min(n, len(ref.train_features))
    overall = [fd(ref.train_features[torch.from_numpy(rng.choice(len(ref.train_features), size, replace=False))],
                  ref.test_features) for _ in range(FLOOR_DRAWS)]  # fmt: skip
    ref.floors = {
        "per_class": per, "per_class_std": per_std, "mean": float(np.mean(per)),
        "per_class_train_n": [min(per_class, int((ref.train_labels == k).sum())) for k in range(NUM_CLASSES)],
        "per_class_test_n": [int((ref.test_labels == k).sum()) for k in range(NUM_CLASSES)],
        "overall": float(np.mean(overall)), "overall_std": float(np.std(overall)),
    }  # fmt: skip
    return ref


def fd(a: torch.Tensor, b: torch.Tensor) -> float:
    try:
        return frechet_distance_between(a, b)
    except ValueError:  # a large imaginary part of the matrix square root (few points)
        return math.nan


def evaluate(samples: torch.Tensor, labels: torch.Tensor, ref: Reference) -> dict:
    x = samples.clamp(-1.0, 1.0)
    probs = classify(ref.model, x)
    feats = extract_features(ref.model, x)
    correct = probs.argmax(1) == labels
    accuracy = float(correct.float().mean())
    per_acc = [float(correct[labels == k].float().mean()) for k in range(NUM_CLASSES)]
    per_fd = [fd(feats[labels == k], ref.test_features[ref.test_labels == k]) for k in range(NUM_CLASSES)]
    return {
        "accuracy": accuracy,
        "accuracy_se": math.sqrt(accuracy * (1 - accuracy) / len(labels)),
        "per_class_accuracy": per_acc,
        "per_class_fd": per_fd,
        "mean_class_fd": float(np.mean(per_fd)),
        "overall_fd": fd(feats, ref.test_features),
        "confident": float((probs.max(1).values >= CONFIDENT_PROB).float().mean()),
        "mean_requested_prob": float(probs.gather(1, labels[:, None]).mean()),
        "nonfinite": int((~torch.isfinite(samples)).flatten(1).any(1).sum()),
    }


# ---- sampling ----------------------------------------------------------------------------------------------


@dataclass
class Setting:
    method: str
    scale: float
    metrics: dict = field(default_factory=dict)
    nfe: float = 0.0
    seconds: float = 0.0


def setting_for(method: str, scale: float, pipes: dict, classifier, labels: torch.Tensor) -> tuple[Pipeline, dict]:
    """(pipeline, its `sample` keyword arguments for cond and guidance) of one setting."""
    cond = {"class_label": labels}
    if method == "cfg":
        return pipes["cond"], {"cond": cond, "guidance": scale}
    if method == "classifier":
        if scale == 0:  # unguided: the unconditional network must not get labels
            return pipes["uncond"], {}
        return pipes["uncond"], {"cond": cond, "classifier": classifier, "classifier_scale": scale}
    return pipes["cond"], {"cond": cond, "guidance": 1.0, "classifier": classifier, "classifier_scale": scale}


def run_settings(args, info: dict, ref: Reference, log) -> tuple[list[Setting], dict]:
    pipes = {key: difflab.load(info[key]["path"]) for key in ("uncond", "cond")}
    classifier = load_classifier(info["clf"]["path"], "cpu")
    n = args.per_class * NUM_CLASSES
    labels = torch.arange(n) % NUM_CLASSES
    seeds = [args.seed + i for i in range(n)]
    steps = args.sampling_steps
    results, grids = [], {}
    for method, (_, _, scales) in METHODS.items():
        for scale in QUICK_SCALES[method] if args.quick else scales:
            pipe, guidance = setting_for(method, scale, pipes, classifier, labels)
            stats: dict = {}
            start = time.perf_counter()
            x = pipe.sample(seeds=seeds, sampler=SAMPLER, steps=steps, batch_size=args.batch_size, stats=stats,
                            **guidance, **OPTIONS)  # fmt: skip
            setting = Setting(method, scale, evaluate(x, labels, ref), stats["nfe"], time.perf_counter() - start)
            results.append(setting)
            grids[(method, scale)] = x[: 2 * NUM_CLASSES]
            m = setting.metrics
            log(f"  {method} {scale:g}: accuracy {100 * m['accuracy']:.1f} %, mean per-class FD "
                f"{m['mean_class_fd']:.1f}, overall FD {m['overall_fd']:.1f} ({setting.seconds:.0f} s)")  # fmt: skip
    return results, grids


# ---- verdict and report ------------------------------------------------------------------------------------


def reference_fd(results: list[Setting]) -> float:
    ref = next((s for s in results if (s.method, s.scale) == REFERENCE), None)
    return ref.metrics["mean_class_fd"] if ref is not None else math.nan


def verdict(results: list[Setting]) -> dict:
    ref = reference_fd(results)
    limit = FD_RATIO * ref
    meets = [s for s in results if s.metrics["accuracy"] >= TARGET_ACCURACY and s.metrics["mean_class_fd"] <= limit]
    per_method = {}
    for method in METHODS:
        rows = sorted((s for s in results if s.method == method), key=lambda s: s.scale)
        first = next((s for s in rows if s.metrics["accuracy"] >= TARGET_ACCURACY), None)
        best = max(rows, key=lambda s: s.metrics["accuracy"], default=None)
        per_method[method] = {
            "smallest_scale_99": None if first is None else first.scale,
            "fd_at_smallest_99": None if first is None else first.metrics["mean_class_fd"],
            "fd_ratio_at_smallest_99": None if first is None else first.metrics["mean_class_fd"] / ref,
            "best_accuracy": None if best is None else best.metrics["accuracy"],
            "best_accuracy_scale": None if best is None else best.scale,
        }
    return {
        "reference": f"{REFERENCE[0]} at scale {REFERENCE[1]:g} (the plain conditional model)",
        "reference_mean_class_fd": ref,
        "fd_limit": limit,
        "settings_meeting_goal": [{"method": s.method, "scale": s.scale} for s in meets],
        "goal_met": bool(meets),
        "per_method": per_method,
    }


def fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def main_table(results: list[Setting], ref_fd: float) -> str:
    lines = ["| method | scale | accuracy | mean per-class FD | / reference | overall FD | confident >= 0.9 | "
             "p(requested) | NFE | time |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for s in results:
        m = s.metrics
        symbol = METHODS[s.method][1]
        lines.append(
            f"| {s.method} | {symbol} = {s.scale:g} | {100 * m['accuracy']:.1f} % | {fmt(m['mean_class_fd'])} | "
            f"{fmt(m['mean_class_fd'] / ref_fd, 2)} | {fmt(m['overall_fd'])} | {100 * m['confident']:.1f} % | "
            f"{m['mean_requested_prob']:.3f} | {s.nfe:g} | {s.seconds:.0f} s |"
        )
    return "\n".join(lines)


def per_class_table(results: list[Setting], ref: Reference, chosen: list[tuple[str, float]]) -> str:
    picked = [s for key in chosen for s in results if (s.method, s.scale) == key]
    head = "| class | test n | floor FD | " + " | ".join(f"{s.method} {s.scale:g}: acc / FD" for s in picked) + " |"
    lines = [head, "|" + "---|" * (3 + len(picked))]
    for k in range(NUM_CLASSES):
        cells = [f"{100 * s.metrics['per_class_accuracy'][k]:.0f} % / {fmt(s.metrics['per_class_fd'][k])}"
                 for s in picked]  # fmt: skip
        lines.append(f"| {k} | {ref.floors['per_class_test_n'][k]} | {fmt(ref.floors['per_class'][k])} | "
                     + " | ".join(cells) + " |")  # fmt: skip
    return "\n".join(lines)


def verdict_lines(v: dict) -> list[str]:
    out = [
        f'Reference ("unguided") FD: the mean per-class FD of {v["reference"]} = {fmt(v["reference_mean_class_fd"])};'
        f" limit {FD_RATIO:g} x = {fmt(v['fd_limit'])}."
    ]
    if v["goal_met"]:
        names = ", ".join(
            f"{m['method']} {METHODS[m['method']][1]} = {m['scale']:g}" for m in v["settings_meeting_goal"]
        )
        out.append(f"**Goal met** (accuracy >= {100 * TARGET_ACCURACY:g} % and mean per-class FD <= the limit) by: "
                   f"{names}.")  # fmt: skip
    else:
        out.append(f"**Goal not met**: no setting reaches {100 * TARGET_ACCURACY:g} % accuracy within the FD limit.")
    for method, p in v["per_method"].items():
        symbol = METHODS[method][1]
        if p["smallest_scale_99"] is None:
            out.append(f"{method}: never reaches {100 * TARGET_ACCURACY:g} % (best {100 * p['best_accuracy']:.1f} % "
                       f"at {symbol} = {p['best_accuracy_scale']:g}).")  # fmt: skip
        else:
            out.append(f"{method}: smallest scale with accuracy >= {100 * TARGET_ACCURACY:g} %: {symbol} = "
                       f"{p['smallest_scale_99']:g}, mean per-class FD {fmt(p['fd_at_smallest_99'])} "
                       f"({fmt(p['fd_ratio_at_smallest_99'], 2)} x the reference).")  # fmt: skip
    return out


def plot(results: list[Setting], ref: Reference, v: dict, path: Path) -> None:
    """Accuracy against mean per-class FD, one curve per method: the whole range, and a zoom on >= 89 %."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13.0, 5.2))
    markers = {"cfg": "o-", "classifier": "s-", "cfg1+classifier": "^-"}
    for panel, ax in enumerate(axes):
        zoom = panel == 1
        for method, (title, symbol, _) in METHODS.items():
            rows = sorted((s for s in results if s.method == method), key=lambda s: s.scale)
            if zoom:
                rows = [s for s in rows if s.metrics["accuracy"] >= 0.89]
            if not rows:
                continue
            xs = [s.metrics["mean_class_fd"] for s in rows]
            ys = [100 * s.metrics["accuracy"] for s in rows]
            ax.plot(xs, ys, markers[method], label=f"{method}: {title}", alpha=0.85)
            offset = {"cfg": (4, 5), "classifier": (4, -11), "cfg1+classifier": (-6, -12)}[method]
            for s, xv, yv in zip(rows, xs, ys, strict=True):
                if not zoom and yv >= 89:  # labelled in the zoom
                    continue
                ax.annotate(f"{symbol}={s.scale:g}", (xv, yv), textcoords="offset points", xytext=offset, fontsize=7)
        ax.axhline(100 * TARGET_ACCURACY, color="grey", ls="--", lw=0.8, label=f"{100 * TARGET_ACCURACY:g} % accuracy")
        if math.isfinite(v["fd_limit"]):
            ax.axvline(v["fd_limit"], color="red", ls="--", lw=0.8, label=f"{FD_RATIO:g} x reference FD (cfg w = 1)")
        ax.axvline(ref.floors["mean"], color="green", ls=":", lw=0.8, label="real-vs-real floor (train vs test)")
        ax.axhline(100 * ref.test_accuracy, color="green", ls="-.", lw=0.6,
                   label=f"evaluation classifier on real test digits ({100 * ref.test_accuracy:.1f} %)")  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("mean per-class Frechet distance to the test digits of the class (log)")
        ax.set_ylabel("class accuracy (independent classifier), %")
        if zoom:
            ax.set_ylim(89, 100.6)
            ax.set_title("zoom: accuracy >= 89 %", fontsize=9)
        else:
            ax.set_ylim(max(0.0, min(100 * s.metrics["accuracy"] for s in results) - 5), 102)
            ax.set_title("all settings", fontsize=9)
            ax.legend(fontsize=7, loc="lower left")
    fig.suptitle("Guidance on the 8x8 digits: class accuracy against diversity")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_samples(grids: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from difflab.viz import make_grid

    keys = [k for k in GRID_SETTINGS if k in grids]
    if not keys:
        return
    fig, axes = plt.subplots(len(keys), 1, figsize=(6.0, 0.75 * len(keys) + 0.3))
    axes = np.atleast_1d(axes)
    for ax, key in zip(axes, keys, strict=True):
        ax.imshow(make_grid(grids[key].clamp(-1, 1), nrow=2 * NUM_CLASSES)[..., 0], cmap="gray", vmin=0, vmax=255)
        ax.set_axis_off()
        ax.set_title(f"{key[0]} {METHODS[key[0]][1]} = {key[1]:g} (classes 0-9, 0-9)", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def encode_images(x: torch.Tensor) -> list[str]:
    """8x8 images (N, 1, 8, 8) in [-1, 1] -> one hex string of 64 grey levels (0..255) per image, for the JSON."""
    levels = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).flatten(1).numpy()
    return [bytes(row).hex() for row in levels]


def decode_images(rows: list[str]) -> torch.Tensor:
    levels = np.stack([np.frombuffer(bytes.fromhex(r), dtype=np.uint8) for r in rows]).astype(np.float32)
    return torch.from_numpy(levels / 127.5 - 1).reshape(-1, 1, 8, 8)


def write_report(results, ref: Reference, info: dict, meta: dict, grids: dict, out: Path, prefix: str) -> None:
    v = verdict(results)
    ref_fd = v["reference_mean_class_fd"]
    n = meta["per_class"] * NUM_CLASSES
    lines = [
        "# Guidance on the 8x8 digits: class accuracy against diversity",
        "",
        f"Command: `{meta['command']}`. Machine: {meta['machine']}. Date: {meta['date']}. "
        f"Runtime: {meta['seconds']:.0f} s.",
        "",
        "Models (U-Net `tiny`, DDPM eps linear, batch 128, lr 1e-3, seed 0, EMA weights):",
        "",
        f"- unconditional: {info['uncond']['steps']} steps ({info['uncond']['source']}), `{info['uncond']['path']}`",
        f"- conditional: {info['cond']['steps']} steps, label dropout {info['cond']['label_dropout']:g} "
        f"({info['cond']['source']}), `{info['cond']['path']}`",
        f"- noise-aware guidance classifier (`difflab train-classifier --for {info['uncond']['path']}`): "
        f"{info['clf']['steps']} steps ({info['clf']['source']}); its test accuracy: "
        + ", ".join(
            f"{k if k == 'clean' else 'sigma ' + k} {100 * a:.1f} %"
            for k, a in (info["clf"]["test_accuracy"] or {}).items()
        ),
        "",
        f"Sampling: `{SAMPLER}` eta 0, {meta['steps']} steps (respaced DDPM grid), {meta['per_class']} samples per "
        f"class ({n} in all), sample i asks for class i mod 10 with seed {meta['seed']} + i, the same seeds in every "
        "setting.",
        "",
        "Evaluation: the independent digits classifier of `difflab.eval.digits_classifier` (trained on the clean train "
        f"digits; {100 * ref.test_accuracy:.1f} % accuracy and {100 * ref.test_confident:.1f} % confident >= 0.9 on "
        "the real test digits). Accuracy = share of samples whose argmax is the requested class (standard error "
        f"about {100 * math.sqrt(0.99 * 0.01 / n):.1f} points at 99 %). FD = Frechet distance in its 64-d features: "
        f"per class, the {meta['per_class']} samples of class k against the 43-46 test digits of class k (mean over "
        f"the classes), and overall, all {n} against the 450 test digits. p(requested) = mean probability of the "
        "requested class.",
        "",
        f"Real-vs-real floors (train digits vs test digits, same sizes, mean of {FLOOR_DRAWS} random subsets): mean "
        f"per-class FD {fmt(ref.floors['mean'])}, overall FD {fmt(ref.floors['overall'])} "
        f"(+- {fmt(ref.floors['overall_std'], 2)}). With about 45 test digits per class in 64 dimensions the "
        "per-class FD is biased far upwards: compare it with its floor, not with 0.",
        "",
        main_table(results, ref_fd),
        "",
        "## Verdict",
        "",
    ]
    lines += [f"- {line}" for line in verdict_lines(v)]
    wanted = {REFERENCE, ("cfg", 3.0), ("classifier", 0.0), ("classifier", 4.0), ("cfg1+classifier", 2.0)}
    chosen = [(s.method, s.scale) for s in results if (s.method, s.scale) in wanted]
    lines += ["", "Per class (accuracy / FD to the test digits of the class; floor = train digits of the class):", ""]
    lines += [per_class_table(results, ref, chosen)]
    lines += ["", f"![accuracy against FD]({prefix}.png)", "", f"![samples]({prefix}_samples.png)", ""]
    report = "\n".join(lines)
    print(report)
    (out / f"{prefix}.md").write_text(report)
    payload = {
        **meta,
        "models": info,
        "evaluation_classifier": {"test_accuracy": ref.test_accuracy, "test_confident": ref.test_confident},
        "floors": ref.floors,
        "settings": [asdict(s) for s in results],
        "verdict": v,
        "grid_samples": [{"method": m, "scale": sc, "images": encode_images(x)} for (m, sc), x in grids.items()],
    }
    (out / f"{prefix}.json").write_text(json.dumps(payload, indent=1, default=lambda o: None))
    plot(results, ref, v, out / f"{prefix}.png")
    plot_samples(grids, out / f"{prefix}_samples.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", help="model folders (default runs/guidance; --quick: runs/guidance/quick)")
    parser.add_argument("--minutes", type=float, default=5.0, help="training budget of the unconditional model")
    parser.add_argument(
        "--cond-minutes",
        type=float,
        help="train the conditional model for minutes instead of the unconditional model's steps",
    )
    parser.add_argument("--no-reuse-demo", dest="reuse_demo", action="store_false",
                        help=f"do not copy {DEMO_RUN} as the unconditional model")  # fmt: skip
    parser.add_argument("--per-class", type=int, default=100, help="samples per class")
    parser.add_argument("--sampling-steps", type=int, default=STEPS)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0, help="sample i uses seed SEED + i")
    parser.add_argument("--from-json", help="rewrite the report and plots from a saved guidance.json, without sampling")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="200-step models, 10 per class, 10 sampling steps")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    args.quick_steps = 200
    if args.quick:
        args.per_class, args.sampling_steps = 10, 10
    args.runs = args.runs or ("runs/guidance/quick" if args.quick else "runs/guidance")
    torch.set_num_threads(args.threads)
    prefix = "guidance_quick" if args.quick else "guidance"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", flush=True)

    if args.from_json:
        payload = json.loads(Path(args.from_json).read_text())
        results = [Setting(**d) for d in payload["settings"]]
        ref = Reference(None, None, None, None, None, payload["evaluation_classifier"]["test_accuracy"],
                        payload["evaluation_classifier"]["test_confident"], payload["floors"])  # fmt: skip
        grids = {(g["method"], g["scale"]): decode_images(g["images"]) for g in payload.get("grid_samples", [])}
        meta = {k: payload[k] for k in ("command", "machine", "date", "seconds", "per_class", "steps", "sampler")}
        meta["seed"] = payload.get("seed", 0)
        write_report(results, ref, payload["models"], meta, grids, out, prefix)
        return
    info = prepare_models(args, log)
    log("reference features and floors ...")
    ref = build_reference(args.per_class)
    log(f"sampling ({args.per_class * NUM_CLASSES} samples per setting) ...")
    results, grids = run_settings(args, info, ref, log)
    meta = {
        "command": ("python benchmarks/guidance.py " + " ".join(sys.argv[1:])).strip(),
        "machine": f"{platform.machine()} CPU ({platform.processor() or 'unknown'}), no GPU, torch "
        f"{torch.__version__}, {torch.get_num_threads()} thread(s)",
        "date": datetime.date.today().isoformat(),
        "seconds": time.perf_counter() - started,
        "per_class": args.per_class,
        "steps": args.sampling_steps,
        "sampler": SAMPLER,
        "seed": args.seed,
    }
    write_report(results, ref, info, meta, grids, out, prefix)
    log(f"wrote {out / prefix}.md, .json, .png and _samples.png")


if __name__ == "__main__":
    main()
