"""unCLIP (DALL-E 2): slerp and DDIM inversion against closed forms, the decoder's image-embedding conditioning and the
prior's masked transformer, configs, a trained prior whose samples name their prompt (an untrained one is at chance),
best-of-two selection, variations, interpolation (endpoints reproduce the inputs), text diffs, and the commands' outputs
and one-line errors."""

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TEXT_RUN_SCENES, assert_one_line_error, run_cli
from PIL import Image

import difflab
from difflab.errors import DifflabError
from difflab.oracles import GaussianDenoiser
from difflab.sampling.ancestral import invert_ddim, sample_ddim
from difflab.unclip.pipeline import UnclipPipeline, load_unclip, slerp

PRIOR_STEPS = 200


def _unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_slerp_moves_along_the_great_circle():
    a, b = _unit(3, 8, seed=1), _unit(3, 8, seed=2)
    theta = torch.arccos((a * b).sum(1))
    for t in (0.0, 0.3, 0.5, 1.0):
        m = slerp(a, b, t)
        torch.testing.assert_close(m.norm(dim=1), torch.ones(3))
        torch.testing.assert_close((m * a).sum(1), torch.cos(t * theta))  # the angle to a is t theta
        torch.testing.assert_close((m * b).sum(1), torch.cos((1 - t) * theta))
    torch.testing.assert_close(slerp(a, b, 0.0), a)
    torch.testing.assert_close(slerp(a, b, 1.0), b)
    torch.testing.assert_close(slerp(a, a, 0.4), a)  # parallel rows: no division by sin(0)


def test_ddim_inversion_follows_the_probability_flow_of_a_gaussian():
    """For data N(mu, s^2 I) the PF-ODE is exact in closed form; DDIM inversion along 200 steps lands on it and DDIM
    back from there returns x0."""
    mu, std = torch.tensor([0.5, -1.0]), torch.tensor([0.7, 1.3])
    oracle = GaussianDenoiser(mu, std)
    x0 = torch.tensor([[0.1, 0.4], [1.2, -2.0]])
    sigmas = torch.cat([torch.logspace(math.log10(20.0), math.log10(0.01), 200), torch.zeros(1)])
    xT = invert_ddim(oracle, x0, sigmas)
    torch.testing.assert_close(xT, oracle.pf_ode_solution(x0, 0.0, 20.0), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(sample_ddim(oracle, xT, sigmas), x0, rtol=0, atol=0.05)
    coarse = invert_ddim(oracle, x0, torch.cat([torch.logspace(math.log10(20.0), -2, 10), torch.zeros(1)]))
    exact = oracle.pf_ode_solution(x0, 0.0, 20.0)
    assert (coarse - exact).abs().max() > (xT - exact).abs().max()  # the error shrinks with the steps


@pytest.mark.parametrize(("model", "hidden"), [("tiny", None), ("dit-tiny", None), ("tiny", 24), ("dit-tiny", 24)])
def test_image_embedding_conditions_the_decoder_networks(model, hidden):
    from difflab.nets import build_network, model_config_for

    torch.manual_seed(0)
    net = build_network(model_config_for("images", (3, 8, 8), model, image_embed_dim=16, image_embed_hidden=hidden))
    assert net.image_embed.to_tokens.in_features == (hidden or 16)  # read through the SiLU layer when asked
    for p in net.parameters():  # zero-initialised heads would hide any dependence
        p.data.add_(0.05 * torch.randn_like(p))
    assert "image_embed" in net.accepts
    x, c, z = torch.randn(2, 3, 8, 8), torch.rand(2), _unit(2, 16)
    with torch.no_grad():
        out = net(x, c, {"image_embed": z})
        assert not torch.allclose(out, net(x, c, {"image_embed": z.flip(0)}))
        torch.testing.assert_close(net(x, c, {"image_embed": torch.zeros(2, 16)}), net(x, c))  # the null is zeros
    with pytest.raises(DifflabError, match=r"image_embed must be a float tensor of shape \(2, 16\)"):
        net(x, c, {"image_embed": torch.zeros(2, 8)})


@pytest.mark.parametrize("model", ["tiny", "dit-tiny"])
def test_decoder_networks_read_the_embedding_times_its_scale(model):
    from difflab.nets import build_network, model_config_for

    torch.manual_seed(0)
    scaled = build_network(model_config_for("images", (3, 8, 8), model, image_embed_dim=16, image_embed_scale=4.0))
    plain = build_network(model_config_for("images", (3, 8, 8), model, image_embed_dim=16))
    for p in scaled.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    plain.load_state_dict(scaled.state_dict())
    x, c, z = torch.randn(2, 3, 8, 8), torch.rand(2), _unit(2, 16)
    with torch.no_grad():
        out = scaled(x, c, {"image_embed": z})
        torch.testing.assert_close(out, plain(x, c, {"image_embed": 4.0 * z}))
        assert not torch.allclose(out, plain(x, c, {"image_embed": z}))
    with pytest.raises(DifflabError, match=r"image_embed_scale must be a number in \(0, 4096\], got 'x'"):
        build_network(model_config_for("images", (3, 8, 8), model, image_embed_dim=16, image_embed_scale="x"))


def test_prior_transformer_masks_padding_and_reads_the_null_caption():
    from difflab.nets.prior import DiffusionPrior, prior_preset

    torch.manual_seed(0)
    net = DiffusionPrior(prior_preset("tiny", 16, context_dim=8, pooled_dim=16))
    torch.nn.init.normal_(net.out.weight, std=0.1)
    x, c = torch.randn(2, 16), torch.rand(2) * 999
    embed, mask = torch.randn(2, 5, 8), torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    cond = {"text_embed": embed, "text_mask": mask, "text_pooled": _unit(2, 16)}
    with torch.no_grad():
        out = net(x, c, cond)
        changed = embed.clone()
        changed[~mask] = 100.0  # padding is never read
        torch.testing.assert_close(net(x, c, cond | {"text_embed": changed}), out)
        real = embed.clone()
        real[0, 0] += 1.0  # a real token is
        assert not torch.allclose(net(x, c, cond | {"text_embed": real})[0], out[0])
        null = net(x, c, {"text_embed": embed, "text_mask": torch.zeros(2, 5, dtype=torch.bool),
                          "text_pooled": torch.zeros(2, 16)})  # fmt: skip
    assert null.isfinite().all()


@pytest.fixture(scope="module")
def unclip_runs(tmp_path_factory):
    """A small CLIP (100 steps, 1,000 scenes at 16x16, about 10 s), a prior trained PRIOR_STEPS steps with
    `difflab train-prior` (tiny: width 64, 2 blocks) and a decoder trained 8 steps with `difflab train-decoder` (text
    too): enough to test every path; the decoder does not draw well. {"clip", "prior", "decoder"} folders."""
    import difflab.data
    from difflab.clip import ClipConfig, ClipRun, clip_train_config, train_clip
    from difflab.config import DataConfig
    from difflab.text.conditioned import TextConfig

    root = tmp_path_factory.mktemp("unclip")
    data = difflab.load_dataset("shapes", resolution=16, size=TEXT_RUN_SCENES)
    test = difflab.load_dataset("shapes", resolution=16, split="test", size=100)
    text = TextConfig.from_captions(list(data.captions), width=32, layers=1, heads=2)
    config = ClipConfig(3, 16, text, embed_dim=32, width=16, levels=2)
    run = ClipRun(DataConfig("shapes", "images", (3, 16, 16), 16, 3), config, clip_train_config(steps=100))
    train_clip(run, data.data, list(data.captions), (test.data, list(test.captions)), root / "clip")
    real = difflab.data.load_dataset
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(difflab.data, "load_dataset", lambda *a, **k: real(*a, **(k | {"size": TEXT_RUN_SCENES})))
        for role, flags in (("prior", ["--steps", PRIOR_STEPS, "--lr", "1e-3"]),
                            ("decoder", ["--steps", 8, "--batch-size", 8, "--text-encoder", "scratch",
                                         "--image-embed-hidden", 48, "--image-tokens", 6])):  # fmt: skip
            code = difflab.cli.main.main([str(a) for a in [f"train-{role}", "--clip", root / "clip", "--out",
                                                           root / role, "--no-progress", *flags]])  # fmt: skip
            assert code == 0
    return {k: root / k for k in ("clip", "prior", "decoder")}


def test_prior_and_decoder_configs_say_what_they_are(unclip_runs, capsys):
    prior, decoder = difflab.load(unclip_runs["prior"]), difflab.load(unclip_runs["decoder"])
    p, d = prior.config, decoder.config
    assert (p.unclip.role, p.data.kind, p.data.sample_shape, p.model.backbone) == ("prior", "points", (32,), "prior")
    assert (p.formulation.schedule, p.formulation.prediction) == ("cosine", "x0")  # DALL-E 2's prior
    assert p.model.text.encoder.startswith("clip:") and [(s.name, s.dropout) for s in p.conditioning] == [("text", 0.1)]
    assert [(s.name, s.dropout) for s in d.conditioning] == [("text_tokens", 0.5), ("image_embed", 0.1)]
    assert d.unclip.role == "decoder" and d.model.settings.image_embed_dim == 32 and d.unclip.clip == p.unclip.clip
    assert d.model.settings.image_embed_hidden == 48 and p.model.settings.__class__.__name__ == "PriorConfig"
    reader = next(m for name, m in decoder.denoiser.named_modules() if name.endswith("image_embed"))
    assert d.model.settings.image_tokens == 6 and reader.tokens == 6 and reader.scale == 32**0.5
    assert d.model.settings.image_embed_scale == 32**0.5  # unit variance per coordinate, as the prior draws them
    older = json.loads(d.to_json())
    del older["model"]["settings"]["image_embed_scale"]  # decoders trained before the scale read z as it is
    assert type(d).from_json(json.dumps(older)).model.settings.image_embed_scale == 1.0
    assert type(p).from_json(p.to_json()) == p and type(d).from_json(d.to_json()) == d
    code, out, _ = run_cli(capsys, "info", unclip_runs["prior"])
    assert code == 0 and f"the prior, reading the CLIP in {p.unclip.clip}" in out
    with pytest.raises(DifflabError, match=r"prior generates embeddings of shape \(32,\)"):
        replace(p, unclip=replace(p.unclip, embed_dim=32), data=replace(p.data, sample_shape=(16,)))


def test_the_clip_text_tower_is_a_frozen_text_encoder(unclip_runs):
    from difflab.clip import load_clip
    from difflab.text import make_text_encoder

    encoder = make_text_encoder(f"clip:{unclip_runs['clip']}")
    prompts = ["a red circle", "blue square, centre"]
    out = encoder.encode(prompts)
    with torch.no_grad():
        torch.testing.assert_close(out.pooled, load_clip(unclip_runs["clip"]).encode_prompts(prompts))
    assert out.mask.sum(1).tolist() == [4, 4] and (out.embed[~out.mask] == 0).all()  # three words + the end token


def test_a_trained_prior_samples_embeddings_that_name_their_prompt(unclip_runs):
    """50 held-out captions: each prior sample's most similar CLIP text embedding among the 50 is its own caption's.
    Measured (seed 0): trained 0.80 at guidance 2; an untrained prior is at chance (0.02)."""
    from difflab.clip import load_clip

    test = difflab.load_dataset("shapes", resolution=16, split="test", size=50)
    captions = list(test.captions)
    with torch.no_grad():
        text = load_clip(unclip_runs["clip"]).encode_prompts(captions)

    def named(pipe):
        z = F.normalize(pipe.sample(seeds=range(50), prompt=captions, steps=20, guidance=2.0), dim=1)
        return float(((z @ text.T).argmax(1) == torch.arange(50)).float().mean())

    prior = difflab.load(unclip_runs["prior"])
    trained = named(prior)
    torch.manual_seed(0)
    untrained = named(difflab.Pipeline(prior.config))
    assert trained >= 0.5 and untrained <= 0.1, (trained, untrained)


def test_best_of_keeps_the_draw_closest_to_the_prompt(unclip_runs):
    pipe = load_unclip(unclip_runs["decoder"], unclip_runs["prior"])
    prompt = "a red circle"
    best = pipe.image_embeds(prompt, seeds=[3, 4], steps=5, best_of=2)
    draws = F.normalize(pipe.prior.sample(seeds=[6, 7, 8, 9], prompt=prompt, steps=5), dim=1).reshape(2, 2, -1)
    score = draws @ pipe.embed_text([prompt])[0]
    torch.testing.assert_close(best, draws[torch.arange(2), score.argmax(1)])
    assert not torch.equal(draws[0, 0], draws[0, 1])
    with pytest.raises(DifflabError, match="--best-of must be a positive integer"):
        pipe.image_embeds(prompt, 1, best_of=0)


def test_variations_decode_the_source_embedding_with_new_noise(unclip_runs, monkeypatch):
    pipe = load_unclip(unclip_runs["decoder"])
    image = difflab.load_dataset("shapes", resolution=16, split="test", size=1).data
    seen = {}
    real = pipe.decoder.sample

    def spy(**kwargs):
        seen.update(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(pipe.decoder, "sample", spy)
    out = pipe.variations(image, 3, seed=5, steps=4)
    assert out.shape == (3, 3, 16, 16) and list(seen["seeds"]) == [5, 6, 7]
    torch.testing.assert_close(seen["cond"]["image_embed"], pipe.embed_images(image).expand(3, -1))
    assert not torch.allclose(out[0], out[1])  # new noise each


def test_interpolation_reproduces_its_endpoints_and_textdiff_slerps_towards_the_text_diff(unclip_runs, monkeypatch):
    """The endpoints of the path are the DDIM inversions of A and B decoded again: the inputs, up to the inversion's
    error (measured: mean absolute error 0.006 and 0.007 in [-1, 1] at 20 steps with this barely trained decoder;
    A and B differ by far more)."""
    pipe = load_unclip(unclip_runs["decoder"], unclip_runs["prior"])
    a, b = difflab.load_dataset("shapes", resolution=16, split="test", size=2).data
    frames = pipe.interpolate(a, b, 5, steps=20)
    assert frames.shape == (5, 3, 16, 16)
    apart = float((a - b).abs().mean())
    assert (frames[0] - a).abs().mean() < 0.1 * apart and (frames[-1] - b).abs().mean() < 0.1 * apart, apart
    seen = {}
    monkeypatch.setattr(pipe, "decode_from", lambda noise, z, steps: seen.update(noise=noise, z=z) or noise)
    pipe.textdiff(a, "a red circle", "a blue circle", [0.0, 0.5], steps=20)
    z_i, z_t = pipe.embed_images(a[None]), pipe.embed_text(["a red circle", "a blue circle"])
    direction = F.normalize(z_t[1:] - z_t[:1], dim=1)
    torch.testing.assert_close(seen["z"], torch.cat([z_i, slerp(z_i, direction, 0.5)]))
    torch.testing.assert_close(seen["noise"][0], seen["noise"][1])  # one inverted noise for every amount
    with pytest.raises(DifflabError, match="--frames must be an integer >= 2"):
        pipe.interpolate(a, b, 1)


def _png(path, array):
    Image.fromarray(array).save(path)
    return path


def test_unclip_commands_write_their_images(unclip_runs, tmp_path, capsys):
    from difflab.outputs import read_generation_parameters

    test = difflab.load_dataset("shapes", resolution=16, split="test", size=2)
    a, b = (_png(tmp_path / f"{k}.png", ((x.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8))
            for k, x in zip("ab", test.data, strict=True))  # fmt: skip
    dec, prior = unclip_runs["decoder"], unclip_runs["prior"]
    code, out, err = run_cli(capsys, "txt2img", "--pipeline", "unclip", "--prior", prior, "--decoder", dec,
                             "a red circle", "--n", 2, "--steps", 4, "--prior-steps", 4,
                             "--out", tmp_path / "t.png")  # fmt: skip
    assert code == 0, err
    meta = read_generation_parameters(tmp_path / "t.png")
    assert (meta["pipeline"], meta["prompt"], meta["prior_steps"], meta["best_of"]) == ("unclip", "a red circle", 4, 2)
    code, out, err = run_cli(capsys, "variations", "--ckpt", dec, "--image", a, "--n", 3, "--steps", 4,
                             "--out", tmp_path / "v.png")  # fmt: skip
    assert code == 0, err
    assert Image.open(tmp_path / "v.png").size == ((4 * 16 + 5) * 2, (16 + 2) * 2)  # the source, 3 variations; 2x
    code, out, err = run_cli(capsys, "interpolate", "--ckpt", dec, "--image", a, "--image", b, "--frames", 4,
                             "--steps", 4, "--out", tmp_path / "i.png")  # fmt: skip
    assert code == 0, err
    gif = Image.open(tmp_path / "i.gif")
    assert gif.n_frames == 6  # 4 frames there and 2 back (bounce)
    code, out, err = run_cli(capsys, "textdiff", "--ckpt", dec, "--image", a, "--from", "a red circle", "--to",
                             "a blue circle", "--amounts", "0,0.5", "--steps", 4,
                             "--out", tmp_path / "d.png")  # fmt: skip
    assert code == 0, err
    assert json.loads(Image.open(tmp_path / "d.png").text["difflab"])["amounts"] == [0.0, 0.5]


def test_unclip_commands_refuse_bad_input_in_one_line(unclip_runs, tmp_path, capsys):
    dec, prior = unclip_runs["decoder"], unclip_runs["prior"]
    small = _png(tmp_path / "small.png", np.zeros((8, 8, 3), np.uint8))
    grey = _png(tmp_path / "grey.png", np.zeros((16, 16), np.uint8))
    good = _png(tmp_path / "good.png", np.zeros((16, 16, 3), np.uint8))
    cases = [
        (["variations", "--ckpt", dec, "--image", small], "is 8x8 pixels"),
        (["variations", "--ckpt", dec, "--image", grey], "mode"),
        (["variations", "--ckpt", prior, "--image", good], "is not an unCLIP decoder"),
        (
            ["interpolate", "--ckpt", dec, "--image", good, "--image", good, "--frames", 1],
            "--frames must be at least 2",
        ),
        (["interpolate", "--ckpt", dec, "--image", good], "takes two images"),
        (["textdiff", "--ckpt", dec, "--image", good, "--from", "a", "--to", "b", "--amounts", "x"], "--amounts"),
        (["txt2img", "--pipeline", "unclip", "--decoder", dec, "a red circle"], "needs the prior"),
        (["txt2img", "--pipeline", "unclip", "--decoder", dec, "--prior", prior, "a red zebra"], "zebra"),
        (["txt2img", "--pipeline", "unclip", "--decoder", dec, "--prior", prior, "a", "--negative", "b"], "--negative"),
    ]
    for argv, fragment in cases:
        code, _, err = run_cli(capsys, *argv, "--out", tmp_path / "x.png")
        assert_one_line_error(code, err, fragment)


def test_a_changed_clip_is_refused(unclip_runs, tmp_path):
    import shutil

    from difflab.training.checkpoint import latest_checkpoint

    clip = tmp_path / "clip"
    shutil.copytree(unclip_runs["clip"], clip)
    prior = difflab.load(unclip_runs["prior"])
    moved = replace(prior.config.unclip, clip=str(latest_checkpoint(clip)))
    from difflab.unclip.link import linked_clip

    linked_clip(moved)  # the same weights elsewhere are fine
    weights = latest_checkpoint(clip) / "ema.safetensors"
    from safetensors.torch import load_file, save_file

    tensors = load_file(weights)
    tensors["log_scale"] = tensors["log_scale"] + 1
    save_file(tensors, weights)
    with pytest.raises(DifflabError, match="has changed since this model was trained"):
        linked_clip(moved)
    with pytest.raises(DifflabError, match="not an unCLIP decoder"):
        UnclipPipeline(prior)


def test_the_decoder_feeds_a_cascade_upsampler(unclip_runs, small_shapes, tmp_path, capsys):
    """txt2img --pipeline unclip --upsampler: the decoder's 16x16 images, then the upsampler's 32x32 from them, as the
    Python pipeline makes them (bit for bit)."""
    up = tmp_path / "up"
    code, _, err = run_cli(capsys, "train", "--data", "shapes", "--text-encoder", "scratch", "--steps", 2,
                           "--batch-size", 4, "--resolution", 32, "--upsample-from", 16, "--out", up,
                           "--no-progress")  # fmt: skip
    assert code == 0, err
    dec, prior = unclip_runs["decoder"], unclip_runs["prior"]
    code, _, err = run_cli(capsys, "txt2img", "--pipeline", "unclip", "--prior", prior, "--decoder", dec,
                           "--upsampler", up, "a red circle", "--n", 2, "--steps", 3, "--prior-steps", 3,
                           "--upsampler-steps", 2, "--low-res-noise", 0.1, "--out", tmp_path / "u.png")  # fmt: skip
    assert code == 0, err
    pipe = difflab.load_unclip(dec, prior, up)
    images = pipe.sample("a red circle", 2, prior_steps=3, steps=3, upsampler_steps=2, low_res_noise=0.1)
    assert images.shape == (2, 3, 32, 32)
    from difflab.outputs import write_png

    write_png(images, tmp_path / "again.png", {})
    assert Image.open(tmp_path / "u.png").tobytes() == Image.open(tmp_path / "again.png").tobytes()
    with pytest.raises(DifflabError):
        load_unclip(up, prior)  # an upsampler is not a decoder


def test_a_prior_and_a_decoder_resume_bit_for_bit(unclip_runs, tmp_path):
    from conftest import assert_exact_resume

    data = difflab.load_dataset("shapes", resolution=16, size=64)
    decoder_weight = "backbone.image_embed.to_emb.weight"  # behind the scratch text encoder
    cases = [("prior", "out.weight", {}), ("decoder", decoder_weight, {"text_encoder": "scratch"})]
    for role, changed, extra in cases:

        def make(steps, role=role, extra=extra):
            return difflab.run_config(data, clip=unclip_runs["clip"], unclip=role, steps=steps, batch_size=8,
                                      checkpoint_every=3, **extra)  # fmt: skip

        assert_exact_resume(make, data, tmp_path / role, changed)


def test_train_decoder_resumes_without_its_clip_and_refuses_another(unclip_runs, tmp_path, capsys, monkeypatch):
    import shutil

    import difflab.data

    real = difflab.data.load_dataset
    monkeypatch.setattr(difflab.data, "load_dataset", lambda *a, **k: real(*a, **(k | {"size": TEXT_RUN_SCENES})))
    run = tmp_path / "decoder"
    shutil.copytree(unclip_runs["decoder"], run)
    code, out, err = run_cli(capsys, "train-decoder", "--out", run, "--resume", "latest", "--steps", 9, "--no-progress")
    assert code == 0 and "trained 9 steps" in out, err  # the run remembers its CLIP
    code, _, err = run_cli(capsys, "train-decoder", "--out", run, "--resume", "latest", "--clip", unclip_runs["prior"])
    assert_one_line_error(code, err, "with the CLIP it was saved with", f"drop --clip {unclip_runs['prior']}")
    code, _, err = run_cli(capsys, "train-decoder", "--out", tmp_path / "new", "--steps", 1)
    assert_one_line_error(code, err, "give the CLIP the decoder reads: --clip RUN")


def test_image_embed_hidden_is_refused_off_a_decoder(small_shapes):
    with pytest.raises(DifflabError, match="--image-embed-hidden: how an unCLIP decoder reads its image embedding"):
        difflab.run_config(small_shapes, text_encoder="scratch", image_embed_hidden=32)
    with pytest.raises(DifflabError, match="--image-embed-hidden, --image-tokens: how an unCLIP decoder reads"):
        difflab.run_config(small_shapes, text_encoder="scratch", image_embed_hidden=32, image_tokens=8)


def test_zero_image_tokens_are_refused_not_replaced_by_the_default(unclip_runs):
    data = difflab.load_dataset("shapes", resolution=16, size=64)
    with pytest.raises(DifflabError, match="image_tokens is 0, outside difflab's limits 1..64"):
        difflab.run_config(data, clip=unclip_runs["clip"], unclip="decoder", image_tokens=0)
