"""Text to image with frozen text encoders (issue 12): `run_config(text_encoder="hf:PATH" | "minilm")` records the
encoder, the captions' embeddings come from the on-disk cache, caption dropout nulls a caption as a whole, training
resumes exactly, and prompts are encoded by the recorded encoder at sampling time. The encoder is a tiny random
CLIPTextModel saved here (test_text_encoders.clip_folder); no test reaches the network."""

from __future__ import annotations

import shutil

import pytest
import test_text_encoders
import torch
from conftest import assert_exact_resume, assert_one_line_error, run_cli

import difflab
from difflab.conditioning import NULL_LABEL, drop_signals
from difflab.config import RunConfig
from difflab.errors import DifflabError
from difflab.eval.adherence import evaluate_prompts
from difflab.outputs import read_generation_parameters
from difflab.pipeline import Pipeline
from difflab.text.conditioned import FrozenTextConfig
from difflab.text.frozen import HFEncoder
from difflab.training.run import training_signals

TEXT = ("text_embed", "text_mask", "text_pooled")
# fixtures shared with test_text_encoders: sockets refuse to connect; the tiny random CLIP text model's folder
_no_network, clip_folder = test_text_encoders._no_network, test_text_encoders.clip_folder


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "text"


@pytest.fixture(scope="module")
def shapes():
    return difflab.load_dataset("shapes", resolution=16, size=12)


def small(data, encoder, steps=2, **settings):
    return difflab.run_config(data, text_encoder=encoder, steps=steps, batch_size=4, checkpoint_every=3,
                              warmup=2, **settings)  # fmt: skip


def test_the_config_records_the_frozen_encoder_and_the_cache_serves_a_second_run(
    clip_folder, shapes, cache, monkeypatch
):
    spec = f"hf:{clip_folder.resolve()}"
    config = small(shapes, f"hf:{clip_folder}")
    text = config.model.text
    assert isinstance(text, FrozenTextConfig) and text.encoder == spec and text.name.startswith(spec + "@")
    assert (text.dim, text.pooled_dim, text.max_length) == (32, 32, 16)
    assert (config.model.settings.context_dim, config.model.settings.pooled_dim) == (32, 32)
    assert [(s.name, s.dropout) for s in config.conditioning] == [("text", 0.2)]
    assert RunConfig.from_json(config.to_json()) == config
    with pytest.warns(difflab.text.TextTruncationWarning):  # shapes captions spell out letters: > 16 tokens
        first = training_signals(config, shapes)
    assert len(list(cache.rglob("*.safetensors"))) == len(set(shapes.captions))
    assert first["text_embed"].dtype == torch.float16 and first["text_embed"].shape[:2] == first["text_mask"].shape
    assert first["text_mask"].any(0).all()  # L = the longest caption's tokens, not more
    monkeypatch.setattr(HFEncoder, "encode", lambda self, prompts: pytest.fail(f"encoded {prompts} again"))
    second = training_signals(config, shapes)
    assert all(torch.equal(first[k], second[k]) for k in TEXT)
    run = difflab.train(config, cache.parent.parent / "run", data=shapes, progress=False)
    pipe = difflab.load(run)
    assert pipe.accepts == set(TEXT) and not hasattr(pipe.denoiser.net, "text_encoder")
    assert pipe.config == config


def test_caption_dropout_nulls_a_caption_as_a_whole_from_the_generator():
    n, gen = 20000, torch.Generator().manual_seed(3)
    cond = {"class_label": torch.arange(n) % 5, "text_embed": torch.ones(n, 4, 6, dtype=torch.float16),
            "text_mask": torch.ones(n, 4, dtype=torch.bool), "text_pooled": torch.ones(n, 6)}  # fmt: skip
    state = gen.get_state()
    out = drop_signals(cond, {"class_label": 0.3, "text": 0.2}, gen)
    nulled = [out["text_embed"].flatten(1).eq(0).all(1), ~out["text_mask"].any(1), out["text_pooled"].eq(0).all(1)]
    assert torch.equal(nulled[0], nulled[1]) and torch.equal(nulled[0], nulled[2])
    assert bool(out["text_embed"][~nulled[0]].eq(1).all()) and bool(out["text_mask"][~nulled[0]].all())
    assert abs(float(nulled[0].double().mean()) - 0.2) < 0.01
    reference = torch.Generator().set_state(state)  # one uniform per row for the label, then one for the caption
    labels = torch.rand(n, generator=reference) < 0.3
    assert torch.equal(out["class_label"] == NULL_LABEL, labels)
    assert torch.equal(nulled[0], torch.rand(n, generator=reference) < 0.2)
    # labels and scratch tokens draw as before: one uniform per row per signal, in order
    old = {"class_label": cond["class_label"], "text_tokens": torch.ones(n, 3, dtype=torch.int64)}
    out = drop_signals(old, {"class_label": 0.1, "text_tokens": 0.2}, torch.Generator().set_state(state))
    reference = torch.Generator().set_state(state)
    assert torch.equal(out["class_label"] == NULL_LABEL, torch.rand(n, generator=reference) < 0.1)
    assert torch.equal(out["text_tokens"].eq(0).all(1), torch.rand(n, generator=reference) < 0.2)


@pytest.mark.filterwarnings("ignore::difflab.text.TextTruncationWarning")  # captions spelt out in letters
def test_a_frozen_encoder_run_resumes_exactly(clip_folder, shapes, cache, tmp_path):
    data = difflab.load_dataset("shapes", resolution=16, size=8)
    assert_exact_resume(lambda steps: small(data, f"hf:{clip_folder}", steps), data, tmp_path,
                        "pooled_embed.proj.weight")  # fmt: skip


def test_txt2img_with_a_frozen_encoder_run(clip_folder, shapes, cache, tmp_path, capsys):
    with pytest.warns(difflab.text.TextTruncationWarning):
        run = difflab.train(small(shapes, f"hf:{clip_folder}"), tmp_path / "run", data=shapes, progress=False)
    pipe = difflab.load(run)
    net, x, c_noise = pipe.denoiser.net, torch.randn(2, 3, 16, 16), torch.full((2,), 0.5)
    empty = pipe.text_cond("", 2)
    assert not empty["text_mask"].any() and not empty["text_embed"].any() and not empty["text_pooled"].any()
    assert torch.equal(net(x, c_noise, empty), net(x, c_noise, None))  # the empty prompt is the null caption
    cond = pipe.text_cond(["a red cat", "blue dog"], 2)
    fresh = pipe.frozen_text_encoder().encode(["a red cat", "blue dog"])
    assert torch.equal(cond["text_embed"], fresh.embed) and torch.equal(cond["text_pooled"], fresh.pooled)
    out = tmp_path / "red.png"
    code, _, err = run_cli(capsys, "txt2img", "--ckpt", run, "a red cat", "--guidance", 2, "--steps", 2, "--n", 1,
                           "--out", out)  # fmt: skip
    assert code == 0, err
    assert read_generation_parameters(out)["prompt"] == "a red cat"
    long = "the blue dog of the red cat of the blue photo of the red dog"
    code, _, err = run_cli(capsys, "txt2img", "--ckpt", run, long, "--steps", 1, "--n", 1, "--out", out)
    assert code == 0
    assert err.strip().splitlines() == [
        "difflab txt2img: warning: a prompt has 17 tokens; the text encoder reads only the first 16, the rest is "
        "ignored"
    ]


def test_frozen_encoder_errors_are_one_line(clip_folder, shapes, cache, tmp_path, capsys):
    with pytest.raises(DifflabError, match=r"folder '.*missing' not found; .* nothing is downloaded") as err:
        small(shapes, f"hf:{tmp_path / 'missing'}")
    assert "\n" not in str(err.value)
    moved = tmp_path / "clip"
    shutil.copytree(clip_folder, moved)
    pipe = Pipeline(small(shapes, f"hf:{moved}"))
    config = (moved / "config.json").read_text()
    (moved / "config.json").write_text(config.replace('"hidden_act"', '"initializer_factor": 2.0, "hidden_act"'))
    with pytest.raises(DifflabError, match=r"is now hf:.*@\w+ \(32-d\) but this model was trained with") as err:
        pipe.text_cond("a cat", 1)
    assert "\n" not in str(err.value) and "restore the encoder it was trained with" in str(err.value)
    assert Pipeline(pipe.config).text_cond("", 1)["text_mask"].shape == (1, 16)  # no prompt: no encoder needed
    code, _, err = run_cli(capsys, "train", "--data", "moons", "--text-encoder", "hf:", "--steps", 1, "--out",
                           tmp_path / "x")  # fmt: skip
    assert_one_line_error(code, err, "needs a folder after 'hf:'")


def test_minilm_trains_and_prompts(shapes, cache, tmp_path):
    config = small(shapes, "minilm")
    assert (config.model.text.encoder, config.model.text.dim, config.model.text.max_length) == ("minilm", 384, 77)
    pipe = difflab.load(difflab.train(config, tmp_path / "run", data=shapes, progress=False))
    assert training_signals(config, shapes)["text_embed"].shape[1] < 30  # the longest caption, not 77 tokens
    images = pipe.sample(2, prompt="a red circle", steps=2, guidance=2.0)
    assert images.shape == (2, 3, 16, 16) and bool(torch.isfinite(images).all())
    # the shapes evaluator takes frozen-encoder models as it takes scratch ones
    scores = evaluate_prompts(pipe, ["a red circle", "a blue square left of a white cross"], steps=2)
    assert scores["n"] == 2 and set(scores["adherence"]) == {"all", "train"}
