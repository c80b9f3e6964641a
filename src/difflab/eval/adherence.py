"""Caption adherence of a text model on the shapes world, beside FD in the evaluator's own feature space (issue 12).

Prompts are shapes captions: the fixed set ``"test"`` (`prompt_set`: the first `PROMPT_SET_SIZE` captions of the
shapes test split, held-out compositions, and as many of the train split, both from seed `PROMPT_SET_SEED`) or a
file with one caption per line (`read_caption_file`). Prompt j is sampled with seeds S..S+k-1 (k samples per
prompt, the same seeds for every prompt, as `difflab txt2img --prompts` does), all prompts batched together.

Each sample is scored against its caption by the exact evaluator (`difflab.eval.shapes.adherence_by_split`; the
split of a caption is `spec_split(parse_caption(caption))`). The FD compares the samples with reference images of
the same captions, one random scene satisfying each caption (`scene_for`) per sample, rendered by the shapes
world from the fixed seed `REFERENCE_SEED`, in the evaluator's 51-d feature space (`ShapesFeatures`), per split
and over all; it is not an Inception FID. Samples are quantised to 8 bits first, as saved PNGs would be.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from difflab.data.shapes import (
    POSITIONS,
    RESOLUTIONS,
    SIZES,
    CaptionSpec,
    Scene,
    ShapesStream,
    parse_caption,
    position_of,
    render,
    spec_split,
    to_tensor,
)
from difflab.data.shapes.world import place_pair, place_single
from difflab.errors import DifflabError
from difflab.eval.evaluate import quantise_8bit
from difflab.eval.frechet import frechet_distance_between
from difflab.eval.shapes import ShapesFeatures, adherence_by_split

PROMPT_SET_SIZE = 200  # captions per split in the "test" prompt set
PROMPT_SET_SEED = 0
REFERENCE_SEED = 1  # the scenes the reference images show (independent of the sampling seed)
MAX_PROMPT_FILE_BYTES = 10_000_000


def prompt_set_description() -> str:
    """What the prompt set "test" is, for reports."""
    return (f"test: the first {PROMPT_SET_SIZE} captions of the shapes test split (held-out compositions) and the "
            f"first {PROMPT_SET_SIZE} of the train split, seed {PROMPT_SET_SEED}")  # fmt: skip


def reference_description(resolution: int) -> str:
    """What the FD compares with, for reports."""
    return (f"one random scene satisfying each sample's caption, rendered at {resolution}x{resolution} from seed "
            f"{REFERENCE_SEED} (difflab.eval.adherence.render_captions)")  # fmt: skip


def prompt_set(count: int | None = None, seed: int = PROMPT_SET_SEED) -> list[str]:
    """The fixed prompt set "test": the first `count` (default `PROMPT_SET_SIZE`) captions of the shapes test
    split (held-out compositions), then as many of the train split, of ``ShapesStream(seed, ., split)`` (=
    load_dataset("shapes", split=..., size=count).captions at any resolution)."""
    count = PROMPT_SET_SIZE if count is None else count
    return [c for split in ("test", "train") for c in ShapesStream(seed, RESOLUTIONS[0], split).next_uint8(count)[1]]


def read_caption_file(path: str | Path) -> list[str]:
    """The captions of a text file, one per line (blank lines skipped); each must parse as a shapes caption, else a
    one-line DifflabError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DifflabError(f"--prompts '{path}' is not a file; give a text file with one shapes caption per line")
    if path.stat().st_size > MAX_PROMPT_FILE_BYTES:
        raise DifflabError(f"--prompts '{path}' is larger than {MAX_PROMPT_FILE_BYTES:,} bytes; split it")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DifflabError(f"cannot read --prompts '{path}' ({err}); give a UTF-8 text file") from None
    captions = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            try:
                parse_caption(line)
            except DifflabError as err:
                raise DifflabError(f"--prompts '{path}' line {number}: {err}") from None
            captions.append(line.strip())
    if not captions:
        raise DifflabError(f"--prompts '{path}' holds no caption; write one per line")
    return captions


def check_prompt_model(pipe: Any) -> int:
    """The resolution of a text model trained on the shapes world (RGB 16, 32 or 64); a one-line DifflabError for
    any other model (scratch or frozen text encoder alike). Reads pipe.config (its text encoder and data name),
    pipe.accepts and pipe.sample_shape."""
    if pipe.config.model.text is None:
        taken = ", ".join(sorted(pipe.accepts)) or "no condition"
        raise DifflabError(f"--prompts needs a text model; this one is not conditioned on text (it takes {taken}); "
                           "train one with --data shapes --text-encoder scratch")  # fmt: skip
    name, shape = pipe.config.data.name, tuple(pipe.sample_shape)
    if name != "shapes" or len(shape) != 3 or shape[0] != 3 or shape[1] != shape[2] or shape[1] not in RESOLUTIONS:
        raise DifflabError(f"--prompts scores shapes captions, but this model was trained on '{name}' "
                           f"(samples {shape}); use a model trained with --data shapes")  # fmt: skip
    return shape[1]


def scene_for(spec: CaptionSpec, rng: np.random.Generator) -> Scene:
    """A random scene that satisfies a caption spec, drawn as the shapes world draws its scenes: a size left free
    is small or large, a position left free is uniform over POSITIONS, a pair is laid out by `place_pair`."""
    sizes = [obj.size or tuple(SIZES)[int(rng.integers(len(SIZES)))] for obj in spec.objects]
    if spec.relation is None:
        (obj,) = spec.objects
        position = spec.position or POSITIONS[int(rng.integers(len(POSITIONS)))]
        placed = place_single(rng, obj.shape, obj.colour, sizes[0], position)
        return Scene((placed,), position=position_of(placed.x, placed.y))
    (a, b), (size_a, size_b) = spec.objects, sizes
    pair = place_pair(rng, (a.shape, a.colour, size_a), spec.relation, (b.shape, b.colour, size_b))
    return Scene(pair, relation=spec.relation)


def render_captions(captions: Sequence[str], resolution: int, seed: int = REFERENCE_SEED) -> torch.Tensor:
    """One rendered scene satisfying each caption (`scene_for`, one generator seeded by `seed` for the whole list):
    float32 (N, 3, R, R) in [-1, 1]."""
    rng = np.random.default_rng(seed)
    images = np.stack([render(scene_for(parse_caption(c), rng), resolution) for c in captions])
    return to_tensor(images)


@dataclass(frozen=True)
class PromptReference:
    """Reference features (N, 51) of rendered scenes of the expanded captions (N = prompts x samples per prompt),
    their captions and the split of each ("train" or "test")."""

    captions: tuple[str, ...]
    splits: tuple[str, ...]
    features: np.ndarray


def expand_prompts(prompts: Sequence[str], n_per_prompt: int, seed: int) -> tuple[list[str], list[int]]:
    """(caption of each sample, seed of each sample): sample i of the expanded list (prompt j's k samples one after
    another) uses seed + i, so no two samples share a start. One seed for every prompt made the samples' scores
    move together: at 8,000 steps of the phrase recipe, the 200 prompts of `prompt_set` all drawn from seed 0 gave a
    relation accuracy of 78 % where seeds 0..199 gave 92 % (BENCHMARKS.md). The seeds are the same at every guidance
    scale of a sweep, so its rows stay paired."""
    if isinstance(n_per_prompt, bool) or not isinstance(n_per_prompt, int) or n_per_prompt < 1:
        raise DifflabError(f"--n-per-prompt must be an integer >= 1, got {n_per_prompt!r}")
    captions = [p for p in prompts for _ in range(n_per_prompt)]
    return captions, list(range(seed, seed + len(captions)))


def prompt_reference(captions: Sequence[str], resolution: int, seed: int = REFERENCE_SEED) -> PromptReference:
    """The reference of a list of (expanded) captions at a resolution: rendered scenes and their features."""
    splits = tuple(spec_split(parse_caption(c)) for c in captions)
    features = ShapesFeatures().features(render_captions(captions, resolution, seed)).numpy()
    return PromptReference(tuple(captions), splits, features)


def _fd(samples: np.ndarray, reference: np.ndarray) -> float | None:
    """FD of two feature sets (None below 2 rows each: no covariance)."""
    if len(samples) < 2 or len(reference) < 2:
        return None
    return frechet_distance_between(samples, reference)


def score_prompt_samples(images: torch.Tensor, reference: PromptReference) -> dict[str, Any]:
    """Adherence and FD of samples (N, 3, R, R) in [-1, 1], sample i drawn for reference.captions[i].

    Returns {"n", "adherence": {"all", "train", "test": accuracies and counts (`adherence_by_split`)},
    "fd": {"all", "train", "test": FD in the ShapesFeatures space, None for a split with < 2 samples}}; a split
    without captions is left out of both.
    """
    if len(images) != len(reference.captions):
        raise DifflabError(f"got {len(images)} samples for {len(reference.captions)} captions")
    images = quantise_8bit(images.detach().cpu().float().clamp(-1, 1))
    features = ShapesFeatures().features(images).numpy()
    fd = {"all": _fd(features, reference.features)}
    for split in ("train", "test"):
        chosen = np.array([s == split for s in reference.splits])
        if chosen.any():
            fd[split] = _fd(features[chosen], reference.features[chosen])
    return {"n": len(images), "adherence": adherence_by_split(images, list(reference.captions)), "fd": fd}


def evaluate_prompts(
    pipe: Any,
    prompts: Sequence[str],
    *,
    n_per_prompt: int = 1,
    seed: int = 0,
    guidance: float | None = None,
    reference: PromptReference | None = None,
    batch_size: int = 256,
    progress: bool = False,
    **sample_kwargs: Any,
) -> dict[str, Any]:
    """Sample every prompt n_per_prompt times (sample i of all of them with seed + i, `expand_prompts`) with a text
    model of the shapes world and score the samples: `score_prompt_samples` plus "guidance" (None: the conditional
    model unguided).

    sample_kwargs go to ``pipe.sample`` (sampler, steps, grid, negative_prompt, guidance_interval, sampler options);
    `reference` (from `prompt_reference` of the expanded captions) is computed when not given, so a sweep over
    guidance scales can share one.
    """
    resolution = check_prompt_model(pipe)
    captions, seeds = expand_prompts(prompts, n_per_prompt, seed)
    reference = reference or prompt_reference(captions, resolution)
    if list(reference.captions) != captions:
        raise DifflabError("the reference was made for other captions; build it with prompt_reference(captions)")
    images = pipe.sample(seeds=seeds, prompt=captions, guidance=guidance, batch_size=batch_size, progress=progress,
                         **sample_kwargs)  # fmt: skip
    return {"guidance": guidance, **score_prompt_samples(images, reference)}


def sweep_guidance(
    pipe: Any, prompts: Sequence[str], scales: Sequence[float | None], *, n_per_prompt: int = 1, **kwargs: Any
) -> list[dict[str, Any]]:
    """`evaluate_prompts` at each guidance scale (one row each), against one shared reference."""
    resolution = check_prompt_model(pipe)
    captions, _ = expand_prompts(prompts, n_per_prompt, kwargs.get("seed", 0))
    reference = prompt_reference(captions, resolution)
    return [
        evaluate_prompts(pipe, prompts, n_per_prompt=n_per_prompt, guidance=w, reference=reference, **kwargs)
        for w in scales
    ]
