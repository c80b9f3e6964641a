"""The small CLIP (unCLIP's first piece): the symmetric InfoNCE loss in closed form, unit embeddings and the clamped
temperature, retrieval on held-out scenes far above chance after a short training (an untrained CLIP is at chance),
loading, and one-line errors."""

import json
import math
from dataclasses import replace

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
def test_a_trained_noise_aware_clip_retrieves_held_out_scenes_clean_and_noised(tmp_path, capsys):
    """`difflab train-clip --noise-aware`: 100 steps of batch 128 on 2,000 scenes at 16x16 (about 25 s). Measured
    with CLIP's attention pooling, top-1 among 100 held-out scenes, image->text / text->image: clean 0.383 / 0.388 and
    0.340 / 0.358 (seeds 0, 1), image->text at sigma 1 0.16 and 0.15 (a CLIP trained on clean images only reads 0.04
    at sigma 1); an untrained one is at chance (0.01)."""
    out = tmp_path / "clip"
    code, stdout, err = run_cli(capsys, "train-clip", "--out", out, "--scenes", 2000, "--steps", 100, "--noise-aware",
                                "--no-progress")  # fmt: skip
    assert code == 0, err
    state = json.loads((latest_checkpoint(out) / "training_state.json").read_text())
    trained = state["retrieval"]
    assert trained["image_to_text"] > 0.25 and trained["text_to_image"] > 0.25, trained
    assert f"image->text {trained['image_to_text']:.3f}" in stdout
    test = difflab.load_dataset("shapes", resolution=16, split="test", size=200)
    model = load_clip(out)
    tokens = model.config.text.tokenizer().encode(list(test.captions))
    noised = test.data + torch.randn(test.data.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sims = model.encode_image(noised[:100], 1.0) @ model.encode_text(tokens[:100]).T
    assert float((sims.argmax(1) == torch.arange(100)).float().mean()) > 0.08  # it reads images under noise
    torch.manual_seed(0)
    untrained = retrieval_accuracy(Clip(model.config).eval(), test.data, tokens)
    assert max(untrained.values()) < 0.1, untrained
    assert math.isfinite(float(model.logit_scale))


def test_clip_guidance_adds_the_similarity_gradient_to_the_denoiser():
    """D' = D + s sigma^2 grad_x <E_img(x, sigma), E_txt>, the gradient taken at the noisy state."""
    from difflab.clip import clip_guidance

    torch.manual_seed(0)
    config = replace(_tiny_config(), noise_aware=True)
    clip = Clip(config).eval()
    text = clip.encode_prompts(["a red circle"]).detach()

    def denoiser(x, sigma, cond=None):
        return 0.5 * x

    x, sigma = torch.randn(2, 3, 16, 16), torch.tensor([0.7, 2.0])
    guided = clip_guidance(denoiser, clip, text, 3.0)(x, sigma)
    x_in = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad((clip.encode_image(x_in, sigma) * text).sum(), x_in)
    torch.testing.assert_close(guided, 0.5 * x + 3.0 * sigma[:, None, None, None] ** 2 * grad)
    assert grad.abs().sum() > 0
    with pytest.raises(DifflabError, match="needs a noise-aware CLIP"):
        clip_guidance(denoiser, Clip(_tiny_config()), text, 3.0)


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


def _tiny_clip_run(folder, noise_aware: bool = True):
    """A tiny CLIP folder trained one step on 100 scenes at 16x16 (its vocabulary theirs)."""
    from difflab.clip import ClipRun, clip_train_config, train_clip
    from difflab.config import DataConfig

    data = difflab.load_dataset("shapes", resolution=16, size=100)
    text = TextConfig.from_captions(list(data.captions), width=16, layers=1, heads=2)
    config = ClipConfig(3, 16, text, embed_dim=8, width=8, levels=2, noise_aware=noise_aware)
    run = ClipRun(DataConfig("shapes", "images", (3, 16, 16), 16, 3), config, clip_train_config(steps=1))
    train_clip(run, data.data, list(data.captions), (data.data, list(data.captions)), folder)
    return folder


def test_clip_guidance_from_the_command_line_is_recorded_and_reproduced(small_shapes, tmp_path, capsys):
    """`difflab sample --clip RUN --clip-prompt TEXT --clip-scale S` on an unconditional model: the samples are those
    of clip_guidance around the model's denoiser, the PNG records the guidance and --from-png redraws it exactly."""
    from difflab.clip import clip_guidance
    from difflab.generate import generate

    clip_dir = _tiny_clip_run(tmp_path / "clip")
    model = tmp_path / "model"
    code, _, err = run_cli(capsys, "train", "--data", "shapes", "--resolution", 16, "--process", "edm", "--steps", 2,
                           "--batch-size", 4, "--out", model, "--no-progress")  # fmt: skip
    assert code == 0, err
    out = tmp_path / "g.png"
    code, _, err = run_cli(capsys, "sample", "--ckpt", model, "--clip", clip_dir, "--clip-prompt", "a red circle",
                           "--clip-scale", 4, "--sampler", "euler", "--steps", 3, "--n", 2, "--out", out)  # fmt: skip
    assert code == 0, err
    from difflab.outputs import read_generation_parameters

    meta = read_generation_parameters(out)
    assert (meta["clip"], meta["clip_prompt"], meta["clip_scale"]) == (str(clip_dir), "a red circle", 4.0)
    code, _, err = run_cli(capsys, "sample", "--from-png", out, "--out", tmp_path / "again.png")
    assert code == 0, err
    import numpy as np
    from PIL import Image

    assert np.array_equal(np.array(Image.open(out)), np.array(Image.open(tmp_path / "again.png")))
    pipe, clip = difflab.load(model), load_clip(clip_dir)
    text = clip.encode_prompts(["a red circle"]).detach()
    expected = generate(clip_guidance(pipe.denoiser, clip, text, 4.0), pipe.model_shape, pipe.sigmas(3), [0, 1],
                        sampler="euler")  # fmt: skip
    got = pipe.sample(
        seeds=[0, 1], sampler="euler", steps=3, clip=clip, clip_prompt="a red circle", clip_scale=4.0, clip_x0=False
    )  # (the low-level call above does not clip x0)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)  # batched matmuls round differently (~1e-6)
    plain = pipe.sample(seeds=[0, 1], sampler="euler", steps=3, clip_x0=False)
    assert (got - plain).abs().max() > 1e-4  # the guidance moved the samples
    code, _, err = run_cli(capsys, "sample", "--ckpt", model, "--clip-scale", 2, "--out", tmp_path / "x.png")
    assert_one_line_error(code, err, "--clip-scale needs --clip RUN")
    code, _, err = run_cli(capsys, "sample", "--ckpt", model, "--clip", clip_dir, "--out", tmp_path / "x.png")
    assert_one_line_error(code, err, "give --clip-prompt TEXT")
    clean = _tiny_clip_run(tmp_path / "clean", noise_aware=False)
    code, _, err = run_cli(capsys, "sample", "--ckpt", model, "--clip", clean, "--clip-prompt", "a red circle",
                           "--out", tmp_path / "x.png")  # fmt: skip
    assert_one_line_error(code, err, "needs a noise-aware CLIP")
