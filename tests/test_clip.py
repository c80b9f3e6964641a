"""The small CLIP (unCLIP's first piece): the symmetric InfoNCE loss in closed form, unit embeddings and the clamped
temperature, retrieval on held-out scenes far above chance after a short training (an untrained CLIP is at chance),
loading, and one-line errors."""

import json
import math

import pytest
import torch
from conftest import assert_one_line_error, run_cli

import difflab
from difflab.clip import Clip, ClipConfig, info_nce, load_clip, retrieval_accuracy
from difflab.errors import DifflabError
from difflab.text.conditioned import TextConfig
from difflab.training.checkpoint import latest_checkpoint


def _tiny_config() -> ClipConfig:
    text = TextConfig.from_captions(["a red circle", "a blue square"], width=16, layers=1, heads=2)
    return ClipConfig(3, 16, text, embed_dim=8, width=8, levels=2)


def test_info_nce_is_the_mean_of_both_cross_entropies():
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(3, 4, generator=g), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(3, 4, generator=g), dim=1)
    s = torch.tensor(7.0)
    logits = s * img @ txt.T
    expected = [0.5 * ((logits[i].exp().sum().log() - logits[i, i]) + (logits[:, i].exp().sum().log() - logits[i, i]))
                for i in range(3)]  # fmt: skip
    torch.testing.assert_close(info_nce(img, txt, s), torch.stack(expected))


def test_embeddings_are_unit_vectors_and_the_temperature_starts_at_clips():
    torch.manual_seed(0)
    model = Clip(_tiny_config())
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(model.encode_image(images).norm(dim=1), torch.ones(2))
    torch.testing.assert_close(model.encode_prompts(["a red circle", "a blue square"]).norm(dim=1), torch.ones(2))
    assert float(model.logit_scale) == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        model.log_scale.fill_(10.0)
    assert float(model.logit_scale) == 100.0  # clamped as CLIP's
    with pytest.raises(DifflabError, match=r"images of shape \(B, 3, 16, 16\)"):
        model.encode_image(torch.zeros(2, 3, 8, 8))


@pytest.mark.slow
def test_a_trained_clip_retrieves_held_out_scenes(tmp_path, capsys):
    """150 steps of batch 128 on 2,000 scenes at 16x16 (about 40 s). Measured (seed 0): top-1 among 100 held-out
    scenes image->text 0.465, text->image 0.474; an untrained CLIP is at chance (0.01)."""
    out = tmp_path / "clip"
    code, stdout, err = run_cli(capsys, "train-clip", "--out", out, "--scenes", 2000, "--steps", 150, "--no-progress")
    assert code == 0, err
    state = json.loads((latest_checkpoint(out) / "training_state.json").read_text())
    trained = state["retrieval"]
    assert trained["image_to_text"] > 0.25 and trained["text_to_image"] > 0.25, trained
    assert f"image->text {trained['image_to_text']:.3f}" in stdout
    test = difflab.load_dataset("shapes", resolution=16, split="test", size=200)
    model = load_clip(out)
    tokens = model.config.text.tokenizer().encode(list(test.captions))
    again = retrieval_accuracy(model, test.data, tokens)
    assert again["image_to_text"] > 0.25  # the loaded EMA weights are the ones measured
    torch.manual_seed(0)
    untrained = retrieval_accuracy(Clip(model.config).eval(), test.data, tokens)
    assert max(untrained.values()) < 0.1, untrained
    assert math.isfinite(float(model.logit_scale))


def test_train_clip_errors_are_one_line(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train-clip", "--data", "digits", "--out", tmp_path / "c")
    assert_one_line_error(code, err, "needs captioned images")
    from difflab.clip import ClipRun, clip_train_config, train_clip
    from difflab.config import DataConfig

    data = difflab.load_dataset("shapes", resolution=16, size=100)
    run = ClipRun(DataConfig("shapes", "images", (3, 16, 16), 16, 3), _tiny_config(), clip_train_config(steps=1))
    with pytest.raises(DifflabError, match="unknown word"):  # the tiny vocabulary lacks the data's words
        train_clip(run, data.data, list(data.captions), (data.data, list(data.captions)), tmp_path / "tiny")
    text = TextConfig.from_captions(list(data.captions), width=16, layers=1, heads=2)
    run = ClipRun(run.data, ClipConfig(3, 16, text, embed_dim=8, width=8, levels=2), run.train)
    train_clip(run, data.data, list(data.captions), (data.data, list(data.captions)), tmp_path / "tiny")
    code, _, err = run_cli(capsys, "sample", "--ckpt", tmp_path / "tiny", "--out", tmp_path / "x.png")
    assert_one_line_error(code, err, "holds a CLIP")
