"""Phrase-wise text encoding (`--text-encoder phrases:INNER`, StructureDiffusion's per-noun-phrase encoding): the
split of prompts into subject / relation / object on every caption the shapes world writes, the layout of the
encoding (slots, segment codes, mask, pooled), that it tells apart captions a bag-of-words encoder confuses, and a run
trained, loaded and prompted with it."""

from __future__ import annotations

import numpy as np
import pytest
import test_text_encoders
import torch
from conftest import run_cli

import difflab
from difflab.data.shapes.captions import RELATION_PHRASES, CaptionSpec, caption, parse_caption
from difflab.data.shapes.world import sample_scene
from difflab.errors import DifflabError
from difflab.text import EmbeddingCache, encode_cached, make_text_encoder, parse_text_encoder
from difflab.text.base import FrozenTextEncoder, TextEncoding
from difflab.text.phrases import PhraseEncoder, split_phrases

_no_network, clip_folder = test_text_encoders._no_network, test_text_encoders.clip_folder
RELATION_OF = {phrase: relation for relation, phrases in RELATION_PHRASES.items() for phrase in phrases}


class BagOfWords(FrozenTextEncoder):
    """A stand-in encoder: token i = a fixed random vector of word i; pooled = their mean (word order is lost)."""

    spec, name, dim, pooled_dim, max_length = "bag", "bag@0", 6, 6, 8

    def encode(self, prompts):
        embed, mask = torch.zeros(len(prompts), self.max_length, self.dim), torch.zeros(len(prompts), 8, dtype=bool)
        for row, prompt in enumerate(prompts):
            for col, word in enumerate(prompt.split()[: self.max_length]):
                generator = torch.Generator().manual_seed(sum(map(ord, word)))
                embed[row, col], mask[row, col] = torch.randn(self.dim, generator=generator), True
        pooled = embed.sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
        return TextEncoding(embed, mask, pooled)


@pytest.mark.parametrize(
    ("prompt", "parts"),
    [
        ("a red circle left of a blue square", ("a red circle", "left of", "a blue square")),
        ("There is a big red disc  to the left of the cyan plus",
         ("There is a big red disc", "to the left of", "the cyan plus")),
        ("the blue cross is beneath a red disc.", ("the blue cross is", "beneath", "a red disc")),
        ("a red circle at the left of a blue square", ("a red circle", "at the left of", "a blue square")),
        ("a cat on top of a dog", ("a cat", "on top of", "a dog")),
        ("a red circle at the top left of the image", ("a red circle at the top left of the image", "", "")),
        ("a large red circle at the top left", ("a large red circle at the top left", "", "")),
        ("left of a blue square", ("left of a blue square", "", "")),  # no subject: not a relation between two things
        ("", ("", "", "")),
    ],
)  # fmt: skip
def test_split_phrases(prompt, parts):
    assert split_phrases(prompt) == parts


def test_every_shapes_caption_splits_into_its_two_objects_and_their_relation():
    rng, pairs, singles = np.random.default_rng(0), 0, 0
    for _ in range(600):
        text = caption(sample_scene(rng, "train" if rng.random() < 0.5 else "test"), rng)
        subject, relation, obj = split_phrases(text)
        spec = parse_caption(text)
        if spec.relation is None:
            assert (relation, obj) == ("", "") and subject == " ".join(text.split())
            singles += 1
            continue
        first, second = parse_caption(subject), parse_caption(obj)
        assert CaptionSpec(first.objects + second.objects, RELATION_OF[relation]) == spec
        pairs += 1
    assert pairs > 100 and singles > 100


def test_the_layout_parts_in_turn_segments_mask_and_pooled():
    inner = BagOfWords()
    enc = PhraseEncoder(inner)
    assert (enc.dim, enc.pooled_dim, enc.max_length) == (6 + 3, 6, 24)
    assert (enc.spec, enc.name) == ("phrases:bag", "phrases(bag@0)")
    prompts = ["a red circle left of a blue square", "a red circle at the top", ""]
    out = enc.encode(prompts)
    assert out.embed.shape == (3, 24, 9) and out.mask.shape == (3, 24) and out.pooled.shape == (3, 6)
    start = 0
    for slot, text in enumerate(["a red circle", "left of", "a blue square"]):  # one after another, real tokens first
        alone = inner.encode([text])
        span = slice(start, start + int(alone.mask[0].sum()))
        assert torch.equal(out.embed[0, span, :6], alone.embed[0, alone.mask[0]])
        assert torch.equal(out.embed[0, span, 6:], torch.eye(3)[slot].expand(span.stop - span.start, 3))
        start = span.stop
    assert out.mask[0].tolist() == [True] * 8 + [False] * 16 and torch.all(out.embed[0, 8:] == 0)
    assert out.mask[1].tolist() == [True] * 6 + [False] * 18  # one object: all subject
    assert torch.all(out.embed[1, 6:] == 0) and torch.all(out.embed[1, :6, 6:].argmax(-1) == 0)
    assert not out.mask[2].any() and torch.all(out.embed[2] == 0)
    assert torch.equal(out.pooled, inner.encode(prompts).pooled)  # the whole prompt's
    assert torch.equal(enc.encode(["A Red circle LEFT OF a blue square"]).embed[0, 3:5, -3:], torch.eye(3)[[1, 1]])


def test_training_reads_the_same_phrases_as_sampling(tmp_path):
    # the on-disk cache keeps each caption's first n token rows: training (trimmed, cached) must see what a prompt
    # encoded at sampling time gives
    enc = PhraseEncoder(BagOfWords(), pooled="slots")
    captions = ["a red circle left of a blue square", "the cyan plus is beneath a big red disc", "a red circle"]
    direct = enc.encode(captions)
    cached = encode_cached(enc, captions, EmbeddingCache(tmp_path), trim=True)
    again = encode_cached(enc, captions, EmbeddingCache(tmp_path), trim=True)  # from the files this time
    for got in (cached, again):
        length = got.mask.shape[1]
        assert length == int(direct.mask.sum(1).max()) and not direct.mask[:, length:].any()
        assert torch.equal(got.mask, direct.mask[:, :length]) and torch.equal(got.pooled, direct.pooled)
        assert torch.equal(got.embed, direct.embed[:, :length])


def test_the_cache_refuses_an_encoder_that_pads_first(tmp_path):
    class PadsFirst(BagOfWords):
        name = "pads-first@0"

        def encode(self, prompts):
            out = super().encode(prompts)
            return TextEncoding(out.embed.flip(1), out.mask.flip(1), out.pooled)

    with pytest.raises(DifflabError, match="pads-first@0 put padding before real tokens"):
        encode_cached(PadsFirst(), ["a red circle"], EmbeddingCache(tmp_path))


def test_slot_pooling_puts_each_parts_pooled_embedding_side_by_side():
    inner = BagOfWords()
    enc = PhraseEncoder(inner, pooled="slots")
    assert (enc.spec, enc.pooled_dim) == ("phrases-slots:bag", 18)
    out = enc.encode(["a red circle left of a blue square", "a red circle at the top"])
    parts = [inner.encode([t]).pooled[0] for t in ("a red circle", "left of", "a blue square")]
    assert torch.equal(out.pooled[0], torch.cat(parts))
    assert torch.equal(out.pooled[1, :6], inner.encode(["a red circle at the top"]).pooled[0])
    assert torch.all(out.pooled[1, 6:] == 0)  # no relation, no object: zeros
    swapped = enc.encode(["a blue circle left of a red square"]).pooled[0]
    assert not torch.allclose(swapped, out.pooled[0])  # a bag of words' pooled would be equal
    with pytest.raises(DifflabError, match="phrase pooling must be one of whole, slots"):
        PhraseEncoder(inner, pooled="mean")


def test_phrases_tell_apart_what_a_bag_of_words_confuses():
    inner, swapped = BagOfWords(), ["a red circle left of a blue square", "a blue circle left of a red square"]
    bag = inner.encode(swapped)
    assert torch.allclose(bag.pooled[0], bag.pooled[1])  # the same words: the whole-prompt encoder cannot tell
    out = PhraseEncoder(inner).encode(swapped)
    subject = out.embed[:, :3]  # "a red circle" / "a blue circle": the subject's tokens
    assert not torch.allclose(subject[0], subject[1])
    # the colour reaches the subject only with its own shape: "red" sits beside "circle" in the first prompt
    red = inner.encode(["red"]).embed[0, 0]
    assert torch.equal(subject[0, 1, :6], red) and not torch.equal(subject[1, 1, :6], red)


def test_specs_and_refusals(clip_folder):
    assert parse_text_encoder("phrases:clip:runs/clip") == ("phrases", "clip:runs/clip")
    assert parse_text_encoder("phrases:minilm") == ("phrases", "minilm")
    assert parse_text_encoder("phrases-slots:minilm") == ("phrases-slots", "minilm")
    assert make_text_encoder(f"phrases-slots:hf:{clip_folder}").pooled_dim == 3 * 32
    refusals = [("phrases:scratch", "needs a frozen INNER"), ("phrases:phrases-slots:minilm", "needs a frozen"),
                ("phrases:nope", "unknown text encoder 'nope'"), ("phrases:hf:", "needs a folder")]  # fmt: skip
    for bad, fragment in refusals:
        with pytest.raises(DifflabError, match=fragment):
            make_text_encoder(bad)
    with pytest.raises(DifflabError, match="takes a plain encoder"):
        PhraseEncoder(PhraseEncoder(BagOfWords()))
    enc = make_text_encoder(f"phrases:hf:{clip_folder}")
    assert enc.spec == f"phrases:hf:{clip_folder.resolve()}" and enc.max_length == 3 * 16
    again = make_text_encoder(enc.spec, max_length=48)  # what a run's config reloads
    assert (again.name, again.max_length, again.inner.max_length) == (enc.name, 48, 16)
    with pytest.raises(DifflabError, match="3 x its inner encoder's, not 47"):
        make_text_encoder(enc.spec, max_length=47)


def test_a_run_trains_loads_and_prompts_with_phrases(clip_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path / "cache"))
    data = difflab.load_dataset("shapes", resolution=16, size=8)
    config = difflab.run_config(data, text_encoder=f"phrases:hf:{clip_folder}", steps=2, batch_size=4,
                                checkpoint_every=2, warmup=1)  # fmt: skip
    assert config.model.text.encoder.startswith("phrases:hf:") and config.model.settings.context_dim == 32 + 3
    with pytest.warns(difflab.text.TextTruncationWarning):  # the tiny tokenizer spells words out: long phrases
        run = difflab.train(config, tmp_path / "run", data=data, progress=False)
    pipe = difflab.load(run)
    cond = pipe.text_cond(["a red cat left of a dog", ""], 2)
    assert cond["text_embed"].shape == (2, 48, 35) and cond["text_embed"][0, :, -1].any()  # the object is read
    assert not cond["text_mask"][1].any()  # the empty prompt: the null caption
    out = tmp_path / "cat.png"
    code, _, _ = run_cli(capsys, "txt2img", "--ckpt", run, "a red cat left of a dog", "--steps", 2, "--n", 1,
                         "--out", out)  # fmt: skip
    assert code == 0 and out.is_file()
