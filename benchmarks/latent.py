"""Latent diffusion on the captioned shapes world at 32x32 (issue 13): the autoencoder's reconstructions, pixel- vs
latent-space text models at equal CPU training time, DiT vs U-Net at equal time and at equal training FLOPs.

    python benchmarks/latent.py ae                 # the autoencoder (f = 4, C = 4): runs/bench-latent/ae
    python benchmarks/latent.py timing             # steps/s of each model, side by side: WORK/timing.json
    python benchmarks/latent.py train [MODEL...]   # each model for BUDGET_MINUTES of its measured rate (in steps)
    python benchmarks/latent.py eval               # -> benchmarks/results/latent.{md,json}
    python benchmarks/latent.py figure             # -> benchmarks/results/latent_samples.png
    python benchmarks/latent.py --quick ae timing train eval   # tiny budgets: a smoke test (minutes)

Models (all EDM with the text-to-image benchmark's recipe: scratch text encoder, batch 64, lr 2e-3, noise levels
P_mean -0.4, P_std 1.4):
* pixel: the tiny U-Net on the 32x32 images on 2 x 2 patches (issue 12's scratch32 configuration);
* latent-unet: the tiny U-Net on the autoencoder's 4x8x8 latents;
* latent-dit: dit-tiny on the latents (patch 1: 64 tokens), the same minutes;
* latent-dit-flops: dit-tiny given the training FLOPs latent-unet used (steps x forward GFLOPs equal);
* latent-dit-p2: dit-tiny on 2 x 2 patches of the latents (16 tokens instead of 64), the same minutes.
"Equal CPU time" is enforced in steps: each model trains BUDGET_MINUTES x its steps/s measured side by side in one
`timing` run (one thread), so a busy machine does not favour whichever model ran when it was quiet.

Evaluation: the autoencoder's PSNR on PROMPTS test-split scenes and the exact evaluator's accuracy on their
reconstructions (beside the rendered originals'); per model, caption adherence and FD (the evaluator's feature space)
at w = W on the fixed prompt set (PROMPTS captions per split), dpmpp_2m SAMPLE_STEPS steps; sampling images/s (decoding
included) side by side.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import time
from pathlib import Path

import torch

import difflab
from difflab.autoencoder.losses import AutoencoderLossConfig
from difflab.autoencoder.nets import AutoencoderConfig
from difflab.autoencoder.training import AutoencoderRun, autoencoder_train_config, load_autoencoder, train_autoencoder
from difflab.config import DataConfig
from difflab.eval.adherence import prompt_reference, prompt_set, score_prompt_samples
from difflab.eval.shapes import adherence
from difflab.nets.cost import network_cost
from difflab.training.run import train_run

RECIPE = {"process": "edm", "text_encoder": "scratch", "batch_size": 64, "lr": 2e-3, "caption_dropout": 0.2,
          "p_mean": -0.4, "p_std": 1.4}  # fmt: skip
MODELS = {
    "pixel": {"model": "tiny", "patch_size": 2},
    "latent-unet": {"model": "tiny", "latent": True},
    "latent-dit": {"model": "dit-tiny", "latent": True},
    "latent-dit-flops": {"model": "dit-tiny", "latent": True, "flops_of": "latent-unet"},
    "latent-dit-p2": {"model": "dit-tiny", "latent": True, "patch_size": 2},
}
AE = {"factor": 4, "latent_channels": 4, "width": 16, "steps": 2500, "lr": 1e-3, "batch_size": 32}
BUDGET_MINUTES, QUICK_MINUTES = 10.0, 0.2
SCENES, QUICK_SCENES = 20_000, 500
PROMPTS, W, SAMPLER, SAMPLE_STEPS = 100, 3.0, "dpmpp_2m", 20
TIMING_STEPS = 8


def shapes(quick: bool, split: str = "train", size: int | None = None):
    return difflab.load_dataset("shapes", resolution=32, split=split, size=size or (QUICK_SCENES if quick else SCENES))


def train_ae(work: Path, quick: bool) -> None:
    data = shapes(quick)
    shape = tuple(data.sample_shape)
    network = AutoencoderConfig(shape[0], AE["factor"], AE["latent_channels"], AE["width"])
    tc = autoencoder_train_config(steps=20 if quick else AE["steps"], lr=AE["lr"], batch_size=AE["batch_size"])
    run = AutoencoderRun(DataConfig("shapes", "images", shape, 32, 3), network, AutoencoderLossConfig(), tc)
    start = time.monotonic()
    result = train_autoencoder(run, data.data, work / "ae")
    minutes = (time.monotonic() - start) / 60
    print(f"ae: {result.step} steps in {minutes:.1f} min, PSNR {result.psnr_db:.2f} dB", flush=True)
    (work / "ae" / "bench_train.json").write_text(json.dumps({"steps": result.step, "minutes": minutes}))


def model_config(name: str, work: Path, quick: bool, steps: int):
    settings = {k: v for k, v in MODELS[name].items() if k not in ("latent", "flops_of")}
    if MODELS[name].get("latent"):
        settings["autoencoder"] = str(work / "ae")
    data = shapes(quick)
    return difflab.run_config(data, steps=steps, checkpoint_every=500, **RECIPE, **settings), data


def timing(work: Path, quick: bool, names: list[str]) -> None:
    """Training steps/s of the models (all by default; TIMING_STEPS after 2 untimed), one after the other in this
    process, added to WORK/timing.json."""
    path = work / "timing.json"
    rates = json.loads(path.read_text()) if path.exists() else {}
    for name in names or list(MODELS):
        if "flops_of" in MODELS[name]:
            continue
        config, data = model_config(name, work, quick, 2)
        run = work / "timing" / name
        shutil.rmtree(run, ignore_errors=True)
        train_run(config, run, data=data, progress=False)
        start = time.monotonic()
        train_run(None, run, data=data, resume=True, steps=2 + TIMING_STEPS, progress=False)
        rates[name] = TIMING_STEPS / (time.monotonic() - start)
        rates[f"{name} gflops"] = network_cost(config.model, config.model_shape).gflops
        print(f"{name}: {rates[name]:.3f} steps/s", flush=True)
    path.write_text(json.dumps(rates, indent=2))


def budget_steps(name: str, work: Path, quick: bool) -> int:
    rates = json.loads((work / "timing.json").read_text())
    minutes = QUICK_MINUTES if quick else BUDGET_MINUTES
    source = MODELS[name].get("flops_of")
    if source is None:
        return max(1, round(rates[name] * minutes * 60))
    base = budget_steps(source, work, quick)
    model = name.removesuffix("-flops")
    return max(1, round(base * rates[f"{source} gflops"] / rates[f"{model} gflops"]))


def train(names: list[str], work: Path, quick: bool) -> None:
    for name in names or list(MODELS):
        out = work / name
        if (out / "checkpoints").exists():
            print(f"{out} exists: skipped (delete it to train again)", flush=True)
            continue
        steps = budget_steps(name, work, quick)
        config, data = model_config(name, work, quick, steps)
        start = time.monotonic()
        outcome = train_run(config, out, data=data, progress=False)
        minutes = (time.monotonic() - start) / 60
        print(f"{name}: {outcome.step} steps in {minutes:.1f} min", flush=True)
        (out / "bench_train.json").write_text(json.dumps({"steps": outcome.step, "minutes": minutes}))


def autoencoder_rows(work: Path, count: int) -> dict:
    test = shapes(False, "test", count)
    model = load_autoencoder(work / "ae")
    with torch.no_grad():
        recon = model.decode(model.encode(test.data)).clamp(-1, 1)
    mse = float((recon - test.data).square().mean())
    return {"psnr_db": 10 * torch.log10(torch.tensor(4.0 / mse)).item(), "scale_factor": model.scale_factor,
            "rendered": adherence(test.data, list(test.captions)),
            "reconstructed": adherence(recon, list(test.captions))}  # fmt: skip


def evaluate(work: Path, quick: bool, out: Path) -> None:
    prompts = prompt_set(8 if quick else PROMPTS)
    reference = prompt_reference(prompts, 32)
    results = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {torch.get_num_threads()} "
               f"thread(s), torch {torch.__version__}", "quick": quick,
               "autoencoder": autoencoder_rows(work, 16 if quick else 2 * PROMPTS), "models": {}}  # fmt: skip
    results["timing"] = json.loads((work / "timing.json").read_text())
    for name in MODELS:
        if not (work / name / "checkpoints").exists():
            continue
        pipe = difflab.load(work / name)
        start = time.monotonic()
        images = pipe.sample(seeds=range(len(prompts)), prompt=prompts, guidance=W, sampler=SAMPLER,
                             steps=SAMPLE_STEPS)  # fmt: skip
        seconds = time.monotonic() - start
        row = score_prompt_samples(images, reference)
        row["images_per_s"] = len(prompts) / seconds
        row["train"] = json.loads((work / name / "bench_train.json").read_text())
        results["models"][name] = row
        print(name, row["adherence"]["all"].get("full"), row["fd"]["all"], flush=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2, default=float))
    out.with_suffix(".md").write_text(report(results))
    print(out.with_suffix(".md").read_text())


def figure(work: Path, out: Path, count: int = 8) -> Path:
    """Rows: test scenes as rendered, their reconstructions, then each model's samples for the scenes' captions (w =
    W, seeds 0..count-1)."""
    from difflab.viz.text import save_prompt_rows

    test = shapes(False, "test", count)
    ae = load_autoencoder(work / "ae")
    with torch.no_grad():
        rows = [test.data, ae.decode(ae.encode(test.data)).clamp(-1, 1)]
    labels = ["test scenes as rendered", f"their reconstructions (f = {AE['factor']}, C = {AE['latent_channels']})"]
    for name in MODELS:
        if (work / name / "checkpoints").exists():
            pipe = difflab.load(work / name)
            images = pipe.sample(seeds=range(count), prompt=list(test.captions), guidance=W, sampler=SAMPLER,
                                 steps=SAMPLE_STEPS)  # fmt: skip
            rows.append(images.clamp(-1, 1))
            labels.append(f"{name}: the scenes' captions, w = {W:g}")
    title = f"the first {count} test-split scenes (held-out compositions); the models draw from their captions"
    return save_prompt_rows(torch.cat(rows), labels, out.with_name(out.name + "_samples.png"), title=title)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def report(results: dict) -> str:
    keys = ("colour", "shape", "size", "position", "relation", "full")
    ae = results["autoencoder"]
    lines = [f"# Latent diffusion ({results['date']}, {results['machine']}{', QUICK' if results['quick'] else ''})", "",
             f"## Autoencoder (f = {AE['factor']}, C = {AE['latent_channels']}, width {AE['width']}, "
             f"{AE['steps']} steps)", "", f"PSNR {ae['psnr_db']:.2f} dB, scale factor {ae['scale_factor']:.4f}", "",
             "| images | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]  # fmt: skip
    for name in ("rendered", "reconstructed"):
        lines.append(f"| {name} | " + " | ".join(_pct(ae[name].get(k)) for k in keys) + " |")
    lines += ["", f"## Models at w = {W:g} ({SAMPLER}, {SAMPLE_STEPS} steps; all prompts)", "",
              "| model | steps | train steps/s | GFLOPs/sample | sample images/s | " + " | ".join(keys) + " | FD |",
              "|---" * (len(keys) + 6) + "|"]  # fmt: skip
    timing = results["timing"]
    for name, row in results["models"].items():
        base = name.removesuffix("-flops")
        acc, fd = row["adherence"]["all"], row["fd"]["all"]
        lines.append(f"| {name} | {row['train']['steps']} | {timing.get(base, 0):.3g} | "
                     f"{timing.get(base + ' gflops', 0):.3g} | {row['images_per_s']:.3g} | "
                     + " | ".join(_pct(acc.get(k)) for k in keys) + f" | {fd:.2f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny budgets: a smoke test")
    p.add_argument("--work", default="runs/bench-latent")
    p.add_argument("--out", default="benchmarks/results/latent")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("phases", nargs="+", help="ae, timing, train [MODEL...], eval, figure (in that order)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work + ("-quick" if args.quick else ""))
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out + ("_quick" if args.quick else ""))
    phases, names = [a for a in args.phases if a in ("ae", "timing", "train", "eval", "figure")], [
        a for a in args.phases if a in MODELS]  # fmt: skip
    for phase in phases:
        if phase == "ae":
            train_ae(work, args.quick)
        elif phase == "timing":
            timing(work, args.quick, names)
        elif phase == "train":
            train(names, work, args.quick)
        elif phase == "figure":
            print(figure(work, out))
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            evaluate(work, args.quick, out)


if __name__ == "__main__":
    main()
