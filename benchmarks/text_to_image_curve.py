"""How caption adherence grows with training on the shapes world (issue 12): one GLIDE-style model at 32x32 on the
text tower of a small CLIP (the best text encoder of the unCLIP benchmark), trained far past the issue's 30-minute
budget, every checkpoint scored on the fixed prompt set.

    python benchmarks/unclip.py --work runs/t2i-curve clip     # the CLIP first (its text tower): WORK/clip
    python benchmarks/text_to_image_curve.py train --steps 12000  # WORK/glide32 with a checkpoint every EVERY steps
    python benchmarks/text_to_image_curve.py eval               # -> benchmarks/results/text_to_image_curve.{md,json}
    ... --variant attn2 train / eval                              # attention at the U-Net's two lowest levels
    ... --variant phrases train / eval                            # the CLIP's tower read phrase by phrase
    difflab train-clip --out WORK/negclip --steps 3000 --hard-negatives  # ... --variant negclip: its text tower
    python benchmarks/text_to_image_curve.py figure             # -> text_to_image_curve.png: prompts x checkpoints
    python benchmarks/text_to_image_curve.py sweep [--step S] [--scales W ...]  # guidance scales: ..._sweep_STEP.json
    ... --variant phrases-slots-attn2-cosine-30min --threads 2 --minutes 30 train   # the issue's budget, both cores
    python benchmarks/text_to_image_curve.py relations [--step S]  # two-object failures: ..._relations_STEP.json
    ... --threads 2 throughput --compare A B ...  # seconds per training step of several variants, side by side

The model: the text-to-image benchmark's recipe (EDM, P_mean -0.4, P_std 1.4, the tiny U-Net on 2 x 2 patches,
batch 64, lr 2e-3, caption dropout 0.2, 20,000 scenes) with `--text-encoder clip:WORK/clip`. Each checkpoint: the
PROMPTS + PROMPTS captions of the fixed prompt set (held-out compositions, train captions), one sample each at w = W,
dpmpp_2m SAMPLE_STEPS steps; adherence by the exact evaluator and FD in its feature space; the minutes are the
training log's own clock (one thread, on whatever else the machine was running).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

import difflab
from difflab.data.shapes import parse_caption
from difflab.eval.adherence import prompt_reference, prompt_set, score_prompt_samples, sweep_guidance
from difflab.eval.shapes import adherence, recover_scene
from difflab.text_demo import find_object, relation_reversals
from difflab.training.checkpoint import list_checkpoints
from difflab.training.run import train_run
from difflab.training.trainer import read_log
from difflab.viz.text import save_prompt_rows

RESOLUTION, SCENES, EVERY = 32, 20_000, 1000
RECIPE = {"process": "edm", "model": "tiny", "batch_size": 64, "lr": 2e-3, "caption_dropout": 0.2, "p_mean": -0.4,
          "p_std": 1.4, "patch_size": 2}  # fmt: skip
PROMPTS, W, SAMPLER, SAMPLE_STEPS = 100, 3.0, "dpmpp_2m", 20
SCALES = (1.0, 2.0, 3.0, 5.0, 7.0)
ATTRIBUTES = ("colour", "shape", "size", "position", "relation", "full")
RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class Variant:
    """A recipe of the curve: its --text-encoder ({work} for WORK), the number of the U-Net's lowest levels with self-
    and cross-attention, changes to RECIPE, and the share of two-object scenes in its training data."""

    encoder: str
    attention_levels: int = 1
    changes: tuple[tuple[str, Any], ...] = ()
    pairs_share: float | None = None  # None: the shapes world's own mix (half the scenes hold two objects)
    channels: int | None = None  # the U-Net's width at its top level; None: the tiny preset's 32


CLIP, PHRASES, SLOTS = "clip:{work}/clip", "phrases:clip:{work}/clip", "phrases-slots:clip:{work}/clip"
COSINE = (("lr_schedule", "cosine"),)  # the learning rate decays to 0 at the end of the budget: one run per budget
# base: the tiny U-Net as it is (attention at its lowest level, 4 x 4) on the CLIP's text tower; attn2: attention at
# the two lowest (8 x 8 too); negclip: base on the text tower of a CLIP trained with hard negatives (difflab train-clip
# --hard-negatives); phrases: base on the CLIP's tower read phrase by phrase (subject / relation / object,
# difflab.text.phrases), its pooled embedding the whole caption's; phrases-slots: the same with the parts' pooled
# embeddings side by side; ...-attn2: at the two lowest levels; phrases-slots-minilm-attn2: on frozen MiniLM, not the
# CLIP's tower; ...-cosine: the cosine learning-rate schedule; -lr4: lr 4e-3; -b32: batch 32; -pairs75: 3/4 of the
# training scenes with two objects; -w24, -w16: the U-Net 24 or 16 channels wide at its top level, not 32 (cheaper
# steps: `throughput`); -pm04: EDM's P_mean 0.4, not -0.4 (more training at high noise, where the layout is decided);
# -minsnr5: Min-SNR-5 loss weighting. Each trains into WORK/glide32[-VARIANT].
VARIANTS = {
    "base": Variant(CLIP),
    "attn2": Variant(CLIP, 2),
    "negclip": Variant("clip:{work}/negclip"),
    "phrases": Variant(PHRASES),
    "phrases-slots": Variant(SLOTS),
    "phrases-attn2": Variant(PHRASES, 2),
    "phrases-slots-attn2": Variant(SLOTS, 2),
    "phrases-slots-minilm-attn2": Variant("phrases-slots:minilm", 2),
    "phrases-slots-attn2-cosine": Variant(SLOTS, 2, COSINE),
    "phrases-slots-attn2-cosine-lr4": Variant(SLOTS, 2, (*COSINE, ("lr", 4e-3))),
    "phrases-slots-attn2-cosine-b32": Variant(SLOTS, 2, (*COSINE, ("batch_size", 32))),
    "phrases-slots-attn2-cosine-pairs75": Variant(SLOTS, 2, COSINE, pairs_share=0.75),
    "phrases-slots-attn2-cosine-30min": Variant(SLOTS, 2, COSINE),  # trained with --minutes 30 --threads 2
    "phrases-slots-attn2-cosine-w24": Variant(SLOTS, 2, COSINE, channels=24),
    "phrases-slots-attn2-cosine-w16": Variant(SLOTS, 2, COSINE, channels=16),
    "phrases-slots-attn2-cosine-pm04": Variant(SLOTS, 2, (*COSINE, ("p_mean", 0.4))),
    "phrases-slots-attn2-cosine-minsnr5": Variant(SLOTS, 2, (*COSINE, ("min_snr_gamma", 5.0))),
    "phrases-slots-attn2-cosine-pm04-30min": Variant(SLOTS, 2, (*COSINE, ("p_mean", 0.4))),  # --minutes 30 --threads 2
}


def run_folder(work: Path, variant: str) -> Path:
    return work / ("glide32" if variant == "base" else f"glide32-{variant}")


def train(work: Path, steps: int | None, variant: str, minutes: float | None = None) -> None:
    data = training_data(variant)
    train_run(variant_config(work, variant, data, steps, minutes), run_folder(work, variant), data=data, progress=False)


def training_data(variant: str) -> difflab.data.Dataset:
    share = VARIANTS[variant].pairs_share
    return difflab.load_dataset("shapes", resolution=RESOLUTION, size=SCENES) if share is None else pairs_mix(share)


def variant_config(work: Path, variant: str, data: difflab.data.Dataset, steps: int | None,
                   minutes: float | None) -> difflab.RunConfig:  # fmt: skip
    """The variant's run config: RECIPE with its changes, its text encoder, attention levels and width."""
    v = VARIANTS[variant]
    config = difflab.run_config(data, steps=None if minutes else steps, minutes=minutes, checkpoint_every=EVERY,
                                text_encoder=v.encoder.format(work=work), attention_levels=v.attention_levels,
                                **RECIPE | dict(v.changes))  # fmt: skip
    config = replace(config, train=replace(config.train, keep_checkpoints=100))  # the whole curve
    if v.channels is None:
        return config
    return replace(config, model=replace(config.model, settings=replace(config.model.settings, channels=v.channels)))


def throughput(work: Path, variants: list[str], steps: int = 60, rounds: int = 3) -> dict[str, float]:
    """Seconds per training step of each variant, measured side by side (`seconds_per_step`)."""
    runs = {v: lambda v=v: (variant_config(work, v, training_data(v), steps, None), training_data(v)) for v in variants}
    return seconds_per_step(runs, steps, rounds)


def seconds_per_step(runs: dict[str, Callable[[], tuple[difflab.RunConfig, difflab.data.Dataset]]], steps: int = 60,
                     rounds: int = 3) -> dict[str, float]:  # fmt: skip
    """Seconds per training step of each run (name -> a function giving its config and data), measured side by side:
    `rounds` rounds of a fresh `steps`-step run of each in turn (the first 10 steps of every run not counted:
    warm-up), the median round per run, from the training log's clock."""
    import statistics
    import tempfile

    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, build in runs.items():
            config, data = build()
            config = replace(config, train=replace(config.train, steps=steps, minutes=None, log_every=10,
                                                   checkpoint_every=10 * steps))  # fmt: skip
            with tempfile.TemporaryDirectory() as tmp:
                train_run(config, Path(tmp) / "run", data=data, progress=False)
                clock = {r["step"]: r["elapsed_s"] for r in read_log(Path(tmp) / "run") if "elapsed_s" in r}
            times[name].append((clock[steps] - clock[10]) / (steps - 10))
    per_step = {name: statistics.median(t) for name, t in times.items()}
    first = next(iter(per_step))
    for name, t in per_step.items():
        print(f"{name}: {t:.3f} s per step ({per_step[first] / t:.2f}x the steps/s of {first})", flush=True)
    return per_step


def pairs_mix(share: float) -> difflab.data.Dataset:
    """SCENES training scenes of which `share` hold two objects (the stream's first ones of each kind)."""
    from difflab.data.shapes import ShapesStream

    images, captions, scenes = ShapesStream(0, RESOLUTION, "train").next(4 * SCENES)
    two = [i for i, s in enumerate(scenes) if len(s.objects) == 2][: round(share * SCENES)]
    one = [i for i, s in enumerate(scenes) if len(s.objects) == 1][: SCENES - len(two)]
    keep = sorted(one + two)
    return difflab.data.Dataset("shapes", "images", images[keep], None, tuple(captions[i] for i in keep),
                                tuple(scenes[i] for i in keep))  # fmt: skip


def by_objects(images: torch.Tensor, captions: list[str]) -> dict[str, dict]:
    """Adherence on the one-object captions and on the two-object ones apart (relations are only in the latter)."""
    counts = [len(parse_caption(c).objects) for c in captions]
    rows = {k: [i for i, m in enumerate(counts) if m == k] for k in (1, 2)}
    return {f"{k} object{'s' if k > 1 else ''}": adherence(images[idx], [captions[i] for i in idx])
            for k, idx in rows.items()}  # fmt: skip


def evaluate(work: Path, out: Path, variant: str) -> None:
    run = run_folder(work, variant)
    prompts = prompt_set(PROMPTS)
    reference = prompt_reference(prompts, RESOLUTION)
    clock = {row["step"]: row["elapsed_s"] for row in read_log(run) if "elapsed_s" in row}
    earlier = out.with_suffix(".json")
    done = {r["step"]: r for r in json.loads(earlier.read_text())["rows"]} if earlier.exists() else {}
    for checkpoint in list_checkpoints(run):
        pipe = difflab.load(checkpoint)
        if pipe.step in done and "by_objects" in done[pipe.step]:  # scored by an earlier call (the same seeds)
            continue
        images = pipe.sample(seeds=range(len(prompts)), prompt=prompts, guidance=W, sampler=SAMPLER,
                             steps=SAMPLE_STEPS)  # fmt: skip
        scored = score_prompt_samples(images, reference) | {"by_objects": by_objects(images, prompts)}
        done[pipe.step] = {"step": pipe.step, "minutes": clock.get(pipe.step, float("nan")) / 60, **scored}
        print(pipe.step, {k: round(v, 3) for k, v in scored["adherence"]["all"].items() if k in ATTRIBUTES}, flush=True)
    rows = [done[step] for step in sorted(done)]
    meta = {"date": datetime.date.today().isoformat(), "machine": platform.machine(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "recipe": RECIPE, "w": W, "prompts": 2 * PROMPTS}  # fmt: skip
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=float))
    lines = ["| step | minutes | " + " | ".join(f"{a} train / held-out" for a in ATTRIBUTES) +
             " | full, 1 / 2 objects | FD |", "|---" * (len(ATTRIBUTES) + 4) + "|"]  # fmt: skip
    for row in rows:
        train_acc, test_acc = row["adherence"]["train"], row["adherence"]["test"]
        cells = [f"{100 * train_acc[a]:.0f} / {100 * test_acc[a]:.0f}%" for a in ATTRIBUTES]
        one, two = (row["by_objects"][k]["full"] for k in ("1 object", "2 objects"))
        lines.append(f"| {row['step']} | {row['minutes']:.0f} | " + " | ".join(cells) +
                     f" | {100 * one:.0f} / {100 * two:.0f}% | {row['fd']['all']:.2f} |")  # fmt: skip
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def figure(work: Path, out: Path, variant: str, prompts_per_split: int = 3, columns: int = 6) -> None:
    """The same prompts and seeds drawn by checkpoints spread along the run: one row per prompt, one column per
    checkpoint (left to right: more training)."""
    checkpoints = list_checkpoints(run_folder(work, variant))
    picked = [checkpoints[round(i * (len(checkpoints) - 1) / (columns - 1))] for i in range(columns)]
    prompts = prompt_set(PROMPTS)
    chosen = prompts[:prompts_per_split] + prompts[PROMPTS : PROMPTS + prompts_per_split]
    pipes = [difflab.load(c) for c in dict.fromkeys(picked)]
    drawn = [p.sample(seeds=range(len(chosen)), prompt=chosen, guidance=W, sampler=SAMPLER, steps=SAMPLE_STEPS)
             for p in pipes]  # fmt: skip
    images = torch.stack([d[j] for j in range(len(chosen)) for d in drawn])
    steps = ", ".join(f"{p.step:,}" for p in pipes)
    labels = [f"{c} ({'held-out' if j < prompts_per_split else 'train'})" for j, c in enumerate(chosen)]
    save_prompt_rows(images, labels, out.with_suffix(".png"), title=f"training steps {steps}, w = {W}")


def checkpoint_at(work: Path, variant: str, step: int | None) -> Path:
    """The variant's checkpoint at `step` (default: the latest)."""
    checkpoints = list_checkpoints(run_folder(work, variant))
    if step is None:
        return checkpoints[-1]
    found = [c for c in checkpoints if c.name == f"step_{step:08d}"]
    if not found:
        raise SystemExit(f"{variant} has no checkpoint at step {step}: {', '.join(c.name for c in checkpoints)}")
    return found[0]


def sweep(work: Path, out: Path, variant: str, step: int | None, interval: tuple[float, float] | None = None,
          scales: tuple[float, ...] = SCALES, n_per_prompt: int = 1) -> None:  # fmt: skip
    """Adherence and FD against the guidance scale (SCALES) at one checkpoint (default: the latest); with `interval`,
    guidance only for LO <= sigma <= HI (Kynkaanniemi et al. 2024); `n_per_prompt` samples of each prompt (seeds 0..,
    a tighter estimate). Written to ..._sweep_STEP[_nN][_interval].json."""
    pipe = difflab.load(checkpoint_at(work, variant, step))
    rows = sweep_guidance(pipe, prompt_set(PROMPTS), scales, n_per_prompt=n_per_prompt, sampler=SAMPLER,
                          steps=SAMPLE_STEPS, guidance_interval=interval)  # fmt: skip
    for row in rows:
        print(row["guidance"], {k: round(v, 3) for k, v in row["adherence"]["all"].items() if k in ATTRIBUTES},
              round(row["fd"]["all"], 3), flush=True)  # fmt: skip
    repeats = f"_n{n_per_prompt}" if n_per_prompt > 1 else ""
    path = out.with_name(out.name + f"_sweep_{pipe.step}{repeats}" + ("_interval.json" if interval else ".json"))
    path.write_text(json.dumps({"step": pipe.step, "interval": interval, "rows": rows}, indent=2, default=float))


def relations(work: Path, out: Path, variant: str, step: int | None, repeats: int = 2) -> None:
    """Where two-object captions fail, at one checkpoint: the fixed set's two-object prompts, `repeats` seeds each; how
    often each named object (colour and shape) is drawn at all, and the relation outcome of `relation_reversals`
    (both found: correct / reversed / unclear; else missing)."""
    pipe = difflab.load(checkpoint_at(work, variant, step))
    captions = [c for c in prompt_set(PROMPTS) if parse_caption(c).relation] * repeats
    images = pipe.sample(seeds=range(len(captions)), prompt=captions, guidance=W, sampler=SAMPLER, steps=SAMPLE_STEPS)
    drawn = [[find_object(o, recover_scene(image), set()) is not None for o in parse_caption(c).objects]
             for image, c in zip(images, captions, strict=True)]  # fmt: skip
    shares = {name: sum(d[k] for d in drawn) / len(drawn) for k, name in enumerate(("first drawn", "second drawn"))}
    result = {"step": pipe.step, **shares, **relation_reversals(images, captions)}
    print(result, flush=True)
    out.with_name(out.name + f"_relations_{pipe.step}.json").write_text(json.dumps(result, indent=2))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=("train", "eval", "figure", "sweep", "relations", "throughput"))
    p.add_argument("--step", type=int, help="sweep, relations: the checkpoint at this step (default: the latest)")
    p.add_argument("--work", default="runs/t2i-curve")
    p.add_argument("--steps", type=int, default=12_000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--minutes", type=float, help="train: a wall-clock budget instead of --steps")
    p.add_argument("--variant", choices=tuple(VARIANTS), default="base")
    p.add_argument("--compare", choices=tuple(VARIANTS), nargs="+", help="throughput: the variants to time")
    p.add_argument("--scales", type=float, nargs="+", default=SCALES, help="sweep: the guidance scales")
    p.add_argument("--n-per-prompt", type=int, default=1, help="sweep: samples of each prompt (seeds 0..)")
    p.add_argument("--guidance-interval", type=float, nargs=2, metavar=("LO", "HI"), help="sweep: guide only there")
    p.add_argument("--out", default=None, help="default benchmarks/results/text_to_image_curve[_VARIANT]")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.phase == "throughput":
        throughput(Path(args.work), args.compare or p.error("throughput: name the variants with --compare"))
        return 0
    suffix = "" if args.variant == "base" else f"_{args.variant}"
    out = Path(args.out or RESULTS / f"text_to_image_curve{suffix}")
    if args.phase == "train":
        train(Path(args.work), args.steps, args.variant, args.minutes)
    elif args.phase == "eval":
        evaluate(Path(args.work), out, args.variant)
    elif args.phase == "figure":
        figure(Path(args.work), out, args.variant)
    elif args.phase == "relations":
        relations(Path(args.work), out, args.variant, args.step)
    else:
        sweep(
            Path(args.work), out, args.variant, args.step, args.guidance_interval, tuple(args.scales), args.n_per_prompt
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
