"""InceptionV3 exactly as the standard FID protocol uses it, for Frechet Inception Distance on RGB images.

The network is InceptionV3 (Szegedy et al. 2016, "Rethinking the Inception Architecture for Computer
Vision") with the TensorFlow 2015-12-05 ImageNet weights ported to PyTorch, as used by the FID protocol of
Heusel et al. 2017 ("GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium")
and by pytorch-fid. It differs from torchvision's ``Inception3`` in the ways the TF graph does:

- 1008 output classes (``fc`` is 2048 -> 1008) and no auxiliary classifier;
- the average pools inside Mixed_5b/c/d, Mixed_6b..e and Mixed_7b exclude the zero padding
  (``count_include_pad=False``);
- the pool branch of Mixed_7c uses a 3x3 *max* pool (stride 1, padding 1) instead of an average pool;
- every convolution is bias-free and followed by BatchNorm (eps 0.001) and ReLU.

Parameter and buffer names equal those of the standard weights file, so it loads with ``strict=True``.

Weights: difflab never downloads anything. Get the pytorch-fid release asset
``pt_inception-2015-12-05-6726825d.pth`` from https://github.com/mseitzer/pytorch-fid/releases (v0.1.0,
tag ``fid_weights``) and pass its path (e.g. with ``--inception-weights``). The 8 hex digits in its name
are the start of its SHA-256, which ``load_inception`` checks when the file carries that name. The file is
read with ``torch.load(weights_only=True)`` (a restricted unpickler that never runs code); convert it once
to safetensors with ``save_inception_safetensors`` to avoid pickle altogether.

Input convention: pytorch-fid takes images in [0, 1], resizes them to 299x299 (bilinear,
``align_corners=False``) and maps them to [-1, 1]. difflab images are already in [-1, 1], so this module
only clamps them to [-1, 1] and resizes; bilinear resizing commutes with the affine map x -> 2x - 1, so the
network sees exactly what pytorch-fid would feed it for the same images.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from difflab.errors import DifflabError

INCEPTION_SHA256_PREFIX = "6726825d"
STANDARD_WEIGHTS_NAME = f"pt_inception-2015-12-05-{INCEPTION_SHA256_PREFIX}.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{STANDARD_WEIGHTS_NAME}"
INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008
_HINT = f"download the FID Inception weights ({WEIGHTS_URL}) and pass the file with --inception-weights"


class _ConvBN(nn.Module):
    """Bias-free conv -> BatchNorm (eps 0.001) -> ReLU; keys ``conv.weight`` and ``bn.*`` as in the TF port."""

    def __init__(
        self, c_in: int, c_out: int, kernel: int | tuple[int, int], stride: int = 1, padding: int | tuple[int, int] = 0
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, c_in, H, W) -> (N, c_out, H', W')."""
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_no_pad(x: torch.Tensor) -> torch.Tensor:
    """3x3 stride-1 average pool whose border windows average only the real pixels (TF 'SAME' pooling)."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class _BlockA(nn.Module):
    """Mixed_5b/c/d (35x35): 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | avgpool -> 1x1; 224 + pool_features out."""

    def __init__(self, c_in: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = _ConvBN(c_in, 64, 1)
        self.branch5x5_1 = _ConvBN(c_in, 48, 1)
        self.branch5x5_2 = _ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, padding=1)
        self.branch_pool = _ConvBN(c_in, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, c_in, 35, 35) -> (N, 224 + pool_features, 35, 35)."""
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_no_pad(x))
        return torch.cat([self.branch1x1(x), b5, b3, bp], dim=1)


class _BlockB(nn.Module):
    """Mixed_6a (35 -> 17): 3x3/2 | 1x1 -> 3x3 -> 3x3/2 | maxpool 3x3/2; 288 -> 768 channels."""

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.branch3x3 = _ConvBN(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = _ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, c_in, 35, 35) -> (N, 480 + c_in, 17, 17)."""
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], dim=1)


class _BlockC(nn.Module):
    """Mixed_6b..e (17x17): 1x1 | factorised 7x7 | double factorised 7x7 | avgpool -> 1x1; 768 channels out."""

    def __init__(self, c_in: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = _ConvBN(c_in, 192, 1)
        self.branch7x7_1 = _ConvBN(c_in, c7, 1)
        self.branch7x7_2 = _ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = _ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _ConvBN(c_in, c7, 1)
        self.branch7x7dbl_2 = _ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = _ConvBN(c_in, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, c_in, 17, 17) -> (N, 768, 17, 17)."""
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d7 = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d7 = layer(d7)
        bp = self.branch_pool(_avg_pool_no_pad(x))
        return torch.cat([self.branch1x1(x), b7, d7, bp], dim=1)


class _BlockD(nn.Module):
    """Mixed_7a (17 -> 8): 1x1 -> 3x3/2 | 1x1 -> 1x7 -> 7x1 -> 3x3/2 | maxpool 3x3/2; 768 -> 1280 channels."""

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.branch3x3_1 = _ConvBN(c_in, 192, 1)
        self.branch3x3_2 = _ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _ConvBN(c_in, 192, 1)
        self.branch7x7x3_2 = _ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _ConvBN(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, c_in, 17, 17) -> (N, 512 + c_in, 8, 8)."""
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], dim=1)


class _BlockE(nn.Module):
    """Mixed_7b/7c (8x8): 1x1 | 1x1 -> (1x3, 3x1) | 1x1 -> 3x3 -> (1x3, 3x1) | pool -> 1x1; 2048 out.

    ``max_pool=False`` is FID's E_1 (Mixed_7b: average pool without padding); ``max_pool=True`` is FID's E_2
    (Mixed_7c: 3x3 stride-1 max pool, a quirk of the TF graph that FID keeps).
    """

    def __init__(self, c_in: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = _ConvBN(c_in, 320, 1)
        self.branch3x3_1 = _ConvBN(c_in, 384, 1)
        self.branch3x3_2a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _ConvBN(c_in, 448, 1)
        self.branch3x3dbl_2 = _ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _ConvBN(c_in, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, c_in, 8, 8) -> (N, 2048, 8, 8)."""
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], dim=1)
        d3 = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d3 = torch.cat([self.branch3x3dbl_3a(d3), self.branch3x3dbl_3b(d3)], dim=1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg_pool_no_pad(x)
        return torch.cat([self.branch1x1(x), b3, d3, self.branch_pool(pooled)], dim=1)


class FIDInceptionV3(nn.Module):
    """The FID InceptionV3: images (N, 3 or 1, H, W) in [-1, 1] -> pool3 features (N, 2048), logits (N, 1008).

    Freshly constructed it has PyTorch's default random initialisation; use ``load_inception`` for the real
    weights (it also puts the model in eval mode, which matters for BatchNorm).
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = _ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = _ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = _ConvBN(80, 192, 3)
        self.Mixed_5b = _BlockA(192, pool_features=32)
        self.Mixed_5c = _BlockA(256, pool_features=64)
        self.Mixed_5d = _BlockA(288, pool_features=64)
        self.Mixed_6a = _BlockB(288)
        self.Mixed_6b = _BlockC(768, channels_7x7=128)
        self.Mixed_6c = _BlockC(768, channels_7x7=160)
        self.Mixed_6d = _BlockC(768, channels_7x7=160)
        self.Mixed_6e = _BlockC(768, channels_7x7=192)
        self.Mixed_7a = _BlockD(768)
        self.Mixed_7b = _BlockE(1280, max_pool=False)
        self.Mixed_7c = _BlockE(2048, max_pool=True)
        self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N, 3 or 1, H, W) in [-1, 1] -> network input (N, 3, 299, 299): clamp, grey -> RGB, resize.

        The resize is bilinear with ``align_corners=False`` (skipped when already 299x299), as in pytorch-fid.
        """
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise DifflabError(
                f"Inception expects images of shape (N, 3, H, W) or (N, 1, H, W), got {tuple(images.shape)}"
            )
        x = images.to(self.fc.weight.dtype).clamp(-1.0, 1.0)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        return x

    def _trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Network input (N, 3, 299, 299) -> global-average-pooled Mixed_7c output, the pool3 features (N, 2048)."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (N, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (N, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (N, 288, 35, 35)
        x = self.Mixed_6a(x)  # (N, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))  # (N, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (N, 2048, 8, 8)
        return x.mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (N, 3 or 1, H, W) in [-1, 1] -> (pool3 features (N, 2048), logits (N, 1008))."""
        feats = self._trunk(self.prepare(images))
        return feats, self.fc(feats)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The 2048-d pool3 features (N, 2048) that FID compares, of images (N, 3 or 1, H, W) in [-1, 1]."""
        return self._trunk(self.prepare(images))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """The 1008-way ImageNet logits (N, 1008) (e.g. for Inception Score) of images (N, 3 or 1, H, W)."""
        return self(images)[1]


def _sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, or of a ``.pth``/``.pt`` file read by the restricted unpickler."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            state = load_file(str(path), device="cpu")
        elif suffix in (".pth", ".pt"):
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise DifflabError(f"Inception weights {path} must be a .pth, .pt or .safetensors file; {_HINT}")
    except DifflabError:
        raise
    except Exception as exc:  # any reader failure (corrupt file, forbidden pickle global, I/O) is a user error
        reason = " ".join(str(exc).split())[:300]
        raise DifflabError(
            f"cannot read Inception weights {path} ({type(exc).__name__}: {reason}); "
            f"files are read without running pickled code, so use the original state dict or safetensors; {_HINT}"
        ) from exc
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DifflabError(f"Inception weights {path} do not hold a state dict of tensors; {_HINT}")
    return state


def _check_layout(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """The state dict ready for a strict load: layout checked, absent BatchNorm ``num_batches_tracked`` set to 0.

    Files saved before PyTorch 0.4.1 have no ``num_batches_tracked`` buffers; they do not affect eval mode.
    """
    expected = model.state_dict()
    state = dict(state)
    for key in expected:
        if key.endswith(".num_batches_tracked") and key not in state:
            state[key] = torch.zeros((), dtype=torch.long)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shared = [k for k in expected if k in state]
    wrong = [
        f"{k} {tuple(state[k].shape)} (want {tuple(expected[k].shape)})"
        for k in shared
        if state[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
    if wrong:
        problems.append(f"{len(wrong)} wrong shapes (e.g. {', '.join(wrong[:2])})")
    if problems:
        raise DifflabError(
            f"{path} is not the FID InceptionV3 weights (1008 classes, pytorch-fid layout): "
            f"{'; '.join(problems)}; {_HINT}"
        )
    return state


def load_inception(path: str | Path, device: str | torch.device = "cpu") -> FIDInceptionV3:
    """Load the FID InceptionV3 weights from ``.pth``/``.pt`` (restricted unpickler) or ``.safetensors``.

    A file named ``pt_inception-2015-12-05-6726825d.pth`` must have a SHA-256 starting with ``6726825d``.
    Returns the model on ``device`` in eval mode with gradients off. Raises ``DifflabError`` for a missing
    or unreadable file, a checksum mismatch, or keys/shapes that differ from the standard layout.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DifflabError(f"Inception weights file {path} not found; {_HINT}")
    try:
        digest = _sha256(path)
    except OSError as exc:
        raise DifflabError(f"cannot read Inception weights {path} ({exc.strerror}); {_HINT}") from exc
    if path.name == STANDARD_WEIGHTS_NAME and not digest.startswith(INCEPTION_SHA256_PREFIX):
        raise DifflabError(
            f"checksum mismatch for {path}: SHA-256 starts with {digest[:8]}, expected {INCEPTION_SHA256_PREFIX} "
            f"(corrupt or incomplete download?); download it again and {_HINT}"
        )
    model = FIDInceptionV3()
    state = _check_layout(model, _read_state_dict(path), path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        reason = " ".join(str(exc).split())[:300]
        raise DifflabError(f"cannot load Inception weights {path}: {reason}; {_HINT}") from exc
    return model.to(device).eval().requires_grad_(False)


def save_inception_safetensors(model: FIDInceptionV3, path: str | Path) -> Path:
    """Write the model's state dict (all weights and BatchNorm buffers) to a safetensors file; returns the path.

    Convert the pickled ``.pth`` once (``save_inception_safetensors(load_inception(pth), "inception.safetensors")``)
    and load the result with ``load_inception`` from then on.
    """
    path = Path(path).expanduser()
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    try:
        save_file(tensors, str(path), metadata={"format": "pt", "model": "FIDInceptionV3"})
    except OSError as exc:
        raise DifflabError(f"cannot write Inception weights to {path} ({exc.strerror})") from exc
    return path
