"""unCLIP at 32x32 on the recipe that met the text-to-image goals (issue 14): a 32x32 CLIP, the prior, and a decoder
trained as the 30-minute GLIDE-style model of `text_to_image_curve.py` was (EDM with P_mean 0.4, the cosine learning
rate, attention at the U-Net's two lowest levels, 2 x 2 patches), against that model at equal training time.

    python benchmarks/unclip32.py clip                 # difflab train-clip --resolution 32, 3,000 steps: WORK/clip
    python benchmarks/unclip32.py probe                # what the CLIP's image embedding fixes: unclip32_probe.json
    python benchmarks/unclip32.py retrieval            # retrieval against what the captions allow (unclip.py's)
    python benchmarks/unclip32.py --threads 2 timing   # s/step of glide32, decoder, prior side by side: timing.json
    python benchmarks/unclip32.py --threads 2 train    # the prior, then the decoder for the rest of glide32's time
    python benchmarks/unclip32.py --threads 2 eval     # -> benchmarks/results/unclip32.{md,json}
    python benchmarks/unclip32.py figure               # -> benchmarks/results/unclip32_{prompts,variations}.png
    python benchmarks/unclip32.py --threads 2 oracle   # the decoder on true embeddings (no prior): unclip32_oracle.json
    ... --work runs/unclip32-mlp --image-embed-hidden 256 train   # the decoder reading z through a SiLU layer
    ... --work runs/unclip32-embonly --no-caption --decoder-steps 2000 train variations   # on the embedding alone
    ... --work runs/unclip32-scale --out benchmarks/results/unclip32_scale train eval oracle figure   # sqrt(E) z
    ... --work runs/unclip32-scale-tok8 --image-tokens 8 train variations   # eight context tokens, not four
    ... --work runs/unclip32-neg --hard-negatives clip   # a NegCLIP (colour, shape and relation swaps as negatives)
    ... --variation-w 3 variations    # variations at another scale on the embedding: unclip32_variations_w3.json

The GLIDE-style model is `text_to_image_curve.py --variant phrases-slots-attn2-cosine-pm04-30min` (GLIDE_WORK): 6,241
steps in 30 minutes of both cores, its caption read phrase by phrase by the text tower of a 16x16 CLIP. unCLIP gets
the same time: the prior (PRIOR_STEPS, cheap) and the decoder for the rest, in steps from the rates of one `timing`
run (side by side, the same threads). The decoder: glide32's recipe, conditioned on the 32x32 CLIP's image embedding
(10 % dropout) and on the caption through the 32x32 CLIP's text tower read phrase by phrase (50 % dropout, the paper's
values). The CLIPs' own training is not counted for either.

Evaluation (the fixed prompt set: 100 held-out + 100 train captions, N_PER_PROMPT samples each; dpmpp_2m 20 steps):
adherence by the exact evaluator, FD in its feature space, and diversity (the mean pairwise distance of
DIVERSITY_SAMPLES samples of one caption in that space, over DIVERSITY_CAPTIONS captions), glide32 at each scale of
W_GLIDE and unCLIP at each setting of UNCLIP (the decoder's scale on embedding and caption, the prior's scale and its
best of N draws by the dot product with the text embedding).
Variations: the share of decodes of a scene's embedding whose objects have the source's colours and shapes, for
held-out scenes (eval, variations) and for new scenes of the seen compositions (variations).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

import difflab
from difflab.eval.adherence import prompt_reference, prompt_set, score_prompt_samples
from difflab.eval.shapes import ShapesFeatures
from difflab.training.run import train_run
from difflab.training.trainer import read_log
from difflab.unclip.pipeline import UnclipPipeline

sys.path.insert(0, str(Path(__file__).parent))
import text_to_image_curve as curve  # noqa: E402
import unclip as unclip16  # noqa: E402

RESOLUTION, SCENES, CLIP_STEPS = 32, 20_000, 3000
GLIDE_WORK, GLIDE_VARIANT = Path("runs/t2i-curve"), "phrases-slots-attn2-cosine-pm04-30min"
RECIPE = {"process": "edm", "model": "tiny", "batch_size": 64, "lr": 2e-3, "p_mean": 0.4, "p_std": 1.4,
          "patch_size": 2, "attention_levels": 2, "lr_schedule": "cosine"}  # fmt: skip  # = glide32's
PRIOR = {"unclip": "prior", "model": "tiny", "batch_size": 128, "lr": 1e-3, "caption_dropout": 0.1}
PRIOR_STEPS, TIMING_STEPS = 3000, 150
PROMPTS, N_PER_PROMPT, SAMPLER, SAMPLE_STEPS, PRIOR_SAMPLE_STEPS = 100, 1, "dpmpp_2m", 20, 25
W_GLIDE = (1.0, 2.0, 3.0)  # glide32's best: 2
# unCLIP's settings: (the decoder's scale on embedding and caption, the prior's scale, the prior's best of N draws)
UNCLIP = ((1.0, 2.0, 2), (2.0, 2.0, 2), (3.0, 2.0, 2), (1.0, 1.0, 1), (2.0, 1.0, 1), (3.0, 1.0, 1))
VARIATION_W = 2.0
SPLITS = ("test", "train")  # variations of held-out compositions, and of new scenes of the seen ones
DIVERSITY_CAPTIONS, DIVERSITY_SAMPLES = 20, 8
RESULTS = Path(__file__).parent / "results"


def shapes(split: str = "train", size: int = SCENES) -> difflab.data.Dataset:
    return difflab.load_dataset("shapes", resolution=RESOLUTION, split=split, size=size)


def decoder_settings(work: Path, hidden: int | None = None, caption: bool = True, tokens: int | None = None) -> dict:
    text = {"caption_dropout": 0.5, "text_encoder": f"phrases-slots:clip:{work / 'clip'}"} if caption else {}
    reading = {"image_embed_hidden": hidden, "image_tokens": tokens}
    return {"unclip": "decoder", "clip": str(work / "clip"), **reading, **text, **RECIPE}


def configs(work: Path, decoder_steps: int = 100, hidden: int | None = None, caption: bool = True,
            tokens: int | None = None) -> dict:  # fmt: skip
    """name -> a function giving (RunConfig, data): glide32 (the curve's variant), the prior and the decoder."""
    data = shapes()
    return {
        "glide32": lambda: (curve.variant_config(GLIDE_WORK, GLIDE_VARIANT, data, 100, None), data),
        "decoder": lambda: (
            difflab.run_config(
                data, steps=decoder_steps, checkpoint_every=1000, **decoder_settings(work, hidden, caption, tokens)
            ),
            data,
        ),
        "prior": lambda: (
            difflab.run_config(data, steps=PRIOR_STEPS, checkpoint_every=1000, clip=str(work / "clip"), **PRIOR),
            data,
        ),  # fmt: skip
    }


def train_clip(work: Path, threads: int, hard_negatives: bool = False) -> None:
    from difflab.cli.main import main as cli

    shutil.rmtree(work / "clip", ignore_errors=True)
    cli(["train-clip", "--data", "shapes", "--resolution", str(RESOLUTION), "--out", str(work / "clip"),
         "--steps", str(CLIP_STEPS), "--threads", str(threads), "--no-progress"]
        + (["--hard-negatives"] if hard_negatives else []))  # fmt: skip


def probe(work: Path, out: Path, queries: int = 500, pool: int = 5000) -> None:
    """What the CLIP's image embedding fixes: for `queries` scenes, the scene with the nearest embedding among `pool`
    others of the same split (a held-out scene's colour-shape pairs never occur in training, so it is looked up among
    held-out scenes); the share with the query's colours, shapes, both (as multisets), and colour-shape pairs
    (bound): what variations could keep if the decoder read the embedding fully."""
    from difflab.clip import load_clip
    from difflab.unclip.link import image_embeddings

    clip = load_clip(work / "clip")
    result = {"queries": queries, "pool": pool}
    for split in ("test", "train"):
        scenes = shapes(split, pool + queries)
        z = image_embeddings(clip, scenes.data)
        nearest = (z[pool:] @ z[:pool].T).argmax(1).tolist()
        found = [unclip16.object_multisets(scene.objects) for scene in scenes.scenes]
        pairs = [(found[pool + i], found[j]) for i, j in enumerate(nearest)]
        result[split] = {"colours": sum(a[0] == b[0] for a, b in pairs) / queries,
                         "shapes": sum(a[1] == b[1] for a, b in pairs) / queries,
                         "both": sum(a[:2] == b[:2] for a, b in pairs) / queries,
                         "bound": sum(a[2] == b[2] for a, b in pairs) / queries}  # fmt: skip
    print(result, flush=True)
    out.with_name(out.name + "_probe.json").write_text(json.dumps(result, indent=2))


def timing(work: Path) -> None:
    per_step = curve.seconds_per_step(configs(work), steps=TIMING_STEPS)
    (work / "timing.json").write_text(json.dumps(per_step, indent=2))


def glide_seconds(work: Path) -> float:
    """glide32's training time in units of this machine's measured glide32 steps: its steps x s/step."""
    steps = max(r["step"] for r in read_log(curve.run_folder(GLIDE_WORK, GLIDE_VARIANT)))
    return steps * json.loads((work / "timing.json").read_text())["glide32"]


def decoder_steps(work: Path) -> int:
    rates = json.loads((work / "timing.json").read_text())
    return round((glide_seconds(work) - PRIOR_STEPS * rates["prior"]) / rates["decoder"])


def train(work: Path, hidden: int | None = None, caption: bool = True, decoder_budget: int | None = None,
          tokens: int | None = None) -> None:  # fmt: skip
    for name, steps in (("prior", PRIOR_STEPS), ("decoder", decoder_budget or decoder_steps(work))):
        if (work / name / "checkpoints").exists():
            print(f"{work / name} exists: skipped (delete it to train again)", flush=True)
            continue
        config, data = configs(work, steps, hidden, caption, tokens)[name]()
        start = time.monotonic()
        outcome = train_run(config, work / name, data=data, progress=False)
        minutes = (time.monotonic() - start) / 60
        print(f"{name}: {outcome.step} steps in {minutes:.1f} min", flush=True)
        (work / name / "bench_train.json").write_text(json.dumps({"steps": outcome.step, "minutes": minutes}))


def pipelines(work: Path) -> tuple[difflab.Pipeline, UnclipPipeline]:
    glide = difflab.load(curve.run_folder(GLIDE_WORK, GLIDE_VARIANT))
    return glide, UnclipPipeline(difflab.load(work / "decoder"), difflab.load(work / "prior"))


def draw(pipe, prompts: list[str], seeds, setting: tuple) -> torch.Tensor:
    """Samples of glide32 (setting: (w,)) or unCLIP (setting: (w, prior w, best of))."""
    if isinstance(pipe, UnclipPipeline):
        w, prior_w, best_of = setting
        return pipe.sample(prompts, seeds=seeds, prior_steps=PRIOR_SAMPLE_STEPS, prior_guidance=prior_w,
                           best_of=best_of, guidance=w, sampler=SAMPLER, steps=SAMPLE_STEPS)  # fmt: skip
    return pipe.sample(seeds=seeds, prompt=prompts, guidance=setting[0], sampler=SAMPLER, steps=SAMPLE_STEPS)


def score(pipe, setting: tuple) -> dict:
    """Adherence and FD on the prompt set, and diversity, of one model at one setting."""
    prompts = [p for p in prompt_set(PROMPTS) for _ in range(N_PER_PROMPT)]
    images = draw(pipe, prompts, range(len(prompts)), setting)
    row = {"setting": setting, **score_prompt_samples(images, prompt_reference(prompts, RESOLUTION))}
    captions = prompt_set(PROMPTS)[:DIVERSITY_CAPTIONS]
    repeated = [c for c in captions for _ in range(DIVERSITY_SAMPLES)]
    samples = draw(pipe, repeated, range(10_000, 10_000 + len(repeated)), setting)
    row["diversity"] = unclip16.diversity(ShapesFeatures().features(samples.clamp(-1, 1)), len(captions))
    print(setting, {k: round(v, 3) for k, v in row["adherence"]["all"].items() if k in curve.ATTRIBUTES},
          round(row["fd"]["all"], 3), round(row["diversity"], 3), flush=True)  # fmt: skip
    return row


def evaluate(work: Path, out: Path) -> None:
    glide, unclip = pipelines(work)
    results = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, "
               f"{torch.get_num_threads()} thread(s), torch {torch.__version__}", "timing": json.loads(
               (work / "timing.json").read_text()), "glide32_steps": glide.step, "n_per_prompt": N_PER_PROMPT,
               "train": {n: json.loads((work / n / "bench_train.json").read_text()) for n in ("prior", "decoder")},
               "glide32": [score(glide, (w,)) for w in W_GLIDE]}  # fmt: skip
    results["unclip"] = [score(unclip, setting) for setting in UNCLIP]
    results["variations"] = unclip16.variation_rows(unclip, False, RESOLUTION, VARIATION_W)
    results["interpolation"] = unclip16.interpolation_rows(unclip, False, RESOLUTION)
    print(results["variations"], results["interpolation"], flush=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2, default=float))
    out.with_suffix(".md").write_text(report(results))
    print(out.with_suffix(".md").read_text())


def report(results: dict) -> str:
    keys = ("colour", "shape", "size", "position", "relation", "full")
    lines = [f"# unCLIP at 32x32 ({results['date']}, {results['machine']})", "",
             "| model | w (unCLIP: decoder, prior, best of) | " + " | ".join(keys) + " | FD | diversity |",
             "|---" * (len(keys) + 4) + "|"]  # fmt: skip
    rows = [("glide32", r) for r in results["glide32"]] + [("unCLIP", r) for r in results["unclip"]]
    for name, row in rows:
        acc = row["adherence"]["all"]
        setting = ", ".join(f"{x:g}" for x in row["setting"])
        lines.append(f"| {name} | {setting} | " + " | ".join(f"{100 * acc[k]:.1f}%" for k in keys) +
                     f" | {row['fd']['all']:.3f} | {row['diversity']:.3f} |")  # fmt: skip
    v, i = results["variations"], results["interpolation"]
    lines += ["", f"Variations ({v['n']}): colours and shapes kept {100 * v['colours_and_shapes']:.1f}% (colours "
              f"{100 * v['colours']:.1f}%, shapes {100 * v['shapes']:.1f}%; pairs {100 * v['bound']:.1f}%); "
              f"diversity {v['diversity']:.3f}", "",
              f"Interpolation ({i['pairs']} pairs, {i['frames']} frames): endpoint mean absolute error "
              f"{i['endpoint_mae']:.4f}; largest step {i['largest_step_share']:.2f} of the path "
              f"(even: {i['even']:.2f})"]  # fmt: skip
    return "\n".join(lines) + "\n"


def oracle(work: Path, out: Path, w: float = 2.0) -> None:
    """The decoder without the prior: each prompt's embedding is the CLIP's of a rendered scene that fits it (another
    seed than the FD's reference), decoded with the caption at scale w. What unCLIP loses against this is the
    prior's."""
    from difflab.eval.adherence import render_captions

    _, unclip = pipelines(work)
    prompts = prompt_set(PROMPTS)
    z = unclip.embed_images(render_captions(prompts, RESOLUTION, seed=1))
    images = unclip.decode(z, seeds=range(len(prompts)), prompt=prompts, guidance=w, sampler=SAMPLER,
                           steps=SAMPLE_STEPS)  # fmt: skip
    row = score_prompt_samples(images, prompt_reference(prompts, RESOLUTION))
    print({k: round(v, 3) for k, v in row["adherence"]["all"].items() if k in curve.ATTRIBUTES}, flush=True)
    out.with_name(out.name + "_oracle.json").write_text(json.dumps({"w": w, **row}, indent=2, default=float))


def figure(work: Path, out: Path) -> None:
    """Six seeds per caption from glide32 and unCLIP, and variations of four held-out scenes and of four new scenes of
    the seen compositions."""
    from difflab.viz.text import save_prompt_rows

    glide, unclip = pipelines(work)
    test = shapes("test", 8)
    caps = list(test.captions[:4])
    repeated = [c for c in caps for _ in range(6)]
    rows = [draw(glide, repeated, range(24), (2.0,)), draw(unclip, repeated, range(24), (2.0, 2.0, 2))]
    labels = [f"{who}: {c}" for who in ("glide32", "unCLIP") for c in caps]
    save_prompt_rows(torch.cat(rows).clamp(-1, 1), labels, out.with_name(out.name + "_prompts.png"),
                     title="six seeds per caption: GLIDE-style (top four rows) and unCLIP (bottom four)")  # fmt: skip
    seen = difflab.load_dataset("shapes", resolution=RESOLUTION, size=4, seed=unclip16.UNSEEN_SEED)
    sources = torch.cat([test.data[:4], seen.data])
    var = [torch.cat([img[None], unclip.variations(img, 5, seed=0, guidance=VARIATION_W, sampler=SAMPLER,
                                                   steps=SAMPLE_STEPS)]) for img in sources]  # fmt: skip
    labels = [f"{kind}: {c}" for kind, group in (("held-out", caps), ("seen", seen.captions)) for c in group]
    save_prompt_rows(torch.cat(var).clamp(-1, 1), labels, out.with_name(out.name + "_variations.png"),
                     title="unCLIP variations at 32x32: source, then five")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    phases = ("clip", "probe", "retrieval", "timing", "train", "eval", "figure", "oracle", "variations")
    p.add_argument("phases", nargs="+", choices=phases)
    p.add_argument("--work", default="runs/unclip32")
    p.add_argument("--out", default=str(RESULTS / "unclip32"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--image-embed-hidden", type=int, help="train: the decoder reads its embedding through a SiLU layer")
    p.add_argument("--no-caption", action="store_true", help="train: a decoder on the image embedding alone")
    p.add_argument("--decoder-steps", type=int, help="train: this many decoder steps, not glide32's time")
    p.add_argument("--image-tokens", type=int, help="train: the context tokens the decoder projects z into (4)")
    p.add_argument("--hard-negatives", action="store_true", help="clip: NegCLIP (word-swapped captions as negatives)")
    p.add_argument("--variation-w", type=float, default=VARIATION_W, help="variations: the scale on the embedding")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    for phase in args.phases:
        if phase == "clip":
            train_clip(work, args.threads, args.hard_negatives)
        elif phase == "probe":
            probe(work, out)
        elif phase == "retrieval":
            unclip16.retrieval(work, out, resolution=RESOLUTION)
        elif phase == "timing":
            timing(work)
        elif phase == "train":
            train(work, args.image_embed_hidden, not args.no_caption, args.decoder_steps, args.image_tokens)
        elif phase == "eval":
            evaluate(work, out)
        elif phase == "oracle":
            oracle(work, out)
        elif phase == "variations":  # the decoder alone: variations only
            pipe = pipelines(work)[1]
            w = args.variation_w
            row = {split: unclip16.variation_rows(pipe, False, RESOLUTION, w, split) for split in SPLITS}
            print(row, flush=True)
            suffix = "" if w == VARIATION_W else f"_w{w:g}"
            out.with_name(out.name + f"_variations{suffix}.json").write_text(json.dumps({"w": w, **row}, indent=2))
        else:
            figure(work, out)


if __name__ == "__main__":
    main()
