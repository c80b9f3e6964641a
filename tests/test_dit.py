"""The DiT backbone (Peebles & Xie 2023; `difflab.nets.dit`): patches, position embeddings, adaLN-Zero, text
cross-attention (PixArt-alpha), the head; its presets, its place among the backbones (every formulation, class labels,
scratch and frozen text encoders, the cascade's upsampler, GLIDE's inpainting fine-tune), and `difflab.nets.cost`."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import test_text_encoders
import torch
from conftest import assert_one_line_error, run_cli

import difflab
import difflab.data
from difflab.config import RunConfig
from difflab.errors import DifflabError
from difflab.nets import ModelConfig, build_network, model_config_for
from difflab.nets.cost import example_cond, forward_flops, network_cost, parameter_count
from difflab.nets.dit import DiT, DiTConfig, dit_preset, patchify, sincos_position_embedding, unpatchify
from difflab.pipeline import load
from difflab.training.init_from import initial_weights
from difflab.training.tasks import DenoiserTask

_no_network, clip_folder = test_text_encoders._no_network, test_text_encoders.clip_folder
D_TEXT, P, L = 12, 6, 5
# every input a DiT takes: 3 channels at 8x8 on 2x2 patches (16 tokens), classes, text, an upsampler's low-res image
# (4x4), GLIDE's inpainting channels, one extra output (PFGM's) and a variance head
FULL = DiTConfig(in_channels=3, resolution=8, patch_size=2, width=32, depth=2, heads=2, out_channels=4,
                 learn_variance=True, num_classes=10, context_dim=D_TEXT, pooled_dim=P, low_res_channels=3,
                 inpaint_channels=3)  # fmt: skip


def _randomised(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """adaLN-Zero's modulations, the cross-attention's output and the head start at zero; give them weights, as
    training would, so that every path reaches the output."""
    torch.manual_seed(seed)
    for module in net.modules():
        if isinstance(module, torch.nn.Linear) and not module.weight.any():
            torch.nn.init.normal_(module.weight, std=0.1)
            torch.nn.init.normal_(module.bias, std=0.1)
    return net.eval()


def _inputs(batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 8, 8, generator=g)
    cond = {
        "class_label": torch.arange(batch) % 10,
        "text_embed": torch.randn(batch, L, D_TEXT, generator=g),
        "text_mask": torch.tensor([[1, 1, 0, 1, 0], [1, 0, 0, 0, 0]])[:batch],
        "text_pooled": torch.randn(batch, P, generator=g),
        "low_res": torch.randn(batch, 3, 4, 4, generator=g),
        "low_res_noise": torch.rand(batch, generator=g),
        "masked_image": torch.randn(batch, 3, 8, 8, generator=g),
        "mask": (torch.rand(batch, 1, 8, 8, generator=g) > 0.5).float(),
    }
    return x, torch.tensor([3.0, -1.5])[:batch], cond


@torch.no_grad()
def test_at_initialisation_every_block_is_the_identity_and_the_output_is_exactly_zero():
    """adaLN-Zero: the gates start at zero, so each block returns its input (the cross-attention's output projection
    starts at zero too); the head starts at zero, so F = 0 for any input and conditioning."""
    torch.manual_seed(0)
    net = DiT(FULL).eval()
    x, c_noise, cond = _inputs()
    seen = []
    hooks = [b.register_forward_hook(lambda m, args, out: seen.append(torch.equal(args[0], out))) for b in net.blocks]
    out = net(x, c_noise, cond)
    for h in hooks:
        h.remove()
    assert seen == [True, True]
    assert out.shape == (2, 4, 8, 8) and torch.equal(out, torch.zeros_like(out))
    prediction, variance = net.forward_with_variance(x, c_noise, cond)
    assert torch.equal(prediction, out) and variance.shape == (2, 4, 8, 8) and not variance.any()
    # trained weights reach the output through every branch
    _randomised(net)
    assert net(x, c_noise, cond).abs().min() > 0


def test_patchify_then_unpatchify_is_the_identity_and_tokens_are_the_patches():
    x = torch.randn(2, 3, 8, 8)
    for p in (1, 2, 4):
        tokens = patchify(x, p)
        assert tokens.shape == (2, (8 // p) ** 2, 3 * p * p)
        assert torch.equal(unpatchify(tokens, p, 8, 8), x)
        grid = 8 // p  # token k is the patch in row k // grid, column k % grid; values ordered (channel, row, col)
        for k in (0, grid + 1, grid**2 - 1):
            i, j = divmod(k, grid)
            assert torch.equal(tokens[:, k], x[:, :, i * p : (i + 1) * p, j * p : (j + 1) * p].flatten(1))
    # the patch embedding is one linear map of each patch's values
    torch.manual_seed(0)
    net = DiT(DiTConfig(in_channels=3, resolution=8, patch_size=4, width=16, depth=1, heads=2))
    conv = net.patch_embed
    expected = patchify(x, 4) @ conv.weight.flatten(1).T + conv.bias
    torch.testing.assert_close(conv(x).flatten(2).transpose(1, 2), expected, rtol=0, atol=1e-5)


def test_the_sincos_position_embedding_is_its_closed_form():
    grid, dim = 3, 8
    table = sincos_position_embedding(grid, dim)
    q = dim // 4
    for k in range(grid * grid):
        i, j = divmod(k, grid)
        for f in range(q):
            w = 10000 ** (-f / q)
            expected = [math.sin(i * w), math.cos(i * w), math.sin(j * w), math.cos(j * w)]
            got = [float(table[k, f + s * q]) for s in range(4)]
            assert got == pytest.approx(expected, abs=1e-6), (k, f)
    # the network adds it (fixed, not in its weights); a learned one is a parameter, stored
    fixed = DiT(DiTConfig(resolution=8, patch_size=2, width=16, depth=1, heads=2))
    assert torch.equal(fixed.position[0], sincos_position_embedding(4, 16)) and "position" not in fixed.state_dict()
    learned = DiT(replace(fixed.config, position_embedding="learned"))
    assert learned.state_dict()["position"].shape == (1, 16, 16) and learned.position.requires_grad
    with pytest.raises(DifflabError, match="unknown position embedding 'rope': choose one of sincos, learned"):
        DiT(replace(fixed.config, position_embedding="rope"))


@torch.no_grad()
def test_padded_text_tokens_do_not_change_the_output_and_real_ones_do():
    net = _randomised(DiT(FULL))
    x, c_noise, cond = _inputs()
    base = net(x, c_noise, cond)
    padded = cond["text_embed"].clone()
    padded[0, 2], padded[0, 4], padded[1, 1:] = 100.0, -50.0, 7.0  # every padding token of both rows
    torch.testing.assert_close(net(x, c_noise, cond | {"text_embed": padded}), base, rtol=0, atol=1e-5)
    real = cond["text_embed"].clone()
    real[0, 3] = torch.randn(D_TEXT, generator=torch.Generator().manual_seed(2))
    changed = net(x, c_noise, cond | {"text_embed": real}) - base
    assert changed[0].abs().max() > 1e-3 and changed[1].abs().max() < 1e-6  # only the sample whose token it is
    # the null caption (no real token) is finite and is no text at all
    null = cond | {"text_mask": torch.zeros(2, L, dtype=torch.bool)}
    no_text = {k: v for k, v in cond.items() if k not in ("text_embed", "text_mask")}
    out = net(x, c_noise, null)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, net(x, c_noise, no_text), rtol=0, atol=1e-6)


@torch.no_grad()
def test_the_null_label_is_no_label_and_labels_matter():
    net = _randomised(DiT(FULL))
    x, c_noise, cond = _inputs()
    without = {k: v for k, v in cond.items() if k != "class_label"}
    null = net(x, c_noise, cond | {"class_label": torch.tensor([-1, -1])})
    assert torch.equal(null, net(x, c_noise, without))
    assert (net(x, c_noise, cond) - null).abs().amax(dim=(1, 2, 3)).min() > 1e-3
    with pytest.raises(ValueError, match="class labels must lie in 0..9"):
        net(x, c_noise, cond | {"class_label": torch.tensor([10, 0])})
    plain = DiT(DiTConfig(in_channels=3, resolution=8, width=16, depth=1, heads=2))
    with pytest.raises(DifflabError, match="class_label"):  # a network refuses the signals it was not built for
        plain(x, c_noise, {"class_label": torch.tensor([1, 2])})


@torch.no_grad()
def test_image_inputs_and_the_noise_level_reach_the_output():
    net = _randomised(DiT(FULL))
    x, c_noise, cond = _inputs()
    base = net(x, c_noise, cond)
    for name, change in (("low_res", 1.0), ("low_res_noise", 0.5), ("masked_image", 1.0), ("text_pooled", 1.0)):
        assert (net(x, c_noise, cond | {name: cond[name] + change}) - base).abs().max() > 1e-3, name
    assert (net(x, c_noise + 1, cond) - base).abs().max() > 1e-3
    unknown = cond["masked_image"] * (1 - cond["mask"])  # GLIDE: the fill region's content never enters
    torch.testing.assert_close(net(x, c_noise, cond | {"masked_image": cond["masked_image"] + unknown}), base)
    with pytest.raises(DifflabError, match=r"low_res must be a tensor \(B=2, 3, r, r\) with r dividing 8"):
        net(x, c_noise, cond | {"low_res": torch.zeros(2, 3, 3, 3)})


@pytest.mark.parametrize("p", [1, 2, 4])
@torch.no_grad()
def test_patch_sizes_keep_the_shape_and_attention_mixes_the_patches(p):
    net = _randomised(DiT(DiTConfig(in_channels=4, resolution=16, patch_size=p, width=16, depth=2, heads=2)))
    x, c_noise = torch.randn(1, 4, 16, 16), torch.tensor([0.5])
    out = net(x, c_noise)
    assert out.shape == (1, 4, 16, 16)
    moved = x.clone()
    moved[:, :, 15, 15] += 10.0  # a pixel in the last patch changes the first patch's output (through attention)
    assert (net(moved, c_noise) - out)[:, :, :p, :p].abs().max() > 1e-5


def test_patch_sizes_that_do_not_fit_are_refused_in_one_line(tmp_path, capsys):
    with pytest.raises(DifflabError, match="--patch-size 3 must divide the resolution 16"):
        dit_preset("tiny", 16, 3, patch_size=3)
    with pytest.raises(DifflabError, match=r"patch_size is 0, outside difflab's limits 1\.\.16"):
        dit_preset("tiny", 16, 3, patch_size=0)
    with pytest.raises(DifflabError, match="has 65536 tokens, above difflab's limit of 16384"):
        DiT(DiTConfig(resolution=256, patch_size=1, width=8, depth=1, heads=1))
    code, _, err = run_cli(capsys, "train", "--data", "digits", "--model", "dit-tiny", "--patch-size", 3,
                           "--steps", 1, "--out", tmp_path / "x", "--no-progress")  # fmt: skip
    assert_one_line_error(code, err, "--patch-size 3 must divide the resolution 8")
    assert not (tmp_path / "x").exists()


def test_presets_and_how_they_are_named():
    tiny = model_config_for("images", (1, 8, 8), "dit-tiny")
    assert (tiny.backbone, tiny.preset) == ("dit", "tiny")
    s = tiny.settings
    assert (s.width, s.depth, s.heads, s.patch_size, s.in_channels, s.resolution) == (128, 4, 4, 1, 1, 8)
    assert model_config_for("images", (1, 8, 8), "tiny", backbone_name="dit").settings == s
    small = model_config_for("images", (3, 32, 32), "dit-small").settings
    assert (small.width, small.depth, small.heads, small.patch_size) == (256, 6, 4, 2)
    assert model_config_for("images", (4, 64, 64), "dit-tiny").settings.patch_size == 4
    latents = model_config_for("images", (4, 8, 8), "dit-tiny").settings  # an autoencoder's 8x8x4 latents
    assert (latents.in_channels, latents.patch_size) == (4, 1)
    assert model_config_for("images", (4, 32, 32), "dit-tiny", patch_size=1).settings.patch_size == 1
    pfgm = model_config_for("images", (3, 16, 16), "dit-tiny", extra_outputs=1, num_classes=5, context_dim=8)
    assert (pfgm.settings.out_channels, pfgm.settings.num_classes, pfgm.settings.context_dim) == (4, 5, 8)
    assert ModelConfig.from_dict(pfgm.to_dict()) == pfgm
    with pytest.raises(DifflabError, match="--model dit-tiny is a dit preset but --backbone is unet"):
        model_config_for("images", (1, 8, 8), "dit-tiny", backbone_name="unet")
    with pytest.raises(DifflabError, match=r"unknown DiT preset 'base': choose one of tiny, small \(--model dit-tiny"):
        model_config_for("images", (1, 8, 8), "base", backbone_name="dit")
    with pytest.raises(DifflabError, match="backbone 'dit' does not suit points"):
        model_config_for("points", (2,), "dit-tiny")
    with pytest.raises(DifflabError, match=r"model.settings.depth is 65, outside difflab's limits 1\.\.64"):
        ModelConfig("dit", replace(s, depth=65))
    with pytest.raises(DifflabError, match=r"heads \(3\) must divide its width 128"):
        ModelConfig("dit", replace(s, heads=3))


def _closed_form_flops(cfg: DiTConfig, text_tokens: int) -> int:
    """2 x the multiply-adds of every matrix product of a DiT forward pass for one sample."""
    d, n, p = cfg.width, cfg.grid**2, cfg.patch_size
    c_in = cfg.in_channels + (cfg.low_res_channels or 0) + (cfg.inpaint_channels + 1 if cfg.inpaint_channels else 0)
    c_out = (cfg.out_channels or cfg.in_channels) * (2 if cfg.learn_variance else 1)
    embeddings = 256 * d + d * d + (cfg.pooled_dim or 0) * d  # the noise level's MLP, pooled text
    embeddings += 256 * d + d * d if cfg.low_res_channels else 0  # the augmentation level's MLP
    block = 6 * d * d + n * 4 * d * d + 2 * n * n * d + n * 2 * cfg.mlp_ratio * d * d  # adaLN, attention, MLP
    if cfg.context_dim:  # cross-attention: queries, keys and values of the text, QK^T and AV, output
        block += 2 * n * d * d + text_tokens * cfg.context_dim * 2 * d + 2 * n * text_tokens * d
    head = 2 * d * d + n * d * p * p * c_out
    return 2 * (embeddings + n * c_in * p * p * d + cfg.depth * block + head)


def test_the_flop_count_is_the_closed_form_count_of_the_matmuls():
    net = DiT(FULL)
    _, _, cond = _inputs(batch=1)
    counted = forward_flops(net, (3, 8, 8), cond)
    assert counted == pytest.approx(_closed_form_flops(FULL, L), rel=0.01)
    _, _, cond2 = _inputs(batch=2)  # per sample: the same for a batch of 2
    assert forward_flops(net, (3, 8, 8), cond2, batch=2) == counted
    # 256 tokens: attention (QK^T and AV, the fused CPU kernel) is more than half of each block's count
    big = DiTConfig(in_channels=3, resolution=16, patch_size=1, width=32, depth=2, heads=2, num_classes=10)
    counted = forward_flops(DiT(big), (3, 16, 16), {"class_label": torch.tensor([1])})
    assert counted == pytest.approx(_closed_form_flops(big, 0), rel=0.01)


def test_network_cost_of_any_backbone():
    dit = model_config_for("images", (1, 8, 8), "dit-tiny")
    cost = network_cost(dit, (1, 8, 8))
    assert cost.parameters == parameter_count(build_network(dit)) == 1_270_145
    assert cost.gflops == pytest.approx(0.11, rel=0.01)
    unet = network_cost(model_config_for("images", (3, 32, 32), "tiny"), (3, 32, 32))
    patched = network_cost(model_config_for("images", (3, 32, 32), "tiny", patch_size=2), (3, 32, 32))
    assert unet.parameters > 10**6 and 3 < unet.flops / patched.flops < 5  # simple diffusion: about 1/p^2
    mlp = model_config_for("points", (2,), "tiny")
    net = build_network(mlp)
    linears = sum(m.in_features * m.out_features for m in net.modules() if isinstance(m, torch.nn.Linear))
    assert network_cost(mlp, (2,)).flops == 2 * linears  # an MLP is only its linear maps
    # full-size conditioning: a class label, a caption filling the encoder's context
    scratch = _scratch_text()
    text = model_config_for("images", (1, 8, 8), "dit-tiny", num_classes=10, context_dim=scratch.dim,
                            pooled_dim=scratch.pooled_dim)  # fmt: skip
    text = replace(text, text=scratch)
    cond = example_cond(text)
    assert cond["class_label"].tolist() == [0] and cond["text_tokens"].shape == (1, text.text.max_length)
    assert network_cost(text, (1, 8, 8)).flops > cost.flops


def _scratch_text():
    from difflab.text.conditioned import TextConfig

    return TextConfig.from_captions(["a red circle", "a blue square"], width=32, layers=1, heads=2)


@pytest.fixture(scope="module")
def digits():
    return difflab.load_dataset("digits")


@pytest.mark.parametrize("process", ["ddpm", "vp", "ve", "edm", "pfgmpp", "pfgm"])
def test_every_formulation_trains_and_samples_a_dit(process, digits, tmp_path):
    """Class-conditional with guidance (PFGM: its 4 perturbed points take the first 4 rows of the 8 charges' labels)."""
    pfgm = process == "pfgm"
    settings = {"small_batch": 4, "batch_size": 8} if pfgm else {"batch_size": 4}
    config = difflab.run_config(digits, process=process, model="dit-tiny", steps=2, warmup=1, conditional=True,
                                **settings)  # fmt: skip
    assert config.model.settings.out_channels == (2 if pfgm else None)  # PFGM's z component
    run = difflab.train(config, tmp_path / process, data=digits, progress=False)
    pipe = load(run)
    samples = pipe.sample(2, seed=0, steps=2, cond={"class_label": 3}, guidance=2.0)
    assert samples.shape == (2, 1, 8, 8) and torch.isfinite(samples).all()


def test_a_scratch_text_dit_trains_samples_and_is_fine_tuned_into_inpainting(small_shapes, tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--data", "shapes", "--resolution", 16, "--text-encoder", "scratch",
                           "--backbone", "dit", "--model", "tiny", "--process", "edm", "--steps", 2,
                           "--batch-size", 4, "--out", tmp_path / "base", "--no-progress")  # fmt: skip
    assert code == 0, err
    base = load(tmp_path / "base")
    assert base.config.model.backbone == "dit" and base.config.model.settings.context_dim == 128
    assert base.sample(2, prompt="a red circle", steps=2, guidance=2.0).shape == (2, 3, 16, 16)
    # GLIDE's fine-tuning: the masked image and the mask are new input channels of the patch embedding, at zero
    data = difflab.load_dataset("shapes", resolution=16, size=8)
    task = DenoiserTask(difflab.run_config(data, inpainting=True, init_from=tmp_path / "base", steps=1))
    initial_weights(task.module, tmp_path / "base")
    assert task.module.backbone.patch_embed.weight.shape[1] == 3 + 3 + 1
    x, c_noise = torch.randn(2, 3, 16, 16), torch.tensor([0.1, 2.0])
    tokens = base.config.model.text.tokenizer().encode(["a red circle", "a blue square"])
    masks = {"masked_image": torch.randn(2, 3, 16, 16), "mask": torch.rand(2, 1, 16, 16)}
    with torch.no_grad():
        fine_tuned = task.module.eval()(x, c_noise, {"text_tokens": tokens, **masks})
        reference = base.denoiser.net(x, c_noise, {"text_tokens": tokens})
        assert reference.abs().max() > 0  # trained two steps: not the zero output of initialisation
        torch.testing.assert_close(fine_tuned, reference, rtol=0, atol=1e-6)


def test_a_frozen_encoder_dit_trains_and_samples(clip_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path / "cache"))
    shapes = difflab.load_dataset("shapes", resolution=16, size=12)
    config = difflab.run_config(shapes, text_encoder=f"hf:{clip_folder}", model="dit-tiny", steps=2, batch_size=4,
                                warmup=1)  # fmt: skip
    assert (config.model.settings.context_dim, config.model.settings.pooled_dim) == (32, 32)
    assert RunConfig.from_json(config.to_json()) == config
    cond = example_cond(config.model)  # the cost of a caption filling the encoder's 16 tokens
    assert cond["text_embed"].shape == (1, 16, 32) and cond["text_mask"].all() and cond["text_pooled"].shape == (1, 32)
    plain = model_config_for("images", (3, 16, 16), "dit-tiny")
    assert network_cost(config.model, (3, 16, 16)).flops > network_cost(plain, (3, 16, 16)).flops
    with pytest.warns(difflab.text.TextTruncationWarning):
        run = difflab.train(config, tmp_path / "run", data=shapes, progress=False)
    pipe = load(run)
    assert pipe.accepts == frozenset({"text_embed", "text_mask", "text_pooled"})
    assert pipe.sample(2, prompt="a red circle", steps=2, guidance=3.0).shape == (2, 3, 16, 16)


def test_a_dit_upsampler_trains_and_upsamples(small_shapes, tmp_path):
    data = difflab.data.load_dataset("shapes", resolution=16)
    config = difflab.run_config(data, model="dit-tiny", upsample_from=8, steps=2, batch_size=4, warmup=1)
    assert config.model.settings.low_res_channels == 3
    pipe = load(difflab.train(config, tmp_path / "up", data=data, progress=False))
    low = torch.rand(2, 3, 8, 8) * 2 - 1
    assert pipe.sample(2, steps=2, low_res=low).shape == (2, 3, 16, 16)


def test_learn_variance_is_a_second_output_only_on_request():
    net = _randomised(DiT(replace(FULL, learn_variance=False)))
    x, c_noise, cond = _inputs()
    with pytest.raises(DifflabError, match="outputs no variance"):
        net.forward_with_variance(x, c_noise, cond)
    with_variance = DiT(FULL)
    assert with_variance.head.out_features == 2 * net.head.out_features


def test_train_and_info_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = run_cli(capsys, "train", "--data", "digits", "--model", "dit-tiny", "--steps", 3,
                                "--batch-size", 8, "--out", out, "--no-progress")  # fmt: skip
    assert code == 0, err
    assert "trained 3 steps" in stdout
    code, stdout, _ = run_cli(capsys, "info", out)
    assert code == 0
    assert "network       dit 'tiny'" in stdout
    assert "parameters    1,270,145" in stdout and "GFLOPs/sample 0.11" in stdout
    code, stdout, _ = run_cli(capsys, "sample", "--ckpt", out, "--steps", 2, "--n", 2, "--out", tmp_path / "s.npy")
    assert code == 0
    # --resume with the same flags continues the run, the preset spelled either way
    code, stdout, err = run_cli(capsys, "train", "--data", "digits", "--model", "dit-tiny", "--steps", 4,
                                "--out", out, "--resume", "latest", "--no-progress")  # fmt: skip
    assert code == 0, err
    code, stdout, err = run_cli(capsys, "train", "--data", "digits", "--backbone", "dit", "--model", "tiny",
                                "--steps", 5, "--out", out, "--resume", "latest", "--no-progress")  # fmt: skip
    assert code == 0 and "--model" not in err, err
    code, stdout, err = run_cli(capsys, "train", "--data", "digits", "--model", "small", "--steps", 6,
                                "--out", out, "--resume", "latest", "--no-progress")  # fmt: skip
    assert_one_line_error(code, err, "--model small (the run has dit-tiny)")


@pytest.mark.slow
def test_a_dit_trained_on_digits_from_the_command_line_draws_digits(digits_classifier_cache, tmp_path, capsys):
    """`difflab train --data digits --model dit-tiny` (DDPM, eps), 120 steps of batch 32 at lr 2e-3 on 2x2 patches
    (16 tokens: a quarter of the preset's 8x8 cost, so that it trains in ~15 s on one thread), then 200 DDIM samples
    of 20 steps: Frechet distance in the digits classifier's features (floor 32.4 for 200 real digits). Measured with
    seeds 0, 1: trained 313.4, 309.7 (200 steps: 302.2, 274.4); the same network untrained (zero output at
    initialisation) 625.3. The threshold 450 sits between them. (400 steps at lr 1e-3, three times the training
    time, scored 296.5, 297.1, 298.6 with seeds 0, 1, 2; U-Net tiny with that budget: 97.7; transformers learn slower
    here.)"""
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--data", "digits", "--model", "dit-tiny", "--patch-size", 2,
                           "--batch-size", 32, "--steps", 120, "--lr", "2e-3", "--warmup", 50, "--out", out,
                           "--no-progress")  # fmt: skip
    assert code == 0, err
    from difflab.eval.quality import digits_quality
    from difflab.pipeline import Pipeline

    _, classifier = digits_classifier_cache
    trained = load(out)
    untrained = Pipeline(trained.config)
    fd = [digits_quality(p.sample(200, seed=0, sampler="ddim", steps=20), classifier)["frechet"]
          for p in (trained, untrained)]  # fmt: skip
    assert fd[0] < 450 < fd[1], fd
