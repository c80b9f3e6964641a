"""FID InceptionV3: shapes, the pytorch-fid layout and pooling quirks, weight loading and its failure modes.

No real weights are available offline, so the tests use randomly initialised models saved in the standard layout.
"""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from difflab.errors import DifflabError
from difflab.eval.inception import (
    INCEPTION_SHA256_PREFIX,
    FIDInceptionV3,
    load_inception,
    save_inception_safetensors,
)


def _random_model(seed: int) -> FIDInceptionV3:
    """A model in eval mode with variance-preserving conv weights and non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    model = FIDInceptionV3()
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.8, 1.2)
            module.weight.data.uniform_(0.9, 1.1)
            module.bias.data.uniform_(-0.1, 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def model() -> FIDInceptionV3:
    return _random_model(0)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1


@pytest.fixture(scope="module")
def outputs(model, images) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, logits) of the fixture images, computed once (a forward pass costs ~0.1 s per image)."""
    with torch.no_grad():
        return model(images)


def test_output_shapes_and_grey_input(model, images, outputs):
    feats, logits = outputs
    assert feats.shape == (2, 2048) and logits.shape == (2, 1008)
    assert torch.isfinite(feats).all() and torch.isfinite(logits).all()
    assert feats.std() > 1e-3  # a non-degenerate random network, so the comparisons below mean something
    one = images[:1]
    with torch.no_grad():
        torch.testing.assert_close(model.features(one), feats[:1])
        torch.testing.assert_close(model.logits(one), logits[:1])
        grey_feats, grey_logits = model(one[:, :1])
        assert grey_feats.shape == (1, 2048) and grey_logits.shape == (1, 1008)
        torch.testing.assert_close(grey_feats, model.features(one[:, :1].repeat(1, 3, 1, 1)))
    with pytest.raises(DifflabError, match="shape"):
        model(torch.zeros(2, 2, 32, 32))


def test_input_convention_matches_pytorch_fid(model, images, outputs):
    """difflab [-1, 1] input == pytorch-fid's pipeline on the same images in [0, 1]: resize 299 bilinear, 2x - 1."""
    zero_one = (images + 1) / 2
    fid_input = 2 * F.interpolate(zero_one, size=(299, 299), mode="bilinear", align_corners=False) - 1
    with torch.no_grad():
        torch.testing.assert_close(model.features(fid_input), outputs[0], rtol=1e-4, atol=1e-5)
        out_of_range = images[:1] * 1.5
        torch.testing.assert_close(model.features(out_of_range), model.features(out_of_range.clamp(-1, 1)))


# (key, shape) read off torchvision's Inception3/InceptionA..E/BasicConv2d and pytorch-fid's fid_inception_v3
# (num_classes=1008, aux_logits=False, Mixed_5b..7c replaced by FIDInceptionA/C/E_1/E_2 of the same shapes).
_EXPECTED_KEYS = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_1a_3x3.bn.running_mean": (32,),
    "Conv2d_2a_3x3.conv.weight": (32, 32, 3, 3),
    "Conv2d_2b_3x3.conv.weight": (64, 32, 3, 3),
    "Conv2d_3b_1x1.conv.weight": (80, 64, 1, 1),
    "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
    "Conv2d_4a_3x3.bn.num_batches_tracked": (),
    "Mixed_5b.branch1x1.conv.weight": (64, 192, 1, 1),
    "Mixed_5b.branch5x5_2.conv.weight": (64, 48, 5, 5),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_5c.branch_pool.conv.weight": (64, 256, 1, 1),
    "Mixed_5d.branch3x3dbl_3.bn.weight": (96,),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6a.branch3x3dbl_3.conv.weight": (96, 96, 3, 3),
    "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
    "Mixed_6c.branch7x7dbl_2.conv.weight": (160, 160, 7, 1),
    "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
    "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
    "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
    "Mixed_7b.branch1x1.conv.weight": (320, 1280, 1, 1),
    "Mixed_7b.branch3x3_2a.conv.weight": (384, 384, 1, 3),
    "Mixed_7b.branch3x3dbl_1.conv.weight": (448, 1280, 1, 1),
    "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
    "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
    "Mixed_7c.branch_pool.bn.running_var": (192,),
    "fc.weight": (1008, 2048),
    "fc.bias": (1008,),
}


def test_state_dict_matches_the_standard_layout(model):
    state = model.state_dict()
    for key, shape in _EXPECTED_KEYS.items():
        assert tuple(state[key].shape) == shape, key
    assert not any(k.startswith("AuxLogits") for k in state)
    # 94 conv+BN units (stem 5, 3 x A 7, B 4, 4 x C 10, D 6, 2 x E 9), 6 entries each, plus fc weight and bias
    assert sum(k.endswith(".conv.weight") for k in state) == 94
    assert len(state) == 94 * 6 + 2
    assert not any(k.endswith(".bias") and ".conv." in k for k in state)  # bias-free convs
    assert all(m.eps == 0.001 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    # torchvision's inception_v3 (1000 classes, with AuxLogits) has 27,161,264 parameters; drop AuxLogits
    # (conv0 768->128 1x1 + BN, conv1 128->768 5x5 + BN, fc 768->1000) and widen fc from 1000 to 1008 classes.
    aux = (128 * 768 + 2 * 128) + (768 * 128 * 25 + 2 * 768) + (768 * 1000 + 1000)
    assert sum(p.numel() for p in model.parameters()) == 27_161_264 - aux + 8 * (2048 + 1) == 23_850_960


def test_pooling_quirks_of_the_fid_blocks(model, images):
    """A/C/E_1 average-pool without counting the padding; E_2 (Mixed_7c) max-pools its pool branch."""
    captured: dict[str, torch.Tensor] = {}
    names = ["Mixed_5b", "Mixed_6b", "Mixed_7b", "Mixed_7c"]
    handles = []
    for name in names:
        block = getattr(model, name)
        handles.append(block.register_forward_pre_hook(lambda m, a, n=name: captured.__setitem__(n, a[0])))
        handles.append(
            block.branch_pool.register_forward_pre_hook(lambda m, a, n=name: captured.__setitem__(n + ".pool", a[0]))
        )
    with torch.no_grad():
        model(images[:1])
    for handle in handles:
        handle.remove()
    for name in names[:3]:
        x, pooled = captured[name], captured[name + ".pool"]
        torch.testing.assert_close(pooled, F.avg_pool2d(x, 3, 1, 1, count_include_pad=False))
        assert not torch.allclose(pooled, F.avg_pool2d(x, 3, 1, 1, count_include_pad=True))
    x, pooled = captured["Mixed_7c"], captured["Mixed_7c.pool"]
    torch.testing.assert_close(pooled, F.max_pool2d(x, 3, 1, 1))


def _same_outputs(outputs: tuple[torch.Tensor, torch.Tensor], loaded: FIDInceptionV3, images: torch.Tensor) -> None:
    with torch.no_grad():
        for expected, got in zip(outputs, loaded(images), strict=True):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_pth_round_trip_reproduces_outputs(model, images, outputs, tmp_path):
    path = tmp_path / "inception.pth"
    torch.save(model.state_dict(), path)
    loaded = load_inception(path)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    _same_outputs(outputs, loaded, images)
    # files saved before PyTorch 0.4.1 have no num_batches_tracked buffers: still a valid standard file
    legacy = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(legacy, tmp_path / "legacy.pt")
    reloaded = load_inception(str(tmp_path / "legacy.pt")).state_dict()
    assert reloaded.keys() == model.state_dict().keys()
    assert all(torch.equal(reloaded[k], v) for k, v in legacy.items())


def test_safetensors_round_trip(model, images, outputs, tmp_path):
    path = save_inception_safetensors(model, tmp_path / "inception.safetensors")
    _same_outputs(outputs, load_inception(path), images)


def test_standard_name_with_wrong_content_fails_the_checksum(model, tmp_path):
    path = tmp_path / f"pt_inception-2015-12-05-{INCEPTION_SHA256_PREFIX}.pth"
    torch.save(model.state_dict(), path)
    with pytest.raises(DifflabError, match="checksum mismatch") as info:
        load_inception(path)
    assert "--inception-weights" in str(info.value) and "\n" not in str(info.value)


class _Payload:
    """Unpickling this creates a marker file: stands in for arbitrary code in a malicious checkpoint."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused_without_running_code(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    payload = {"fc.weight": torch.zeros(1), "x": _Payload(str(marker))}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with path.open("wb") as f:
            pickle.dump(payload, f, protocol=2)
    with pytest.raises(DifflabError, match="cannot read Inception weights") as info:
        load_inception(path)
    assert not marker.exists()
    assert "--inception-weights" in str(info.value) and "\n" not in str(info.value)
    # the payload is live: an ordinary unpickler would have run it
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Payload(str(control)))).close()
    assert control.exists()


def test_missing_file_and_wrong_layout_raise_useful_errors(model, tmp_path):
    with pytest.raises(DifflabError, match="not found.*--inception-weights"):
        load_inception(tmp_path / "nope.pth")
    state = dict(model.state_dict())
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)  # torchvision's 1000 classes
    torch.save(state, tmp_path / "wrong.pth")
    with pytest.raises(DifflabError, match=r"wrong shapes.*fc\.weight \(1000, 2048\).*--inception-weights"):
        load_inception(tmp_path / "wrong.pth")
    state = dict(model.state_dict())
    state["AuxLogits.fc.weight"] = torch.zeros(1008, 768)
    del state["Mixed_7c.branch_pool.conv.weight"]
    torch.save(state, tmp_path / "aux.pth")
    with pytest.raises(
        DifflabError, match="missing keys.*Mixed_7c.branch_pool.conv.weight.*unexpected keys.*AuxLogits"
    ):
        load_inception(tmp_path / "aux.pth")
    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DifflabError, match="cannot read Inception weights"):
        load_inception(tmp_path / "garbage.safetensors")
    (tmp_path / "weights.npz").write_bytes(b"x")
    with pytest.raises(DifflabError, match=r"\.safetensors"):
        load_inception(tmp_path / "weights.npz")
