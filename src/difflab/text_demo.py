"""The text-to-image demo's library part (issue 12, `difflab demo --task txt2img`): from a text model of the shapes
world, a grid of fixed prompts x seeds, examples of held-out compositions, the guidance sweep (full-caption accuracy
and FD against w on seen and held-out captions, `difflab.eval.adherence.sweep_guidance`) and the relation failure
analysis: how often "X left of Y" comes out as "Y left of X", by guidance scale.

Reversals are read from the scene the exact evaluator recovers (`difflab.eval.shapes.recover_scene`): each object of
a two-object caption is the largest detection of its colour and shape; with both found, the relation is right when
the centroids are `RELATION_GAP` apart in the caption's direction, reversed when they are that far apart in the
opposite one, else unclear. A sample missing either object is neither right nor reversed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from difflab.data.shapes import CaptionSpec, ObjectSpec, ShapesStream, parse_caption
from difflab.data.shapes.world import INVERSE, relation_holds
from difflab.errors import DifflabError
from difflab.eval.adherence import prompt_set, sweep_guidance
from difflab.eval.shapes import RELATION_GAP, DetectedObject, adherence, recover_scene
from difflab.viz.text import save_guidance_sweep, save_prompt_rows, save_relation_reversals

# the grid: single objects at positions and two-object relations, all seen compositions
PROMPTS = (
    "a red circle in the top left corner",
    "a large blue square at the centre",
    "a small yellow triangle at the bottom right",
    "a green circle left of a white square",
    "an orange cross above a magenta triangle",
    "a cyan square below a red circle",
)
GRID_SEEDS = 4  # columns of prompts.png and heldout.png
HELDOUT_ROWS = 6  # held-out captions shown in heldout.png
GRID_GUIDANCE = 3.0
SCALES = (1.0, 2.0, 3.0, 5.0)
SWEEP_PROMPTS = 48  # captions per split in the guidance sweep, one sample each
RELATION_PROMPTS = 48  # two-object captions per split in the relation analysis, one sample each
SAMPLER, SAMPLE_STEPS = "dpmpp_2m", 20
OUTCOMES = ("correct", "reversed", "unclear", "missing")


def find_object(want: ObjectSpec, found: Sequence[DetectedObject], used: set[int]) -> int | None:
    """Index of the largest unused detection with the demanded colour and shape, or None."""
    options = [i for i, d in enumerate(found) if (d.colour, d.shape) == want.pair and i not in used]
    return max(options, key=lambda i: found[i].area) if options else None


def relation_outcome(found: Sequence[DetectedObject], spec: CaptionSpec) -> str:
    """One image's detections against a two-object caption: "correct", "reversed" (the objects are the other way
    round), "unclear" (both found, neither way by RELATION_GAP) or "missing" (an object not found)."""
    if spec.relation is None:
        raise DifflabError("the relation analysis needs two-object captions (X left of Y, X above Y, ...)")
    first = find_object(spec.objects[0], found, set())
    second = None if first is None else find_object(spec.objects[1], found, {first})
    if first is None or second is None:
        return "missing"
    a, b = (found[first].x, found[first].y), (found[second].x, found[second].y)
    if relation_holds(a, spec.relation, b, RELATION_GAP):
        return "correct"
    return "reversed" if relation_holds(a, INVERSE[spec.relation], b, RELATION_GAP) else "unclear"


def relation_reversals(images: np.ndarray | torch.Tensor, captions: Sequence[str]) -> dict[str, Any]:
    """Counts of `relation_outcome` over images (N, 3, R, R) in [-1, 1] or uint8 (N, R, R, 3), image i for the
    two-object caption captions[i]: {"n", "both_found", "correct", "reversed", "unclear", "missing",
    "reversed_share": reversed / both_found (None if no sample has both objects)}."""
    if len(images) != len(captions):
        raise DifflabError(f"got {len(images)} images for {len(captions)} captions: pass one caption per image")
    counts = dict.fromkeys(OUTCOMES, 0)
    for image, text in zip(images, captions, strict=True):
        counts[relation_outcome(recover_scene(image), parse_caption(text))] += 1
    both = len(captions) - counts["missing"]
    share = counts["reversed"] / both if both else None
    return {"n": len(captions), "both_found": both, **counts, "reversed_share": share}


def relation_captions(count: int, seed: int = 0) -> list[str]:
    """The first `count` two-object captions of each split of the shapes stream of `seed` (train, then test)."""
    out = []
    for split in ("train", "test"):
        stream, chosen = ShapesStream(seed, 16, split), []
        while len(chosen) < count:
            chosen += [c for c in stream.next_uint8(4 * count)[1] if parse_caption(c).relation is not None]
        out += chosen[:count]
    return out


def _sample(pipe: Any, captions: Sequence[str], seeds: Sequence[int], guidance: float | None) -> torch.Tensor:
    return pipe.sample(seeds=list(seeds), prompt=list(captions), guidance=guidance, sampler=SAMPLER,
                       steps=SAMPLE_STEPS)  # fmt: skip


def relation_sweep(pipe: Any, captions: Sequence[str], scales: Sequence[float], seed: int = 0) -> list[dict]:
    """`relation_reversals` of one sample per caption (seeds seed, seed + 1, ...) at each guidance scale."""
    seeds = range(seed, seed + len(captions))
    return [{"guidance": w, **relation_reversals(_sample(pipe, captions, seeds, w), captions)} for w in scales]


def prompt_rows(pipe: Any, prompts: Sequence[str], seed: int, guidance: float) -> tuple[torch.Tensor, list[float]]:
    """GRID_SEEDS samples of each prompt (seeds seed..seed + GRID_SEEDS - 1) and each prompt's full-caption
    accuracy over them."""
    captions = [p for p in prompts for _ in range(GRID_SEEDS)]
    images = _sample(pipe, captions, [seed + i for _ in prompts for i in range(GRID_SEEDS)], guidance)
    scores = [adherence(images[j * GRID_SEEDS : (j + 1) * GRID_SEEDS], [p] * GRID_SEEDS)["full"]
              for j, p in enumerate(prompts)]  # fmt: skip
    return images, scores


def _labels(prompts: Sequence[str], scores: Sequence[float], prefix: str = "") -> list[str]:
    return [f"{prefix}{p!r}: {round(s * GRID_SEEDS)}/{GRID_SEEDS} right" for p, s in zip(prompts, scores, strict=True)]


def write_txt2img_demo(pipe: Any, out: str | Path, *, seed: int = 0) -> tuple[dict[str, Any], list[Path]]:
    """Sample a text model of the shapes world and write prompts.png, heldout.png, guidance.png and relations.png
    into `out`; returns (their metrics, the paths written)."""
    out = Path(out)
    heldout = heldout_captions(seed)
    grid, grid_scores = prompt_rows(pipe, PROMPTS, seed, GRID_GUIDANCE)
    held, held_scores = prompt_rows(pipe, heldout, seed, GRID_GUIDANCE)
    note = f"w = {GRID_GUIDANCE:g}, {SAMPLER} {SAMPLE_STEPS} steps, seeds {seed}..{seed + GRID_SEEDS - 1}"
    written = [save_prompt_rows(grid, _labels(PROMPTS, grid_scores), out / "prompts.png", title=f"prompts ({note})")]
    written.append(save_prompt_rows(held, _labels(heldout, held_scores), out / "heldout.png",
                                    title=f"held-out compositions ({note})"))  # fmt: skip
    sweep = sweep_guidance(pipe, prompt_set(SWEEP_PROMPTS), SCALES, seed=seed, sampler=SAMPLER, steps=SAMPLE_STEPS)
    written.append(save_guidance_sweep(sweep, out / "guidance.png", title=f"{SWEEP_PROMPTS} captions per split"))
    relations = relation_sweep(pipe, relation_captions(RELATION_PROMPTS, seed), SCALES, seed)
    written.append(save_relation_reversals(relations, out / "relations.png"))
    metrics = {
        "sampler": {"sampler": SAMPLER, "steps": SAMPLE_STEPS},
        "prompts": {
            "guidance": GRID_GUIDANCE,
            "seeds": list(range(seed, seed + GRID_SEEDS)),
            "full": dict(zip(PROMPTS, grid_scores, strict=True)),
        },  # fmt: skip
        "heldout": {"guidance": GRID_GUIDANCE, "full": dict(zip(heldout, held_scores, strict=True))},
        "guidance_sweep": {"prompts_per_split": SWEEP_PROMPTS, "seed": seed, "rows": sweep},
        "relations": {"captions_per_split": RELATION_PROMPTS, "seed": seed, "rows": relations},
    }
    return metrics, written


def heldout_captions(seed: int = 0) -> list[str]:
    """The first HELDOUT_ROWS distinct captions of the shapes test split (held-out compositions) of `seed`."""
    captions = ShapesStream(seed, 16, "test").next_uint8(8 * HELDOUT_ROWS)[1]
    return list(dict.fromkeys(captions))[:HELDOUT_ROWS]


def summary_lines(metrics: dict[str, Any]) -> list[str]:
    """A few lines for the terminal: full-caption accuracy and reversals by guidance scale."""
    lines = []
    for row in metrics["guidance_sweep"]["rows"]:
        acc = row["adherence"]
        seen, held = (acc.get(s, {}).get("full") for s in ("train", "test"))
        lines.append(f"w = {row['guidance']:g}: full caption {_pct(seen)} seen, {_pct(held)} held-out; "
                     f"FD {_num(row['fd'].get('train'))} / {_num(row['fd'].get('test'))}")  # fmt: skip
    for row in metrics["relations"]["rows"]:
        lines.append(f"w = {row['guidance']:g}: relations right {row['correct']}/{row['n']}, reversed "
                     f"{row['reversed']}/{row['n']} ({_pct(row['reversed_share'])} of {row['both_found']} with both "
                     "objects found)")  # fmt: skip
    return lines


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f}"
