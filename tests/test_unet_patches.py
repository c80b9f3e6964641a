"""The U-Net on p x p patches (`UNetConfig.patch_size`, `--patch-size`; Hoogeboom et al. 2023, simple diffusion): the
input is pixel-unshuffled before the first convolution and the output pixel-shuffled back, so the levels work at R/p."""

from dataclasses import replace

import pytest
import torch
from conftest import assert_one_line_error, randomised, run_cli

import difflab
import difflab.data
from difflab.errors import DifflabError
from difflab.nets import model_config_for
from difflab.nets.attention import SelfAttention
from difflab.nets.unet import UNet, UNetConfig, unet_preset
from difflab.pipeline import load
from difflab.training.init_from import initial_weights
from difflab.training.tasks import DenoiserTask

TEXT = {"context_dim": 8, "pooled_dim": 8}


def test_a_patched_unet_is_the_plain_unet_on_unshuffled_pixels():
    """F_p(x) = shuffle(F(unshuffle(x))) for the plain U-Net at R/p with C p^2 channels in and out, same weights."""
    patched = UNetConfig(in_channels=3, resolution=16, channels=16, channel_mult=(1, 2), num_res_blocks=1,
                         attention_resolutions=(4,), norm_groups=8, patch_size=2, **TEXT)  # fmt: skip
    plain = replace(patched, in_channels=12, out_channels=12, resolution=8, patch_size=1)
    net_p = randomised(UNet(patched))
    net_1 = UNet(plain).eval()
    net_1.load_state_dict(net_p.state_dict())
    x, c_noise = torch.randn(2, 3, 16, 16), torch.tensor([0.3, -1.0])
    cond = {"text_embed": torch.randn(2, 5, 8), "text_mask": torch.tensor([[1, 1, 0, 0, 0], [1] * 5]),
            "text_pooled": torch.randn(2, 8)}  # fmt: skip
    with torch.no_grad():
        expected = torch.nn.functional.pixel_shuffle(net_1(torch.nn.functional.pixel_unshuffle(x, 2), c_noise, cond), 2)
        torch.testing.assert_close(net_p(x, c_noise, cond), expected, rtol=0, atol=1e-6)
    # and it mixes the pixels of a patch: the output at one pixel depends on its patch neighbours
    x2 = x.clone()
    x2[:, :, 0, 1] += 1.0
    with torch.no_grad():
        assert (net_p(x2, c_noise, cond) - net_p(x, c_noise, cond))[:, :, 0, 0].abs().max() > 1e-4


def test_presets_size_their_levels_from_the_patched_resolution():
    assert unet_preset("tiny", 32, 3).attention_resolutions == (8,)
    assert unet_preset("base", 32, 3).attention_resolutions == (8, 4)  # 32, 16, 8, 4: the two lowest
    config = unet_preset("tiny", 32, 3, patch_size=2)
    assert (config.channel_mult, config.attention_resolutions, config.patch_size) == ((1, 2, 2), (4,), 2)
    assert unet_preset("tiny", 16, 3, patch_size=2).channel_mult == (1, 2)  # 8 -> 4: the lowest map stays >= 4
    settings = model_config_for("images", (3, 32, 32), "tiny", patch_size=2, inpaint_channels=3).settings
    assert (settings.patch_size, settings.inpaint_channels) == (2, 3)


def test_patch_size_errors_are_one_line():
    with pytest.raises(DifflabError, match="--patch-size 3 must divide the resolution 16"):
        unet_preset("tiny", 16, 3, patch_size=3)
    with pytest.raises(DifflabError, match=r"patch_size is 0, outside difflab's limits 1\.\.16"):
        unet_preset("tiny", 16, 3, patch_size=0)
    with pytest.raises(
        DifflabError, match=r"resolution 8 must be divisible by 2 x 2\^3 = 16 for this U-Net \(4 levels, patch size 2\)"
    ):
        UNet(UNetConfig(resolution=8, channel_mult=(1, 2, 2, 2), patch_size=2, attention_resolutions=()))
    with pytest.raises(DifflabError, match="the mlp backbone takes no patch_size"):
        model_config_for("points", (2,), "tiny", patch_size=2)


def test_a_patched_text_model_trains_samples_and_is_fine_tuned_into_inpainting(small_shapes, tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--data", "shapes", "--resolution", 16, "--text-encoder", "scratch",
                           "--patch-size", 2, "--process", "edm", "--steps", 2, "--batch-size", 4,
                           "--out", tmp_path / "base", "--no-progress")  # fmt: skip
    assert code == 0, err
    base = load(tmp_path / "base")
    assert base.config.model.settings.patch_size == 2
    assert base.sample(2, prompt="a red circle", steps=2, guidance=2.0).shape == (2, 3, 16, 16)
    # GLIDE's fine-tuning with patches: the new channels are whole p^2 blocks at the end of conv_in's input
    data = difflab.load_dataset("shapes", resolution=16, size=8)
    task = DenoiserTask(difflab.run_config(data, inpainting=True, init_from=tmp_path / "base", steps=1))
    initial_weights(task.module, tmp_path / "base")
    assert task.module.backbone.conv_in.weight.shape[1] == (3 + 3 + 1) * 4
    x, c_noise = torch.randn(2, 3, 16, 16), torch.tensor([0.1, 2.0])
    tokens = base.config.model.text.tokenizer().encode(["a red circle", "a blue square"])
    masks = {"masked_image": torch.randn(2, 3, 16, 16), "mask": torch.rand(2, 1, 16, 16)}
    with torch.no_grad():
        fine_tuned = task.module.eval()(x, c_noise, {"text_tokens": tokens, **masks})
        torch.testing.assert_close(
            fine_tuned, base.denoiser.net(x, c_noise, {"text_tokens": tokens}), rtol=0, atol=1e-6
        )
    code, _, err = run_cli(capsys, "train", "--data", "shapes", "--resolution", 16, "--patch-size", 3,
                           "--steps", 1, "--out", tmp_path / "x", "--no-progress")  # fmt: skip
    assert_one_line_error(code, err, "--patch-size 3 must divide the resolution 16")
    assert not (tmp_path / "x").exists()


def test_attention_levels_put_text_attention_at_the_lowest_levels(small_shapes, tmp_path, capsys):
    """--attention-levels N: self- and cross-attention at the U-Net's N lowest levels (the benchmark's attn2)."""
    code, _, err = run_cli(capsys, "train", "--data", "shapes", "--resolution", 32, "--patch-size", 2,
                           "--text-encoder", "scratch", "--attention-levels", 2, "--process", "edm", "--steps", 1,
                           "--batch-size", 2, "--out", tmp_path / "attn2", "--no-progress")  # fmt: skip
    assert code == 0, err
    pipe = load(tmp_path / "attn2")
    assert pipe.config.model.settings.attention_resolutions == (8, 4)  # 16 -> 8 -> 4 on 2 x 2 patches
    one = DenoiserTask(difflab.run_config(difflab.load_dataset("shapes", resolution=32), process="edm",
                                          text_encoder="scratch", patch_size=2)).module  # fmt: skip
    count = [sum(isinstance(m, SelfAttention) for m in net.modules()) for net in (one, pipe.denoiser)]
    assert count[1] > count[0] > 0  # the 8x8 level's blocks attend too
    assert pipe.sample(1, prompt="a red circle", steps=2).shape == (1, 3, 32, 32)
    code, _, err = run_cli(capsys, "train", "--data", "shapes", "--resolution", 32, "--patch-size", 2,
                           "--attention-levels", 4, "--steps", 1, "--out", tmp_path / "x", "--no-progress")  # fmt: skip
    assert_one_line_error(code, err, "--attention-levels 4: this U-Net has 3 levels (16x16, 8x8, 4x4); give 1 to 3")
    assert not (tmp_path / "x").exists()
    code, _, err = run_cli(capsys, "train", "--data", "moons", "--attention-levels", 1, "--steps", 1,
                           "--out", tmp_path / "y", "--no-progress")  # fmt: skip
    assert_one_line_error(code, err, "--attention-levels is for the unet backbone; the mlp backbone has no levels")
    code, _, err = run_cli(capsys, "train", "--data", "shapes", "--resolution", 32, "--init-from", tmp_path / "attn2",
                           "--inpainting", "--attention-levels", 1, "--steps", 1, "--out", tmp_path / "z",
                           "--no-progress")  # fmt: skip
    assert_one_line_error(code, err, "--init-from takes the network of the run it starts from: drop --attention-levels")
    assert not (tmp_path / "y").exists() and not (tmp_path / "z").exists()
