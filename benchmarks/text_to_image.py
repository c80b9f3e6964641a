"""Text to image on the captioned shapes world (issue 12): caption adherence and FD against guidance, encoders,
cascade, inpainting methods and throughput, at a fixed training budget per model.

    python benchmarks/text_to_image.py train scratch32 minilm32     # trains into runs/bench-t2i/<name> (one core each)
    python benchmarks/text_to_image.py train base16 up32
    python benchmarks/text_to_image.py train inpaint32              # fine-tunes scratch32 (GLIDE), after it
    python benchmarks/text_to_image.py eval                         # -> benchmarks/results/text_to_image.{md,json,png}
    python benchmarks/text_to_image.py --quick train ...; ... --quick eval   # tiny budgets: a smoke test (~3 min)

Models (all EDM, the `tiny` U-Net, `RECIPE`'s batch, learning rate and noise levels; at 32x32 on 2 x 2 patches,
`--patch-size 2`, about the cost of a 16x16 model; `MODELS` gives the steps of each):
* scratch32 / minilm32: base models at 32x32 with the scratch text transformer (GLIDE's choice) and with the frozen
  all-MiniLM-L6-v2 (`difflab[text]`), the same steps: the encoder comparison.
* base16 + up32: a 16x16 base model and a 16 -> 32 text-conditional upsampler (noise-conditioning augmentation
  s_max 0.5 in training, level `UP_LEVEL` at sampling; Ho et al. 2021): the cascade, against scratch32 alone.
* inpaint32: GLIDE's inpainting model, scratch32 fine-tuned with the masked image and the mask as extra channels
  (`--init-from`), against the training-free replacement and RePaint methods run with scratch32 itself.

Evaluation (`eval`; the exact evaluator `difflab.eval.shapes`, FD in its 51-d feature space):
* the evaluator on rendered images at 16, 32 and 64 (its ceiling at each resolution);
* guidance sweep, w in SCALES, for scratch32 and minilm32: PROMPTS captions per split of the fixed prompt set
  (`difflab.eval.adherence.prompt_set`: held-out compositions and train captions), one sample each, dpmpp_2m
  SAMPLE_STEPS steps; the unguided model is w = 1 (the conditional model as it is);
* cascade: base16 + up32 against scratch32 at w = CASCADE_W, judged at 32x32;
* inpainting: the two-object captions of the prompt set rendered at 32x32 (`render_captions`); the half of the image
  holding the caption's second object (by the relation: "X left of Y" -> the right half) is regenerated with the full
  caption as prompt at w = INPAINT_W; scored by full-caption adherence of the result; the original and the image
  with that half black are the bounds;
* throughput: training steps per second of each model's configuration and sampled images per second, measured side
  by side in this run (TIMING_STEPS steps each), one thread.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

import difflab
from difflab.cascade import cascade_batches
from difflab.data.shapes import parse_caption
from difflab.editing import inpaint
from difflab.eval.adherence import prompt_reference, prompt_set, render_captions, score_prompt_samples, sweep_guidance
from difflab.eval.shapes import adherence, calibrate
from difflab.text_demo import PROMPTS as GRID_PROMPTS
from difflab.training.run import train_run
from difflab.viz.text import save_guidance_sweep, save_prompt_rows

RECIPE = {
    "process": "edm",
    "model": "tiny",
    "batch_size": 64,
    "lr": 2e-3,
    "caption_dropout": 0.2,
    "p_mean": -0.4,
    "p_std": 1.4,
}  # noise levels shifted up from EDM's -1.2, 1.2: layout is decided there
# name: (resolution, run_config settings, steps, --quick steps). 2500 steps of a 32x32 base model on 2 x 2 patches are
# ~30 minutes of a free core (the budget); the cascade's and the inpainting model's budgets are smaller.
MODELS = {
    "scratch32": (32, {"text_encoder": "scratch", "patch_size": 2}, 2500, 20),
    "minilm32": (32, {"text_encoder": "minilm", "patch_size": 2}, 2500, 20),
    "base16": (16, {"text_encoder": "scratch"}, 1500, 20),
    "up32": (32, {"text_encoder": "scratch", "upsample_from": 16, "patch_size": 2}, 600, 20),
    "inpaint32": (32, {"inpainting": True, "init_from": "scratch32"}, 300, 10),
}
SCENES = 20_000
SCALES = (1.0, 2.0, 3.0, 5.0, 7.0)
PROMPTS, SAMPLE_STEPS, SAMPLER = 100, 20, "dpmpp_2m"
CASCADE_W, INPAINT_W, UP_LEVEL = 3.0, 3.0, 0.1
INPAINT_STEPS, REPAINT = 25, (5, 4)  # RePaint: jump 5, 4 resamplings (DDPM steps)
TIMING_STEPS = 10
DEVICE = "cpu"  # --device


def model_config(name: str, work: Path, quick: bool):
    resolution, settings, steps, quick_steps = MODELS[name]
    settings = dict(settings)
    if "init_from" in settings:
        settings["init_from"] = work / settings["init_from"]
        settings.pop("text_encoder", None)
    data = difflab.load_dataset("shapes", resolution=resolution, split="train", size=500 if quick else SCENES)
    config = difflab.run_config(data, steps=quick_steps if quick else steps, checkpoint_every=500, **RECIPE,
                                **settings)  # fmt: skip
    return config, data


def train(names: list[str], work: Path, quick: bool) -> None:
    for name in names:
        if name not in MODELS:
            sys.exit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
        out = work / name
        if (out / "checkpoints").exists():
            print(f"{out} exists: skipped (delete it to train again)", flush=True)
            continue
        config, data = model_config(name, work, quick)
        start = time.monotonic()
        outcome = train_run(config, out, data=data, device=DEVICE, progress=False)
        minutes = (time.monotonic() - start) / 60
        print(f"{name}: {outcome.step} steps in {minutes:.1f} min", flush=True)
        (out / "bench_train.json").write_text(json.dumps({"steps": outcome.step, "minutes": minutes}))


def _rounded(value):
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


def guidance_rows(pipe, prompts: list[str]) -> list[dict]:
    rows = sweep_guidance(pipe, prompts, SCALES, sampler=SAMPLER, steps=SAMPLE_STEPS)
    return [_rounded(r) for r in rows]


def cascade_row(base, up, prompts: list[str]) -> dict:
    seeds = list(range(len(prompts)))
    batches = cascade_batches(base, up, seeds=seeds, prompt=prompts, guidance=CASCADE_W, sampler=SAMPLER,
                              steps=SAMPLE_STEPS, low_res_noise=UP_LEVEL)  # fmt: skip
    images = torch.cat([high for _, _, high in batches])
    return _rounded(score_prompt_samples(images, prompt_reference(prompts, 32)))


def fill_half(relation: str, resolution: int) -> torch.Tensor:
    """The fill mask (1, 1, R, R) of the half where the caption's second object lies: "X left of Y" -> right half."""
    fill, half = torch.zeros(1, 1, resolution, resolution), resolution // 2
    rest, first = slice(half, None), slice(None, half)
    region = {"left of": (..., rest), "right of": (..., first), "above": (..., rest, slice(None)),
              "below": (..., first, slice(None))}  # fmt: skip
    fill[region[relation]] = 1
    return fill


def inpainting_rows(base, glide, prompts: list[str]) -> list[dict]:
    captions = [c for c in prompts if parse_caption(c).relation is not None]
    originals = render_captions(captions, 32)
    fills = torch.cat([fill_half(parse_caption(c).relation, 32) for c in captions])
    seeds = list(range(len(captions)))
    rows = [{"method": "original (upper bound)", "nfe": 0, **adherence(originals, captions)}]
    rows.append({"method": "half left black (lower bound)", "nfe": 0,
                 **adherence(originals * (1 - fills) - fills, captions)})  # fmt: skip
    stats: dict = {}
    made = glide.inpaint(originals, fills, seeds=seeds, prompt=captions, guidance=INPAINT_W, sampler="ddpm",
                         steps=INPAINT_STEPS, stats=stats)  # fmt: skip
    rows.append({"method": "GLIDE inpainting model (ddpm)", "nfe": stats["nfe"], **adherence(made, captions)})
    for label, repaint in (("replacement (ddpm)", None), (f"RePaint j{REPAINT[0]} r{REPAINT[1]}", REPAINT)):
        cond, denoiser = base.prepare(len(captions), prompt=captions, guidance=INPAINT_W)
        sigmas = base.sigmas(INPAINT_STEPS)
        stats = {}
        made = inpaint(denoiser, originals, fills, sigmas, seeds, sampler="ddpm", repaint=repaint, kernel=base.kernel,
                       cond=cond, device=base.device, stats=stats)  # fmt: skip
        rows.append({"method": label, "nfe": stats["nfe"], **adherence(made, captions)})
    return [_rounded(r) for r in rows]


def throughput(work: Path) -> dict:
    """Training steps/s of each model's configuration (and of scratch32 without patches) and guided sampling
    images/s, side by side; each training rate over TIMING_STEPS steps after 2 untimed ones."""
    out, names = {}, [n for n in MODELS if n != "inpaint32" or (work / "scratch32" / "checkpoints").exists()]
    for name in [*names, "scratch32 without patches"]:
        config, data = model_config(name.split()[0], work, True)
        if name.endswith("without patches"):
            plain = replace(config.model.settings, patch_size=1, attention_resolutions=(8,))
            config = replace(config, model=replace(config.model, settings=plain))
        config = replace(config, train=replace(config.train, steps=2, warmup_steps=0))
        run = work / "timing" / name.replace(" ", "-")
        shutil.rmtree(run, ignore_errors=True)
        train_run(config, run, data=data, device=DEVICE, progress=False)
        start = time.monotonic()
        train_run(None, run, data=data, device=DEVICE, resume=True, steps=2 + TIMING_STEPS, progress=False)
        out[f"train {name} (steps/s)"] = TIMING_STEPS / (time.monotonic() - start)
    for name in ("base16", "scratch32"):
        if (work / name / "checkpoints").exists():
            pipe = difflab.load(work / name, device=DEVICE)
            start = time.monotonic()
            pipe.sample(seeds=range(32), prompt=prompt_set(16), guidance=3.0, sampler=SAMPLER, steps=SAMPLE_STEPS)
            out[f"sample {name} w=3 {SAMPLER} {SAMPLE_STEPS} steps (images/s)"] = 32 / (time.monotonic() - start)
    return _rounded(out)


def evaluate(work: Path, quick: bool, out: Path) -> None:
    prompts = prompt_set(8 if quick else PROMPTS)
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}"
    results: dict = {"date": datetime.date.today().isoformat(), "machine": machine, "quick": quick}
    for name in MODELS:
        path = work / name / "bench_train.json"
        results.setdefault("training", {})[name] = json.loads(path.read_text()) if path.exists() else None
    print("evaluator on rendered images ...", flush=True)
    results["evaluator"] = {r: _rounded(calibrate(r, n=100 if quick else 500)) for r in (16, 32, 64)}
    have = {name for name in MODELS if (work / name / "checkpoints").exists()}
    results["missing"] = sorted(set(MODELS) - have)
    results["guidance"] = {}
    for name in sorted({"scratch32", "minilm32"} & have):
        print(f"guidance sweep: {name} ...", flush=True)
        pipe = difflab.load(work / name, device=DEVICE)
        results["guidance"][name] = rows = guidance_rows(pipe, prompts)
        save_guidance_sweep(rows, out.with_name(f"{out.name}_{name}_guidance.png"),
                            title=f"{name} (step {pipe.step}): {len(prompts) // 2} captions per split")  # fmt: skip
        captions = [p for p in GRID_PROMPTS for _ in range(4)]
        grid = pipe.sample(seeds=[i % 4 for i in range(len(captions))], prompt=captions, guidance=3.0,
                           sampler=SAMPLER, steps=SAMPLE_STEPS)  # fmt: skip
        save_prompt_rows(grid, list(GRID_PROMPTS), out.with_name(f"{out.name}_{name}_prompts.png"),
                         title=f"{name} (step {pipe.step}), w = 3, seeds 0..3")  # fmt: skip
    if {"scratch32", "base16", "up32"} <= have:
        print("cascade ...", flush=True)
        base32, base16, up = (difflab.load(work / n, device=DEVICE) for n in ("scratch32", "base16", "up32"))
        alone = base32.sample(seeds=range(len(prompts)), prompt=prompts, guidance=CASCADE_W, sampler=SAMPLER,
                              steps=SAMPLE_STEPS)  # fmt: skip
        results["cascade"] = {"scratch32 alone": _rounded(score_prompt_samples(alone, prompt_reference(prompts, 32))),
                              "base16 + up32": cascade_row(base16, up, prompts)}  # fmt: skip
    if {"scratch32", "inpaint32"} <= have:
        print("inpainting ...", flush=True)
        glide = difflab.load(work / "inpaint32", device=DEVICE)
        results["inpainting"] = inpainting_rows(difflab.load(work / "scratch32", device=DEVICE), glide, prompts)
    print("throughput ...", flush=True)
    results["throughput"] = throughput(work)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    out.with_suffix(".md").write_text(report(results))
    print(report(results))


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def report(results: dict) -> str:
    keys = ("colour", "shape", "size", "position", "relation", "full")
    lines = [f"# Text to image ({results['date']}, {results['machine']}{', QUICK' if results['quick'] else ''})", ""]
    lines += ["## Training", "", "| model | steps | minutes |", "|---|---|---|"]
    for name, t in results["training"].items():
        lines.append(f"| {name} | {t['steps'] if t else '-'} | {t['minutes']:.1f} |" if t else f"| {name} | - | - |")
    lines += ["", "## The evaluator on rendered images", "", "| resolution | " + " | ".join(keys) + " |",
              "|---" * (len(keys) + 1) + "|"]  # fmt: skip
    for r, acc in results["evaluator"].items():
        lines.append(f"| {r} | " + " | ".join(_pct(acc.get(k)) for k in keys) + " |")
    for name, rows in results["guidance"].items():
        lines += ["", f"## Guidance sweep: {name}", "", "| w | split | " + " | ".join(keys) + " | FD |",
                  "|---" * (len(keys) + 3) + "|"]  # fmt: skip
        for row in rows:
            for split in ("train", "test"):
                acc = row["adherence"].get(split, {})
                fd = row["fd"].get(split)
                lines.append(f"| {row['guidance']:g} | {split} | " + " | ".join(_pct(acc.get(k)) for k in keys)
                             + f" | {'-' if fd is None else f'{fd:.2f}'} |")  # fmt: skip
    lines += ["", f"## Cascade at 32x32 (w = {CASCADE_W:g})", "", "| pipeline | split | " + " | ".join(keys)
              + " | FD |", "|---" * (len(keys) + 3) + "|"]  # fmt: skip
    for name, row in results.get("cascade", {}).items():
        for split in ("train", "test"):
            acc, fd = row["adherence"].get(split, {}), row["fd"].get(split)
            lines.append(f"| {name} | {split} | " + " | ".join(_pct(acc.get(k)) for k in keys)
                         + f" | {'-' if fd is None else f'{fd:.2f}'} |")  # fmt: skip
    lines += ["", f"## Inpainting the half with the second object (w = {INPAINT_W:g}, {INPAINT_STEPS} steps)", "",
              "| method | NFE | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]  # fmt: skip
    for row in results.get("inpainting", []):
        lines.append(f"| {row['method']} | {row['nfe']:g} | " + " | ".join(_pct(row.get(k)) for k in keys) + " |")
    if results["missing"]:
        lines += ["", f"Not trained, so not evaluated: {', '.join(results['missing'])}."]
    lines += ["", "## Throughput (one thread, side by side)", "", "| what | rate |", "|---|---|"]
    lines += [f"| {k} | {v:.3g} |" for k, v in results["throughput"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny budgets and prompt counts: a smoke test")
    p.add_argument("--work", default="runs/bench-t2i", help="where the models are trained (default runs/bench-t2i)")
    p.add_argument("--out", default="benchmarks/results/text_to_image", help="results path without extension")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, or auto (cuda when available)")
    p.add_argument("phase", choices=("train", "eval"))
    p.add_argument("models", nargs="*", help=f"train: which ({', '.join(MODELS)}; default all, in order)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    global DEVICE
    DEVICE = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    work = Path(args.work + ("-quick" if args.quick else ""))
    out = Path(args.out + ("_quick" if args.quick else ""))
    if args.phase == "train":
        train(args.models or list(MODELS), work, args.quick)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        evaluate(work, args.quick, out)


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
