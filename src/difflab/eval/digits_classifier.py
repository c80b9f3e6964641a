"""A small CNN digit classifier whose penultimate features serve as the digits Frechet-distance embedding.

The weights are trained deterministically on the digits train split on first use (a few seconds on a CPU)
and cached as safetensors (never pickle) in ``$DIFFLAB_CACHE`` or ``~/.cache/difflab``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from difflab.data.digits import load_digits_split

CACHE_FILE = "digits_classifier_v1.safetensors"
FEATURE_DIM = 64
_EPOCHS = 40
_BATCH = 64
_NOISE_STD = 0.1


class DigitsClassifier(nn.Module):
    """conv 1->32 -> SiLU -> conv 32->64 -> SiLU -> avgpool 4x4 -> linear 1024->64 (SiLU) -> linear 64->10."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 4 * 4, FEATURE_DIM)
        self.fc2 = nn.Linear(FEATURE_DIM, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, 64) of images x (B, 1, R, R) in [-1, 1]; any R is pooled to 8x8 first."""
        if x.shape[-2:] != (8, 8):
            x = F.adaptive_avg_pool2d(x, (8, 8))
        h = F.silu(self.conv1(x))
        h = F.silu(self.conv2(h))
        h = F.avg_pool2d(h, 2)
        return F.silu(self.fc1(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (B, 10) of images x (B, 1, R, R) in [-1, 1]."""
        return self.fc2(self.features(x))


def default_cache_dir() -> Path:
    """``$DIFFLAB_CACHE`` if set, else ``~/.cache/difflab``."""
    return Path(os.environ.get("DIFFLAB_CACHE") or "~/.cache/difflab").expanduser()


def _blur_half(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Replace a random half of images (B, 1, 8, 8) by their bilinear x2 upsample average-pooled back to 8x8.

    That is what ``features`` sees of digits a model learned at resolution 16, 32 or 64 (x4 and x8 blur the
    same way to within round-off), so the classifier must recognise such slightly blurred digits too.
    """
    up = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    blurred = F.adaptive_avg_pool2d(up, (8, 8))
    chosen = torch.rand(x.shape[0], generator=generator) < 0.5
    return torch.where(chosen[:, None, None, None], blurred, x)


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blur half of images (B, 1, 8, 8), shift each by -1..1 pixels per axis (background fill), add noise."""
    padded = F.pad(_blur_half(x, generator), (1, 1, 1, 1), value=-1.0)
    shifts = torch.randint(0, 3, (x.shape[0], 2), generator=generator)
    rows = shifts[:, 0, None] + torch.arange(8)  # (B, 8)
    cols = shifts[:, 1, None] + torch.arange(8)
    batch = torch.arange(x.shape[0])[:, None, None]
    shifted = padded[:, 0][batch, rows[:, :, None], cols[:, None, :]].unsqueeze(1)
    return shifted + _NOISE_STD * torch.randn(shifted.shape, generator=generator)


def train_digits_classifier(epochs: int = _EPOCHS) -> DigitsClassifier:
    """Train deterministically (seed 0) on the digits train split: Adam (lr 1e-3), blur/shift/noise augment.

    Runs on one CPU thread (restored afterwards): the model is tiny, one thread is as fast as two on an idle
    machine, far faster on a busy one, and makes the weights independent of the machine's core count.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(epochs)
    finally:
        torch.set_num_threads(threads)


def _seeded_model() -> DigitsClassifier:
    """A freshly initialised model (seed 0) built without touching the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(0)  # CPU generator only, restored when the fork ends
        return DigitsClassifier()


def _train(epochs: int) -> DigitsClassifier:
    images, labels = load_digits_split("train")
    model = _seeded_model()
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(images.shape[0], generator=generator)
        for start in range(0, images.shape[0], _BATCH):
            index = order[start : start + _BATCH]
            loss = F.cross_entropy(model(_augment(images[index], generator)), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()


def _load_cached(path: Path) -> DigitsClassifier | None:
    """The cached model, or None if the file is missing or unreadable (corrupt, wrong keys or shapes)."""
    if not path.is_file():
        return None
    model = _seeded_model()
    try:
        model.load_state_dict(load_file(str(path)), strict=True)
    except Exception:  # any broken cache (corrupt file, wrong keys or shapes) is retrained and replaced
        return None
    return model.eval()


def _save_atomic(model: DigitsClassifier, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(handle)
    try:
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, tmp_name)
        os.replace(tmp_name, path)
    finally:
        if os.path.exists(tmp_name):
            os.remove(tmp_name)


def load_digits_classifier(cache_dir: str | Path | None = None) -> DigitsClassifier:
    """The digits classifier (eval mode, CPU), read from the cache or trained (and cached) if absent."""
    path = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / CACHE_FILE
    model = _load_cached(path)
    if model is None:
        model = train_digits_classifier()
        _save_atomic(model, path)
    return model


@torch.no_grad()
def classify(model: DigitsClassifier, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Softmax class probabilities (N, 10) of images (N, 1, R, R) in [-1, 1]."""
    model.eval()
    chunks = [F.softmax(model(images[i : i + batch_size].float()), dim=1) for i in range(0, len(images), batch_size)]
    return torch.cat(chunks) if chunks else torch.zeros(0, 10)


@torch.no_grad()
def extract_features(model: DigitsClassifier, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Penultimate features (N, 64) of images (N, 1, R, R) in [-1, 1]."""
    model.eval()
    chunks = [model.features(images[i : i + batch_size].float()) for i in range(0, len(images), batch_size)]
    return torch.cat(chunks) if chunks else torch.zeros(0, FEATURE_DIM)
