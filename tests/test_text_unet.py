"""The text-conditioned U-Net (GLIDE, Nichol et al. 2022, Sec. 3.1): token embeddings join the keys and values of
every attention layer with padding masked out, the pooled embedding joins the noise-level embedding. Exact checks of
the masking (padding content and token order do not matter), the null caption, backward compatibility of text-free
configs, and a tiny network that can only tell two prompts apart through its cross-attention learning to."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import pytest
import torch

from difflab.conditioning import NULL_VALUES, check_cond, null_cond
from difflab.errors import DifflabError
from difflab.nets import ModelConfig, model_config_for
from difflab.nets.attention import SelfAttention
from difflab.nets.unet import UNet, UNetConfig, unet_preset

D, P, L = 8, 6, 5
# channels 16, levels (8, 4), one block per level, attention at 4x4 (down 1, up 2, middle 1), 8 groups, 2 heads
TEXT = UNetConfig(1, 8, 16, (1, 2), 1, (4,), 0.0, 8, 2, context_dim=D, pooled_dim=P)


def _randomise(net: torch.nn.Module) -> torch.nn.Module:
    """The residual branches, attention outputs and the last conv start at zero; give them weights, as training
    would, so that every path (the text one included) reaches the output."""
    for m in net.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and not m.weight.any():
            torch.nn.init.normal_(m.weight, std=0.1)
    return net


def _net(config: UNetConfig = TEXT, dtype: torch.dtype = torch.float32) -> UNet:
    torch.manual_seed(0)
    return _randomise(UNet(config)).to(dtype).eval()


def _inputs(dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 8, 8, generator=g, dtype=dtype)
    cond = {
        "text_embed": torch.randn(2, L, D, generator=g, dtype=dtype),
        "text_mask": torch.tensor([[1, 1, 0, 1, 0], [1, 0, 0, 0, 0]], dtype=torch.bool),
        "text_pooled": torch.randn(2, P, generator=g, dtype=dtype),
    }
    return x, torch.tensor([5.0, 600.0], dtype=dtype), cond


def _with(cond: dict, **changes) -> dict:
    return {**cond, **changes}


@torch.no_grad()
def test_text_unet_shapes_signals_and_projections():
    net = _net()
    x, c, cond = _inputs()
    assert net(x, c, cond).shape == x.shape
    assert net.accepts == frozenset({"text_embed", "text_mask", "text_pooled"})
    attns = [m for m in net.modules() if isinstance(m, SelfAttention)]
    assert len(attns) == 4  # down (1 block), up (2 blocks), middle
    for a in attns:  # one Linear D -> 2C (keys and values) per attention layer, C its own width (32 at 4x4)
        assert a.context_kv.weight.shape == (2 * 32, D)
    assert net.pooled_embed.proj.weight.shape == (4 * 16, P)
    with torch.autocast("cpu", torch.bfloat16):
        assert bool(net(x, c, cond).isfinite().all())
    labelled = UNet(replace(TEXT, num_classes=3))
    assert labelled.accepts == frozenset({"class_label", "text_embed", "text_mask", "text_pooled"})
    assert labelled(x, c, _with(cond, class_label=torch.tensor([2, -1]))).shape == x.shape


# the current code's state_dict names and outputs, recorded before text conditioning was added
_TINY_NAMES = (128, "f665e0122e0b3d1862691132073d684123d746b4ab189ed505fb72cf3b75a1e9")
_LABELLED_NAMES = (245, "0fcd2af38e4b96c016f3ec70b9113b6720b7046c16553d88eb64297e4a5734d2")
_TINY_OUT = (-14.008598327636719, [-0.012460267171263695, 0.0005090544582344592, -0.07593066245317459])


def _names_digest(net: torch.nn.Module) -> tuple[int, str]:
    names = [f"{k}:{tuple(v.shape)}" for k, v in net.state_dict().items()]
    return len(names), hashlib.sha256("\n".join(names).encode()).hexdigest()


@torch.no_grad()
def test_configs_without_text_build_the_networks_they_built_before():
    tiny = unet_preset("tiny", 8, 1)
    assert tiny.context_dim is None and tiny.pooled_dim is None
    assert _names_digest(UNet(replace(unet_preset("small", 16, 3), num_classes=4))) == _LABELLED_NAMES
    torch.manual_seed(0)
    net = UNet(tiny)
    assert _names_digest(net) == _TINY_NAMES
    assert not any("context" in n or "pooled" in n for n, _ in net.named_parameters())
    for m in net.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and not m.weight.any():
            torch.nn.init.normal_(m.weight, std=0.05)
    out = net(torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([3.0, 700.0]))
    assert out.sum().item() == pytest.approx(_TINY_OUT[0], abs=1e-4)
    torch.testing.assert_close(out[0, 0, 0, :3].tolist(), _TINY_OUT[1], atol=1e-6, rtol=0)
    # a config.json written before these fields existed reads back with them unset
    old = model_config_for("images", (1, 8, 8)).to_dict()
    del old["settings"]["context_dim"], old["settings"]["pooled_dim"]
    assert ModelConfig.from_dict(old).settings == tiny


@torch.no_grad()
def test_padding_tokens_do_not_matter_and_real_tokens_do():
    net = _net()
    x, c, cond = _inputs()
    ref = net(x, c, cond)
    garbage = cond["text_embed"].clone()
    garbage[~cond["text_mask"]] = 100 * torch.randn(int((~cond["text_mask"]).sum()), D)
    assert torch.equal(net(x, c, _with(cond, text_embed=garbage)), ref)  # exact: masked out of the softmax
    assert torch.equal(net(x, c, _with(cond, text_mask=cond["text_mask"].long())), ref)  # 0/1 = False/True
    assert torch.equal(net(x, c, _with(cond, text_mask=cond["text_mask"].float())), ref)
    for row, pos in ((0, 3), (1, 0)):  # a real token of each prompt
        moved = cond["text_embed"].clone()
        moved[row, pos] = torch.randn(D)
        diff = (net(x, c, _with(cond, text_embed=moved)) - ref).abs().flatten(1).amax(1)
        assert diff[row] > 1e-3 and diff[1 - row] == 0  # only that prompt's image changes


@torch.no_grad()
def test_tokens_are_a_set_reordering_them_with_their_mask_changes_nothing():
    net = _net(dtype=torch.float64)  # float64: the only difference left is the summation order (~1e-16)
    x, c, cond = _inputs(torch.float64)
    ref = net(x, c, cond)
    order = torch.tensor([4, 3, 0, 2, 1])
    permuted = _with(cond, text_embed=cond["text_embed"][:, order], text_mask=cond["text_mask"][:, order])
    torch.testing.assert_close(net(x, c, permuted), ref, atol=1e-12, rtol=0)
    # the mask must travel with its tokens: moving the tokens alone changes which ones are real
    moved_alone = _with(cond, text_embed=cond["text_embed"][:, order])
    assert (net(x, c, moved_alone) - ref).abs().max() > 1e-3


@torch.no_grad()
def test_the_null_caption_is_finite_and_equals_no_text_at_all():
    net = _net()
    x, c, cond = _inputs()
    null = null_cond(cond)
    assert not null["text_mask"].any() and not null["text_embed"].any() and not null["text_pooled"].any()
    assert NULL_VALUES["text_embed"] == 0.0 and NULL_VALUES["text_mask"] == 0
    out = net(x, c, null)
    assert bool(out.isfinite().all())
    # fully padded keys leave the image tokens' own attention: the same as a batch without text signals
    torch.testing.assert_close(net(x, c, None), out, atol=1e-6, rtol=0)
    torch.testing.assert_close(net(x, c, {"text_pooled": null["text_pooled"]}), out, atol=1e-6, rtol=0)
    garbage = _with(null, text_embed=torch.randn(2, 3, D) * 1e4, text_mask=torch.zeros(2, 3))
    torch.testing.assert_close(net(x, c, garbage), out, atol=1e-6, rtol=0)
    assert (net(x, c, cond) - out).abs().max() > 1e-3


@torch.no_grad()
def test_the_pooled_embedding_changes_the_output():
    net = _net()
    x, c, cond = _inputs()
    ref = net(x, c, cond)
    other = _with(cond, text_pooled=cond["text_pooled"].flip(0))
    assert ((net(x, c, other) - ref).abs().flatten(1).amax(1) > 1e-3).all()


def test_gradients_reach_the_text_projections():
    net = _net().train()
    x, c, cond = _inputs()
    net(x, c, cond).square().mean().backward()
    text_params = {n: p for n, p in net.named_parameters() if "context" in n or "pooled" in n}
    assert len(text_params) == 2 + 2 + 4 * 2  # pooled Linear, LayerNorm, four context_kv Linears
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in text_params.values()), [
        n for n, p in text_params.items() if p.grad is None or not p.grad.any()
    ]


def test_a_tiny_text_unet_learns_two_prompts_through_cross_attention():
    """Two prompts, two constant targets (+0.5 and -0.5). A text-blind network can do no better than their mean
    (loss 0.25); no pooled embedding, so only the cross-attention can tell the prompts apart."""
    config = UNetConfig(1, 8, 16, (1, 2), 1, (4,), 0.0, 8, 2, context_dim=D)
    torch.manual_seed(0)
    net = UNet(config)
    kv_before = net.mid_attn.context_kv.weight.detach().clone()
    g = torch.Generator().manual_seed(2)
    prompts = torch.randn(2, L, D, generator=g)
    masks = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 1, 0, 0]], dtype=torch.bool)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(120):
        which = torch.randint(0, 2, (8,), generator=g)
        embed = prompts[which] + torch.randn(8, L, D, generator=g) * (~masks[which])[..., None]  # noisy padding
        target = (0.5 - which.float())[:, None, None, None].expand(8, 1, 8, 8)
        x, c = torch.randn(8, 1, 8, 8, generator=g), torch.rand(8, generator=g) * 1000
        loss = (net(x, c, {"text_embed": embed, "text_mask": masks[which]}) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        which = torch.arange(64) % 2
        x, c = torch.randn(64, 1, 8, 8, generator=g), torch.rand(64, generator=g) * 1000
        out = net(x, c, {"text_embed": prompts[which], "text_mask": masks[which]})
        loss = (out - (0.5 - which.float())[:, None, None, None]).square().mean().item()
    assert loss < 0.1 * 0.25, loss
    assert not torch.equal(net.mid_attn.context_kv.weight, kv_before)


def test_text_signals_are_refused_where_they_do_not_belong():
    x, c, cond = _inputs()
    plain = UNet(unet_preset("tiny", 8, 1))
    refusal = "this model was not trained on text_embed, text_mask, text_pooled; it takes no conditioning"
    with pytest.raises(DifflabError, match=refusal):
        plain(x, c, cond)
    with pytest.raises(DifflabError, match="not trained on text_embed, text_mask, text_pooled; it takes class_label$"):
        check_cond(cond, UNet(replace(unet_preset("tiny", 8, 1), num_classes=3)).accepts)
    no_pooled = UNet(replace(TEXT, pooled_dim=None))
    with pytest.raises(DifflabError, match="not trained on text_pooled; it takes text_embed, text_mask$"):
        no_pooled(x, c, cond)
    net = UNet(TEXT)
    errors = {
        "text_embed and text_mask come together": {"text_embed": cond["text_embed"]},
        r"text_embed must be a float tensor of shape \(2, tokens, 8\), got torch.float32 \(2, 5, 7\)": _with(
            cond, text_embed=torch.zeros(2, L, 7)
        ),
        r"text_mask must have shape \(2, 5\)": _with(cond, text_mask=torch.ones(2, 4, dtype=torch.bool)),
        "text_mask must hold only True/False or 1/0": _with(cond, text_mask=torch.full((2, L), 2)),
        r"text_pooled must be a float tensor of shape \(2, 6\)": _with(cond, text_pooled=torch.zeros(2, 3)),
    }
    for message, bad in errors.items():
        with pytest.raises(DifflabError, match=message) as info:
            net(x, c, bad)
        assert "\n" not in str(info.value)


def test_presets_take_text_sizes_within_the_limits():
    model = model_config_for("images", (3, 16, 16), "tiny", context_dim=32, pooled_dim=24)
    assert (model.settings.context_dim, model.settings.pooled_dim) == (32, 24)
    assert replace(model.settings, context_dim=None, pooled_dim=None) == unet_preset("tiny", 16, 3)
    assert ModelConfig.from_dict(model.to_dict()) == model
    with pytest.raises(DifflabError, match="context_dim is 5000, outside difflab's limits 1..4096"):
        ModelConfig("unet", replace(model.settings, context_dim=5000))
    with pytest.raises(
        DifflabError, match=r"the mlp backbone takes no context_dim \(text conditioning.*use the unet backbone"
    ):
        model_config_for("points", (2,), context_dim=8)
