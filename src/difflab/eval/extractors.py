"""Feature extractors for sample-quality metrics; the report always names the one used.

- `InceptionFeatures`: the standard FID network (pool3, 2048-d; 1008-way softmax for IS), from a weights file
  the user supplies. The only extractor whose numbers are comparable with published FID/IS.
- `DigitsFeatures`: difflab's digits classifier (64-d penultimate layer; 10-way softmax).
- `RandomCNNFeatures`: a fixed, randomly initialised CNN (seed 0) for a user's image folder when no Inception
  weights are given. Random conv features separate image distributions well enough to rank models trained on
  the same folder, but the numbers are not comparable with published figures or across extractors.
- `PointFeatures`: the raw vectors of low-dimensional data (2-D toys).

The network extractors run in batches and show a tqdm progress bar when there is more than one batch; pass
``progress=False`` to their constructor (or to `make_extractor`) to hide it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm


class FeatureExtractor(Protocol):
    name: str
    comparable: bool  # comparable with published numbers

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, *sample_shape) in [-1, 1] -> (N, d) float32."""
        ...

    def probabilities(self, images: torch.Tensor) -> torch.Tensor | None:
        """(N, *sample_shape) -> class probabilities (N, C), or None if the extractor has no classifier."""
        ...


def _batched(
    fn, x: torch.Tensor, batch_size: int, device: torch.device | str, *, progress: bool = False, desc: str = ""
) -> torch.Tensor:
    """fn over x (N, ...) in batches of batch_size on device -> float32 CPU outputs concatenated along dim 0.

    A tqdm bar (labelled desc) counts the batches when progress is true and there is more than one batch.
    """
    starts = range(0, len(x), batch_size)
    with torch.no_grad():
        bar = tqdm(starts, desc=desc, unit="batch", disable=not progress or len(starts) < 2, dynamic_ncols=True)
        return torch.cat([fn(x[i : i + batch_size].to(device).float()).float().cpu() for i in bar])


class InceptionFeatures:
    """Heusel et al. 2017: pool3 features of the FID InceptionV3; IS uses softmax over its 1008 logits."""

    comparable = True

    def __init__(
        self, weights: str | Path, device: torch.device | str = "cpu", batch_size: int = 64, progress: bool = True
    ):
        from difflab.eval.inception import load_inception

        self.model = load_inception(weights, device=device)
        self.device, self.batch_size, self.progress = device, batch_size, progress
        self.name = "inception-v3-fid (pool3, 2048-d)"

    def _run(self, fn, images: torch.Tensor, desc: str) -> torch.Tensor:
        return _batched(fn, images, self.batch_size, self.device, progress=self.progress, desc=desc)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self._run(lambda x: self.model(x)[0], images, "inception features")

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        return self._run(lambda x: F.softmax(self.model(x)[1], dim=1), images, "inception classes")


class DigitsFeatures:
    """difflab's digits classifier: 64-d penultimate features and 10-way probabilities."""

    comparable = False
    name = "digits-classifier-v1 (64-d penultimate layer)"

    def __init__(self, batch_size: int = 512, progress: bool = True):
        from difflab.eval.digits_classifier import load_digits_classifier

        self.model, self.batch_size, self.progress = load_digits_classifier(), batch_size, progress

    def _run(self, fn, images: torch.Tensor, desc: str) -> torch.Tensor:
        return _batched(fn, images, self.batch_size, "cpu", progress=self.progress, desc=desc)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self._run(self.model.features, images, "digits features")

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        return self._run(lambda x: F.softmax(self.model(x), dim=1), images, "digits classes")


class RandomCNNFeatures:
    """Features of a fixed random CNN (seed 0): resize to 64x64, three stride-2 conv + ReLU layers (He init),
    then the per-channel mean and standard deviation of the last layer: (N, 512)."""

    comparable = False
    name = "random-cnn-v1 (512-d, seed 0; not comparable with published FID)"

    def __init__(self, channels: int, batch_size: int = 256, seed: int = 0, progress: bool = True):
        g = torch.Generator().manual_seed(seed)
        widths = [channels, 64, 128, 256]
        pairs = zip(widths[:-1], widths[1:], strict=True)
        self.layers = nn.ModuleList(nn.Conv2d(a, b, 3, stride=2, padding=1) for a, b in pairs)
        for conv in self.layers:
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu", generator=g)
            nn.init.zeros_(conv.bias)
        self.batch_size, self.progress = batch_size, progress

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.interpolate(x.clamp(-1, 1), size=(64, 64), mode="bilinear", align_corners=False)
        for conv in self.layers:
            h = F.relu(conv(h))
        return torch.cat([h.mean(dim=(2, 3)), h.std(dim=(2, 3))], dim=1)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return _batched(
            self._forward, images, self.batch_size, "cpu", progress=self.progress, desc="random-cnn features"
        )

    def probabilities(self, images: torch.Tensor) -> None:
        return None


class PointFeatures:
    """Low-dimensional data are their own features."""

    comparable = False
    name = "identity (raw points)"

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return images.float().flatten(1)

    def probabilities(self, images: torch.Tensor) -> None:
        return None


def make_extractor(
    kind: str,
    data_name: str,
    channels: int,
    inception_weights: str | Path | None = None,
    device: str = "cpu",
    *,
    progress: bool = True,
) -> FeatureExtractor:
    """InceptionV3 when weights are given; else the digits classifier, raw points, or the random CNN.

    progress: show a progress bar over the batches of feature extraction (when there is more than one).
    """
    if inception_weights is not None:
        return InceptionFeatures(inception_weights, device, progress=progress)
    if kind == "points":
        return PointFeatures()
    if data_name == "digits":
        return DigitsFeatures(progress=progress)
    return RandomCNNFeatures(channels, progress=progress)
