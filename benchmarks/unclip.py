"""unCLIP (DALL-E 2) on the captioned shapes world at 16x16 (issue 14): CLIP retrieval, unCLIP (prior + decoder)
against a GLIDE-style text model at equal training time, variations and interpolation.

    python benchmarks/unclip.py clip            # the CLIP: WORK/clip (retrieval on 1,000 held-out scenes)
    python benchmarks/unclip.py timing          # steps/s of glide16, prior and decoder side by side: WORK/timing.json
    python benchmarks/unclip.py train [MODEL]   # each model for its share of BUDGET_MINUTES, in steps from the rates
    python benchmarks/unclip.py eval            # -> benchmarks/results/unclip.{md,json}
    python benchmarks/unclip.py figure          # -> benchmarks/results/unclip_*.png
    python benchmarks/unclip.py retrieval       # retrieval against what the captions determine: unclip_retrieval.json
    python benchmarks/unclip.py long            # decoder-long, glide16-long at equal time: unclip_long.json
    python benchmarks/unclip.py cliptext        # glide16 on the CLIP's text tower: unclip_cliptext.json
    python benchmarks/unclip.py noised-clip     # the noise-aware CLIP for CLIP guidance: WORK/clip-noised
    python benchmarks/unclip.py guidance        # CLIP guidance vs CFG on glide16: unclip_guidance.{md,json}
    python benchmarks/unclip.py --quick clip timing train eval   # tiny budgets: a smoke test (minutes)

Models (16x16; the tiny U-Net with the text-to-image benchmark's EDM recipe):
* glide16: GLIDE-style, the caption through a scratch text encoder (20 % caption dropout), BUDGET_MINUTES;
* prior: DALL-E 2's prior (the `tiny` transformer, ddpm cosine, x0-prediction, 10 % caption dropout) on the CLIP's
  embeddings, PRIOR_SHARE of the budget;
* decoder: the tiny U-Net conditioned on the CLIP image embedding (10 % dropout) and the caption (50 %), the rest.
"Equal training time" is enforced in steps from rates measured side by side in one `timing` run (one thread); the
CLIP's own training is not counted (the GLIDE-style model does not use it).

Evaluation: CLIP top-1 retrieval among 100 held-out scenes, beside what the captions allow (`retrieval`): half the
held-out captions fit more than one scene of their pool of 100 (no size named, one object of two named...), so the
exact evaluator, which knows which scenes fit, retrieves the paired scene only ~66 % of the time; reported too: the
share whose retrieved scene fits the caption, and top-1 on the captions that fit exactly one scene of their pool.
Caption adherence (the exact evaluator) and FD on the fixed prompt set at w = W; diversity = the mean pairwise
distance of DIVERSITY_SAMPLES samples of one caption in the evaluator's feature space, over DIVERSITY_CAPTIONS
captions. Variations: the share of VARIATIONS_PER_IMAGE decodes of a held-out scene's embedding whose objects have the
source's colours and shapes (as multisets), and their diversity. Interpolation: the endpoints' mean absolute error
after DDIM inversion and decoding, and how evenly the path moves (the largest step between consecutive frames over
the path's length; 1/(K-1) is perfectly even). GLIDE's comparison (`guidance`): glide16 with classifier-free guidance
at w in CFG_SCALES against glide16 conditional (w = 1) plus CLIP guidance from a noise-aware CLIP (the same recipe
trained on noised images for NOISED_CLIP_STEPS, `noised-clip`) at s in CLIP_SCALES; adherence, FD and diversity on
the first GUIDANCE_PROMPTS prompts of each split.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch

import difflab
from difflab.clip import ClipConfig, ClipRun, clip_train_config, train_clip
from difflab.config import DataConfig
from difflab.eval.adherence import prompt_reference, prompt_set, score_prompt_samples
from difflab.eval.shapes import ShapesFeatures, recover_scene
from difflab.text.conditioned import TextConfig
from difflab.training.run import train_run
from difflab.training.trainer import read_log
from difflab.unclip.pipeline import UnclipPipeline

RESOLUTION = 16
RECIPE = {"process": "edm", "model": "tiny", "batch_size": 64, "lr": 2e-3, "p_mean": -0.4, "p_std": 1.4}
MODELS = {
    "glide16": {"text_encoder": "scratch", "caption_dropout": 0.2, **RECIPE},
    "prior": {"unclip": "prior", "model": "tiny", "batch_size": 128, "lr": 1e-3, "caption_dropout": 0.1},
    "decoder": {"unclip": "decoder", "text_encoder": "scratch", "caption_dropout": 0.5, **RECIPE},
}
CLIP = {"steps": 3000, "embed_dim": 64, "width": 32, "text_width": 64}
BUDGET_MINUTES, QUICK_MINUTES, PRIOR_SHARE = 12.0, 0.2, 0.25
SCENES, QUICK_SCENES = 20_000, 500
PROMPTS, W, PRIOR_W, SAMPLER, SAMPLE_STEPS, PRIOR_STEPS = 100, 3.0, 2.0, "dpmpp_2m", 20, 25
DIVERSITY_CAPTIONS, DIVERSITY_SAMPLES = 20, 8
VARIATION_SOURCES, VARIATIONS_PER_IMAGE = 50, 4
INTERPOLATION_PAIRS, FRAMES, INVERSION_STEPS = 10, 8, 50
TIMING_STEPS = 8
LONG_DECODER_STEPS, LONG_GLIDE_STEPS = 2400, 2570  # decoder 2,400 steps + the prior's 3 min = glide16's 2,570 steps
CFG_SCALES, CLIP_SCALES, GUIDANCE_PROMPTS, NOISED_CLIP_STEPS = (1.0, 3.0, 5.0), (5.0, 10.0, 20.0), 25, 1500


def shapes(quick: bool, split: str = "train", size: int | None = None, resolution: int = RESOLUTION):
    return difflab.load_dataset("shapes", resolution=resolution, split=split,
                                size=size or (QUICK_SCENES if quick else SCENES))  # fmt: skip


def train_clip_phase(work: Path, quick: bool, noise_aware: bool = False) -> None:
    data, test = shapes(quick), shapes(False, "test", 1000)
    text = TextConfig.from_captions(list(data.captions), width=CLIP["text_width"], layers=2, heads=4)
    config = ClipConfig(3, RESOLUTION, text, embed_dim=CLIP["embed_dim"], width=CLIP["width"], noise_aware=noise_aware)
    steps = 20 if quick else NOISED_CLIP_STEPS if noise_aware else CLIP["steps"]
    run = ClipRun(DataConfig("shapes", "images", (3, RESOLUTION, RESOLUTION), RESOLUTION, 3), config,
                  clip_train_config(steps=steps))  # fmt: skip
    out = work / ("clip-noised" if noise_aware else "clip")
    shutil.rmtree(out, ignore_errors=True)
    start = time.monotonic()
    result = train_clip(run, data.data, list(data.captions), (test.data, list(test.captions)), out)
    result["minutes"] = (time.monotonic() - start) / 60
    (out / "bench_train.json").write_text(json.dumps(result))
    print(f"{out.name}: {result['step']} steps in {result['minutes']:.1f} min, retrieval {result['retrieval']}",
          flush=True)  # fmt: skip


def long_runs(work: Path, out: Path) -> None:
    """The decoder trained LONG_DECODER_STEPS (with the same prior) against glide16 trained the same total time
    (LONG_GLIDE_STEPS): adherence, FD and diversity of both, and the long decoder's variations."""
    for name, base, steps in (("decoder-long", "decoder", LONG_DECODER_STEPS), ("glide16-long", "glide16",
                                                                                LONG_GLIDE_STEPS)):  # fmt: skip
        if not (work / name / "checkpoints").exists():
            config, data = model_config(base, work, False, steps)
            train_run(config, work / name, data=data, progress=False)
    pipes = {"glide16": difflab.load(work / "glide16-long"),
             "unclip": UnclipPipeline(difflab.load(work / "decoder-long"), difflab.load(work / "prior"))}  # fmt: skip
    prompts = prompt_set(PROMPTS)
    reference = prompt_reference(prompts, RESOLUTION)
    captions = prompts[:DIVERSITY_CAPTIONS]
    repeated = [c for c in captions for _ in range(DIVERSITY_SAMPLES)]
    results = {}
    for name in pipes:
        row = score_prompt_samples(_draw(name, pipes, prompts, range(len(prompts))), reference)
        samples = _draw(name, pipes, repeated, range(10_000, 10_000 + len(repeated)))
        row["diversity"] = diversity(ShapesFeatures().features(samples.clamp(-1, 1)), len(captions))
        results[name] = row
        print(name, row["adherence"]["all"], row["fd"]["all"], row["diversity"], flush=True)
    results["variations"] = variation_rows(pipes["unclip"], False)
    out.with_name(out.name + "_long.json").write_text(json.dumps(results, indent=2, default=float))


def cliptext(work: Path, out: Path) -> None:
    """glide16's recipe and steps with the CLIP's text tower (`--text-encoder clip:PATH`) instead of its own scratch
    encoder: adherence and FD on the fixed prompt set."""
    run = work / "glide16-cliptext"
    if not (run / "checkpoints").exists():
        steps = json.loads((work / "glide16" / "bench_train.json").read_text())["steps"]
        data = shapes(False)
        settings = MODELS["glide16"] | {"text_encoder": f"clip:{work / 'clip'}"}
        train_run(difflab.run_config(data, steps=steps, checkpoint_every=1000, **settings), run, data=data,
                  progress=False)  # fmt: skip
    prompts = prompt_set(PROMPTS)
    row = score_prompt_samples(_draw("glide16", {"glide16": difflab.load(run)}, prompts, range(len(prompts))),
                               prompt_reference(prompts, RESOLUTION))  # fmt: skip
    print(row["adherence"]["all"], row["fd"]["all"], flush=True)
    out.with_name(out.name + "_cliptext.json").write_text(json.dumps(row, indent=2, default=float))


def retrieval(work: Path, out: Path, count: int = 1000, pool: int = 100, resolution: int = RESOLUTION) -> None:
    """Text->image retrieval of the CLIP on `count` held-out scenes in pools of `pool`, against the exact evaluator's
    knowledge of which scenes fit each caption."""
    from difflab.clip import load_clip
    from difflab.data.shapes import parse_caption
    from difflab.eval.shapes import score_one

    test = shapes(False, "test", count, resolution)
    found = [recover_scene(x) for x in test.data]
    specs = [parse_caption(c) for c in test.captions]
    clip = load_clip(work / "clip")
    tokens = clip.config.text.tokenizer().encode(list(test.captions))
    exact = fits = oracle = single = single_hits = 0
    for start in range(0, count - pool + 1, pool):
        with torch.no_grad():
            sims = clip.encode_text(tokens[start : start + pool]) @ clip.encode_image(test.data[start : start + pool]).T
        for i, best in enumerate(sims.argmax(1).tolist()):
            caption = specs[start + i]
            fitting = [j for j in range(pool) if score_one(found[start + j], caption)["full"][0]]
            exact += best == i
            fits += best in fitting
            oracle += 1 / len(fitting) if i in fitting else 0
            if fitting == [i]:
                single, single_hits = single + 1, single_hits + (best == i)
    n = (count // pool) * pool
    row = {"n": n, "pool": pool, "exact": exact / n, "fits": fits / n, "oracle_exact": oracle / n,
           "unambiguous": single, "unambiguous_exact": single_hits / max(single, 1)}  # fmt: skip
    path = out.with_name(out.name + "_retrieval")
    path.with_suffix(".json").write_text(json.dumps(row, indent=2))
    print(json.dumps(row, indent=2))


def guidance(work: Path, quick: bool, out: Path) -> None:
    """GLIDE's comparison: classifier-free guidance against CLIP guidance (noise-aware CLIP) on glide16."""
    prompts = prompt_set(4 if quick else GUIDANCE_PROMPTS)
    reference = prompt_reference(prompts, RESOLUTION)
    pipe = difflab.load(work / "glide16")
    captions = prompts[: 4 if quick else DIVERSITY_CAPTIONS]
    repeated = [c for c in captions for _ in range(DIVERSITY_SAMPLES)]
    rows = []
    settings = [("cfg", w, {"guidance": w}) for w in CFG_SCALES]
    settings += [("clip", s, {"guidance": 1.0, "clip": str(work / "clip-noised"), "clip_scale": s})
                 for s in CLIP_SCALES]  # fmt: skip
    for kind, scale, extra in settings:

        def draw(ps, seeds, extra=extra):
            images = [pipe.sample(seeds=[seed], prompt=p, clip_prompt=p if "clip" in extra else None,
                                  sampler=SAMPLER, steps=SAMPLE_STEPS, **extra)
                      for p, seed in zip(ps, seeds, strict=True)]  # fmt: skip
            return torch.cat(images)

        row = score_prompt_samples(draw(prompts, range(len(prompts))), reference)
        samples = draw(repeated, range(10_000, 10_000 + len(repeated)))
        row |= {"kind": kind, "scale": scale,
                "diversity": diversity(ShapesFeatures().features(samples.clamp(-1, 1)), len(captions))}  # fmt: skip
        rows.append(row)
        print(kind, scale, row["adherence"]["all"].get("full"), row["adherence"]["all"].get("colour"), flush=True)
    results = {"date": datetime.date.today().isoformat(), "quick": quick, "rows": rows,
               "clip": json.loads((work / "clip-noised" / "bench_train.json").read_text())}  # fmt: skip
    path = out.with_name(out.name + "_guidance")
    path.with_suffix(".json").write_text(json.dumps(results, indent=2, default=float))
    keys = ("colour", "shape", "size", "position", "relation", "full")
    lines = [
        f"# CLIP guidance vs classifier-free guidance on glide16 ({results['date']})",
        "",
        "| guidance | scale | " + " | ".join(keys) + " | FD | diversity |",
        "|---" * (len(keys) + 4) + "|",
    ]
    for row in rows:
        acc = row["adherence"]["all"]
        lines.append(f"| {row['kind']} | {row['scale']:g} | " + " | ".join(_pct(acc.get(k)) for k in keys)
                     + f" | {row['fd']['all']:.2f} | {row['diversity']:.3f} |")  # fmt: skip
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(path.with_suffix(".md").read_text())


def model_config(name: str, work: Path, quick: bool, steps: int):
    settings = dict(MODELS[name])
    if "unclip" in settings:
        settings["clip"] = str(work / "clip")
    data = shapes(quick)
    return difflab.run_config(data, steps=steps, checkpoint_every=1000, **settings), data


def timing(work: Path, quick: bool) -> None:
    """Training steps/s of each model, one after the other: from the training log's clock (training steps only, not
    loading the data or encoding it with the CLIP), over TIMING_STEPS steps after 2 untimed: WORK/timing.json."""
    rates = {}
    for name in MODELS:
        config, data = model_config(name, work, quick, 2 + TIMING_STEPS)
        config = replace(config, train=replace(config.train, log_every=1))
        run = work / "timing" / name
        shutil.rmtree(run, ignore_errors=True)
        train_run(config, run, data=data, progress=False)
        log = {r["step"]: r["elapsed_s"] for r in read_log(run)}
        rates[name] = TIMING_STEPS / (log[2 + TIMING_STEPS] - log[2])
        print(f"{name}: {rates[name]:.3f} steps/s", flush=True)
    (work / "timing.json").write_text(json.dumps(rates, indent=2))


def budget_steps(name: str, work: Path, quick: bool) -> int:
    rate = json.loads((work / "timing.json").read_text())[name]
    share = {"glide16": 1.0, "prior": PRIOR_SHARE, "decoder": 1 - PRIOR_SHARE}[name]
    return max(1, round(rate * share * (QUICK_MINUTES if quick else BUDGET_MINUTES) * 60))


def train(names: list[str], work: Path, quick: bool) -> None:
    for name in names or list(MODELS):
        out = work / name
        if (out / "checkpoints").exists():
            print(f"{out} exists: skipped (delete it to train again)", flush=True)
            continue
        config, data = model_config(name, work, quick, budget_steps(name, work, quick))
        start = time.monotonic()
        outcome = train_run(config, out, data=data, progress=False)
        minutes = (time.monotonic() - start) / 60
        print(f"{name}: {outcome.step} steps in {minutes:.1f} min", flush=True)
        (out / "bench_train.json").write_text(json.dumps({"steps": outcome.step, "minutes": minutes}))


def _unclip(work: Path) -> UnclipPipeline:
    return UnclipPipeline(difflab.load(work / "decoder"), difflab.load(work / "prior"))


def _draw(name: str, pipes: dict, prompts: list[str], seeds) -> torch.Tensor:
    if name == "glide16":
        return pipes[name].sample(seeds=seeds, prompt=prompts, guidance=W, sampler=SAMPLER, steps=SAMPLE_STEPS)
    return pipes[name].sample(prompts, seeds=seeds, prior_steps=PRIOR_STEPS, prior_guidance=PRIOR_W, guidance=W,
                              sampler=SAMPLER, steps=SAMPLE_STEPS)  # fmt: skip


def diversity(features: torch.Tensor, groups: int) -> float:
    """The mean pairwise Euclidean distance within each of `groups` consecutive equal groups of rows, averaged."""
    per = features.reshape(groups, -1, features.shape[-1])
    d = torch.cdist(per, per)
    k = per.shape[1]
    return float(d.sum(dim=(1, 2)).mean() / (k * (k - 1)))


def object_multisets(objects) -> tuple[Counter, Counter, Counter]:
    """The colours, the shapes and the colour-shape pairs (multisets) of a scene's objects."""
    objects = list(objects)
    return (Counter(o.colour for o in objects), Counter(o.shape for o in objects),
            Counter((o.colour, o.shape) for o in objects))  # fmt: skip


def scene_objects(image: torch.Tensor) -> tuple[Counter, Counter, Counter]:
    """The colours, the shapes and the colour-shape pairs (multisets) of the objects the exact evaluator finds."""
    return object_multisets(recover_scene(image))


# Scenes of the seen compositions that no model trained on (the training sets are seed 0's stream of the train split)
UNSEEN_SEED = 7


def variation_rows(pipe: UnclipPipeline, quick: bool, resolution: int = RESOLUTION, guidance: float = W,
                   split: str = "test") -> dict:  # fmt: skip
    """VARIATIONS_PER_IMAGE variations of each of VARIATION_SOURCES scenes: the share whose objects have the source's
    colours and shapes (as multisets, the issue's measure), the share with its colour-shape pairs (bound: a red
    square and a blue disc is not a blue square and a red disc), and their diversity. Split "test": held-out
    compositions (every scene has a colour-shape pair or relation no training scene has); "train": new scenes of the
    seen compositions."""
    n = 8 if quick else VARIATION_SOURCES
    seed = UNSEEN_SEED if split == "train" else 0
    sources = difflab.load_dataset("shapes", resolution=resolution, split=split, size=n, seed=seed).data
    k, feats, counts = VARIATIONS_PER_IMAGE, [], Counter()
    for i, image in enumerate(sources):
        out = pipe.variations(image, k, seed=1000 * i, guidance=guidance, sampler=SAMPLER, steps=SAMPLE_STEPS)
        want_c, want_s, want_pairs = scene_objects(image)
        for v in out:
            got_c, got_s, got_pairs = scene_objects(v)
            counts.update({"colours": got_c == want_c, "shapes": got_s == want_s, "bound": got_pairs == want_pairs,
                           "colours_and_shapes": got_c == want_c and got_s == want_s})  # fmt: skip
        feats.append(ShapesFeatures().features(out.clamp(-1, 1)))
    n = len(sources) * k
    return {"n": n, **{key: counts[key] / n for key in ("colours_and_shapes", "colours", "shapes", "bound")},
            "diversity": diversity(torch.cat(feats), len(sources))}  # fmt: skip


def interpolation_rows(pipe: UnclipPipeline, quick: bool, resolution: int = RESOLUTION) -> dict:
    """INTERPOLATION_PAIRS pairs of held-out scenes: the endpoints' error and how evenly the path moves."""
    scenes = shapes(False, "test", 4 if quick else 2 * INTERPOLATION_PAIRS, resolution).data
    errors, evenness = [], []
    for a, b in zip(scenes[0::2], scenes[1::2], strict=True):
        frames = pipe.interpolate(a, b, FRAMES, steps=INVERSION_STEPS)
        errors += [float((frames[0] - a).abs().mean()), float((frames[-1] - b).abs().mean())]
        steps = (frames[1:] - frames[:-1]).flatten(1).norm(dim=1)
        evenness.append(float(steps.max() / steps.sum()))
    return {"pairs": len(scenes) // 2, "frames": FRAMES, "endpoint_mae": sum(errors) / len(errors),
            "largest_step_share": sum(evenness) / len(evenness), "even": 1 / (FRAMES - 1)}  # fmt: skip


def evaluate(work: Path, quick: bool, out: Path) -> None:
    prompts = prompt_set(8 if quick else PROMPTS)
    reference = prompt_reference(prompts, RESOLUTION)
    results = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {torch.get_num_threads()} "
               f"thread(s), torch {torch.__version__}", "quick": quick, "models": {},
               "clip": json.loads((work / "clip" / "bench_train.json").read_text()),
               "timing": json.loads((work / "timing.json").read_text())}  # fmt: skip
    pipes = {"glide16": difflab.load(work / "glide16"), "unclip": _unclip(work)}
    captions = prompts[: 4 if quick else DIVERSITY_CAPTIONS]
    repeated = [c for c in captions for _ in range(DIVERSITY_SAMPLES)]
    for name in pipes:
        row = score_prompt_samples(_draw(name, pipes, prompts, range(len(prompts))), reference)
        samples = _draw(name, pipes, repeated, range(10_000, 10_000 + len(repeated)))
        row["diversity"] = diversity(ShapesFeatures().features(samples.clamp(-1, 1)), len(captions))
        results["models"][name] = row
        print(name, row["adherence"]["all"].get("full"), row["diversity"], flush=True)
    results["train"] = {n: json.loads((work / n / "bench_train.json").read_text()) for n in MODELS}
    results["variations"] = variation_rows(pipes["unclip"], quick)
    results["interpolation"] = interpolation_rows(pipes["unclip"], quick)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2, default=float))
    out.with_suffix(".md").write_text(report(results))
    print(out.with_suffix(".md").read_text())


def figure(work: Path, out: Path) -> None:
    """Three figures: prompts (glide16 vs unCLIP), variations, and interpolation paths."""
    from difflab.viz.text import save_prompt_rows

    pipe, glide = _unclip(work), difflab.load(work / "glide16")
    test = shapes(False, "test", 8)
    caps = list(test.captions[:4])
    rows = [_draw("glide16", {"glide16": glide}, [c for c in caps for _ in range(6)], range(24)),
            _draw("unclip", {"unclip": pipe}, [c for c in caps for _ in range(6)], range(24))]  # fmt: skip
    labels = [f"{who}: {c}" for who in ("glide16", "unCLIP") for c in caps]
    save_prompt_rows(torch.cat(rows).clamp(-1, 1), labels, out.with_name(out.name + "_prompts.png"),
                     title="six seeds per caption: GLIDE-style (top four rows) and unCLIP (bottom four)")  # fmt: skip
    var = [torch.cat([img[None], pipe.variations(img, 5, seed=0, guidance=W, sampler=SAMPLER, steps=SAMPLE_STEPS)])
           for img in test.data[:4]]  # fmt: skip
    save_prompt_rows(torch.cat(var).clamp(-1, 1), [f"source, then variations: {c}" for c in caps],
                     out.with_name(out.name + "_variations.png"), title="unCLIP variations")  # fmt: skip
    paths = [pipe.interpolate(a, b, FRAMES, steps=INVERSION_STEPS) for a, b in zip(test.data[0:8:2], test.data[1:8:2],
                                                                                  strict=True)]  # fmt: skip
    title = "slerp of the embeddings and of the inverted noise"
    save_prompt_rows(torch.cat(paths).clamp(-1, 1), [f"pair {i + 1}" for i in range(4)],
                     out.with_name(out.name + "_interpolation.png"), title=title)  # fmt: skip


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def report(results: dict) -> str:
    keys = ("colour", "shape", "size", "position", "relation", "full")
    clip, timing, train = results["clip"], results["timing"], results["train"]
    lines = [f"# unCLIP ({results['date']}, {results['machine']}{', QUICK' if results['quick'] else ''})", "",
             f"CLIP ({clip['step']} steps, {clip['minutes']:.0f} min): top-1 retrieval among 100 held-out scenes, "
             f"image->text {_pct(clip['retrieval']['image_to_text'])}, text->image "
             f"{_pct(clip['retrieval']['text_to_image'])} (chance 1%)", "",
             "| model | training steps (steps/s) | minutes | " + " | ".join(keys) + " | FD | diversity |",
             "|---" * (len(keys) + 5) + "|"]  # fmt: skip
    for name, row in results["models"].items():
        parts = ["glide16"] if name == "glide16" else ["prior", "decoder"]
        steps = " + ".join(f"{train[p]['steps']} ({timing[p]:.2g})" for p in parts)
        minutes = sum(train[p]["minutes"] for p in parts)
        acc = row["adherence"]["all"]
        lines.append(f"| {name} | {steps} | {minutes:.0f} | " + " | ".join(_pct(acc.get(k)) for k in keys)
                     + f" | {row['fd']['all']:.2f} | {row['diversity']:.3f} |")  # fmt: skip
    v, i = results["variations"], results["interpolation"]
    lines += ["", f"Variations ({v['n']}: {VARIATIONS_PER_IMAGE} of each of {v['n'] // VARIATIONS_PER_IMAGE} held-out "
              f"scenes): colours and shapes kept {_pct(v['colours_and_shapes'])} (colours {_pct(v['colours'])}, "
              f"shapes {_pct(v['shapes'])}); diversity {v['diversity']:.3f}", "",
              f"Interpolation ({i['pairs']} pairs, {i['frames']} frames, DDIM {INVERSION_STEPS} steps): endpoint mean "
              f"absolute error {i['endpoint_mae']:.4f} (images in [-1, 1]); largest step {i['largest_step_share']:.2f} "
              f"of the path (perfectly even: {i['even']:.2f})"]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny budgets: a smoke test")
    p.add_argument("--work", default="runs/bench-unclip")
    p.add_argument("--out", default="benchmarks/results/unclip")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("phases", nargs="+", help="clip, timing, train [MODEL...], eval, figure (in that order)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work + ("-quick" if args.quick else ""))
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out + ("_quick" if args.quick else ""))
    out.parent.mkdir(parents=True, exist_ok=True)
    names = [a for a in args.phases if a in MODELS]
    for phase in [a for a in args.phases if a not in MODELS]:
        if phase == "clip":
            train_clip_phase(work, args.quick)
        elif phase == "timing":
            timing(work, args.quick)
        elif phase == "train":
            train(names, work, args.quick)
        elif phase == "eval":
            evaluate(work, args.quick, out)
        elif phase == "figure":
            figure(work, out)
        elif phase == "cliptext":
            cliptext(work, out)
        elif phase == "long":
            long_runs(work, out)
        elif phase == "retrieval":
            retrieval(work, out)
        elif phase == "noised-clip":
            train_clip_phase(work, args.quick, noise_aware=True)
        elif phase == "guidance":
            guidance(work, args.quick, out)
        else:
            raise SystemExit(
                f"unknown phase {phase!r}: clip, timing, train, eval, figure, retrieval, noised-clip, guidance"
            )


if __name__ == "__main__":
    main()
