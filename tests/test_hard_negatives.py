"""NegCLIP's hard negatives on the shapes world: every word-swapped caption parses and names another scene than its
image (so the scene never satisfies it), articles still agree, swaps that change nothing are not offered; the loss
with negatives in closed form; a CLIP trained with them prefers a held-out image's own caption to its hard negative
where a plain CLIP cannot tell them apart (BENCHMARKS.md; a test of that would take minutes of training)."""

import json

import torch
from conftest import run_cli

from difflab.clip import ClipConfig, ClipRun, ClipTask, binding_accuracy, clip_train_config, info_nce, load_clip
from difflab.config import DataConfig
from difflab.data.shapes import VOCABULARY, ShapesStream, parse_caption, scene_satisfies
from difflab.data.shapes.negatives import hard_negatives, negative_options
from difflab.text.conditioned import TextConfig
from difflab.training.checkpoint import latest_checkpoint


def test_every_hard_negative_parses_and_its_scene_does_not_satisfy_it():
    _, captions, scenes = ShapesStream(3, 16, "train").next(600)
    offered = 0
    for caption, scene in zip(captions, scenes, strict=True):
        for negative in negative_options(caption):
            offered += 1
            assert not scene_satisfies(scene, parse_caption(negative)), (caption, negative)
            words = negative.replace(",", " ").split()
            for article, word in zip(words, words[1:], strict=False):  # articles agree after a swap
                if article in ("a", "an"):
                    assert article == ("an" if word[0] in "aeiou" else "a"), negative
    assert offered > 600  # two-object captions offer two or three swaps


def test_the_swaps_of_a_caption():
    assert negative_options("a red circle left of a blue square") == [
        "a blue circle left of a red square",
        "a red square left of a blue circle",
        "a red circle right of a blue square",
    ]
    # equal colours are not swapped; "an" follows the new colour word
    assert negative_options("the orange cross is over an orange plus") == ["the orange cross is under an orange plus"]
    assert negative_options("a blue disc above an orange triangle")[0] == "an orange disc above a blue triangle"
    assert negative_options("small white square, bottom centre") == ["small white square, top centre"]
    assert negative_options("a green circle in the upper left corner") == ["a green circle in the lower right corner"]
    assert negative_options("a green circle in the centre") == []
    assert hard_negatives(["a green circle", "a red circle left of a red square"], seed=0)[0] == ""


def test_hard_negatives_are_deterministic_from_the_seed():
    _, captions, _ = ShapesStream(4, 16, "train").next(200)
    assert hard_negatives(captions, 5) == hard_negatives(captions, 5)
    assert hard_negatives(captions, 5) != hard_negatives(captions, 6)


def test_info_nce_adds_the_negatives_to_the_image_side_only():
    g = torch.Generator().manual_seed(0)
    img, txt, neg = (torch.nn.functional.normalize(torch.randn(3, 4, generator=g), dim=1) for _ in range(3))
    s = torch.tensor(5.0)
    none = torch.zeros(3, dtype=torch.bool)
    torch.testing.assert_close(info_nce(img, txt, s, (neg, none)), info_nce(img, txt, s))
    has = torch.tensor([True, False, True])
    logits = s * img @ torch.cat([txt, neg[has]]).T  # the candidates: every caption and the present negatives
    to_image = s * txt @ img.T
    expected = [0.5 * ((logits[i].exp().sum().log() - logits[i, i]) + (to_image[i].exp().sum().log() - to_image[i, i]))
                for i in range(3)]  # fmt: skip
    torch.testing.assert_close(info_nce(img, txt, s, (neg, has)), torch.stack(expected))


class CaptionLookupClip:
    """A stand-in CLIP: image i's embedding is a caption's (`prefer`: its own, or its hard negative's), and every
    caption's embedding is a fixed random unit vector of its text; so binding_accuracy must be exactly 1 or 0."""

    def __init__(self, captions: list[str], prefer: str):
        self.log_scale = torch.zeros(())
        self.table: dict[str, torch.Tensor] = {}
        negatives = hard_negatives(captions)
        chosen = captions if prefer == "own" else [n or c for c, n in zip(captions, negatives, strict=True)]
        self.images = self.encode_prompts(chosen)

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        for p in prompts:
            g = torch.Generator().manual_seed(len(self.table))
            self.table.setdefault(p, torch.nn.functional.normalize(torch.randn(32, generator=g), dim=0))
        return torch.stack([self.table[p] for p in prompts])

    def encode_image(self, index: torch.Tensor) -> torch.Tensor:
        return self.images[index]


def test_binding_accuracy_counts_two_object_captions_preferred_to_their_negatives():
    _, captions, _ = ShapesStream(6, 16, "train").next(300)
    index = torch.arange(len(captions))
    assert binding_accuracy(CaptionLookupClip(captions, "own"), index, captions) == 1.0
    assert binding_accuracy(CaptionLookupClip(captions, "negative"), index, captions) == 0.0
    one_object = [c for c in captions if len(parse_caption(c).objects) == 1]  # position swaps are not binding
    assert (
        binding_accuracy(CaptionLookupClip(one_object, "negative"), torch.arange(len(one_object)), one_object) is None
    )


def _run(hard: bool) -> ClipRun:
    text = TextConfig.from_captions(list(VOCABULARY), width=16, layers=1, heads=2)
    clip = ClipConfig(3, 16, text, embed_dim=8, width=8, levels=2, hard_negatives=hard)
    return ClipRun(DataConfig("shapes", "images", (3, 16, 16), 16, 3), clip, clip_train_config(seed=3))


def test_the_hard_negatives_reach_the_loss_as_extra_candidates():
    """Two CLIPs with the same weights: the one trained with hard negatives has them among its image->text
    candidates, so its loss is higher on pairs that have one and equal where none does."""
    x, captions, _ = ShapesStream(5, 16, "train").next(16)
    plain, hard = ClipTask(_run(False)), ClipTask(_run(True))
    assert hard.signals == ("text_tokens", "negative_tokens") and plain.signals == ("text_tokens",)
    tokenizer = hard.config.clip.text.tokenizer()
    negatives = hard_negatives(captions, 0)
    tokens, negative_tokens = tokenizer.encode(captions), tokenizer.encode_with_null(negatives)
    g = torch.Generator()
    base = plain.loss(x, {"text_tokens": tokens}, g)
    with_negatives = hard.loss(x, {"text_tokens": tokens, "negative_tokens": negative_tokens}, g)
    has = torch.tensor([bool(n) for n in negatives])
    assert 0 < int(has.sum()) < len(has)
    assert bool((with_negatives[has] > base[has]).all())
    torch.testing.assert_close(hard.loss(x, {"text_tokens": tokens, "negative_tokens": torch.zeros_like(tokens)}, g),
                               base)  # fmt: skip


def test_train_clip_with_hard_negatives_reports_binding(tmp_path, capsys):
    """`difflab train-clip --hard-negatives` records the option and the binding accuracy on held-out scenes (a few
    steps: the figure itself is measured in BENCHMARKS.md: 0.49 without, 0.87 with, after 3,000 steps)."""
    out = tmp_path / "clip"
    code, stdout, err = run_cli(capsys, "train-clip", "--out", out, "--scenes", 300, "--steps", 3, "--batch-size", 32,
                                "--hard-negatives", "--no-progress")  # fmt: skip
    assert code == 0, err
    binding = json.loads((latest_checkpoint(out) / "training_state.json").read_text())["binding"]
    assert 0 <= binding <= 1 and f"hard negative {binding:.3f}" in stdout
    assert load_clip(out).config.hard_negatives
