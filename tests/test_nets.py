import math

import pytest
import torch

from difflab.errors import DifflabError
from difflab.nets.embeddings import sinusoidal_embedding
from difflab.nets.mlp import MLP, MLPConfig
from difflab.nets.unet import SelfAttention, UNet, UNetConfig, unet_preset


def test_sinusoidal_embedding_matches_its_formula_for_fractional_t():
    t = torch.tensor([0.0, 2.5, 999.0])
    emb = sinusoidal_embedding(t, 8)
    for i, ti in enumerate(t.tolist()):
        for k in range(4):
            f = 10000 ** (-k / 4)
            assert emb[i, k].item() == pytest.approx(math.cos(ti * f), abs=1e-5)
            assert emb[i, 4 + k].item() == pytest.approx(math.sin(ti * f), abs=1e-5)


def _randomise_output(net: torch.nn.Module) -> torch.nn.Module:
    """Residual branches and the output start at zero; give them weights, as training would."""
    for m in net.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and not m.weight.any():
            torch.nn.init.normal_(m.weight, std=0.05)
    return net


@pytest.mark.parametrize("preset,resolution,channels", [("tiny", 8, 1), ("tiny", 32, 3), ("small", 16, 1)])
def test_unet_presets_keep_the_shape_and_use_the_noise_level(preset, resolution, channels):
    torch.manual_seed(0)
    cfg = unet_preset(preset, resolution, channels)
    net = _randomise_output(UNet(cfg)).eval()
    x = torch.randn(2, channels, resolution, resolution)
    with torch.no_grad():
        a, b = net(x, torch.tensor([10.0, 10.0])), net(x, torch.tensor([900.0, 900.0]))
    assert a.shape == x.shape and not torch.allclose(a, b)
    n_attn = sum(isinstance(m, SelfAttention) for m in net.modules())
    # attention after every block at the lowest resolution (down: n blocks, up: n + 1) plus the middle one
    assert n_attn == cfg.num_res_blocks + (cfg.num_res_blocks + 1) + 1


def test_unet_configuration_errors():
    with pytest.raises(DifflabError, match="divisible by 2"):
        UNet(UNetConfig(1, 12, 16, (1, 2, 2, 2), 1, (), 0.0, 8))
    with pytest.raises(DifflabError, match="choose one of tiny, small, base"):
        unet_preset("huge", 32, 3)
    unconditional = UNet(unet_preset("tiny", 8, 1))
    assert unconditional.accepts == frozenset()
    refusal = "this model was not trained on class_label; it takes no conditioning"
    with pytest.raises(DifflabError, match=refusal):
        unconditional(torch.zeros(1, 1, 8, 8), torch.zeros(1), cond=torch.tensor([3]))
    with pytest.raises(DifflabError, match=refusal):
        unconditional(torch.zeros(1, 1, 8, 8), torch.zeros(1), cond={"class_label": torch.tensor([3])})


def test_mlp_maps_points_and_depends_on_the_noise_level():
    torch.manual_seed(0)
    net = MLP(MLPConfig(data_dim=3, hidden=32, num_blocks=2)).eval()
    x = torch.randn(5, 3)
    out_a, out_b = net(x, torch.full((5,), 1.0)), net(x, torch.full((5,), 500.0))
    assert out_a.shape == (5, 3) and not torch.allclose(out_a, out_b)
