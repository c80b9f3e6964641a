"""DeepCache (Ma et al. 2024, Sec. 3.2): the U-Net's deep features change slowly between adjacent denoising steps,
so a full evaluation every K network calls caches the feature map that enters the last (highest-resolution) up level,
and the K - 1 calls in between recompute only the shallow path (conv_in, the first down level, the last up level)
on it. K = 1 recomputes everything: exactly the plain network.

A call recomputes everything when its turn comes (every K-th call since the last full one), when the batch changes
shape (a last, smaller batch; classifier-free guidance switched on or off by its interval) and when the noise level
goes up (a new trajectory: the next batch of seeds, a restart). `with deep_cache(net, K):` installs the cache for
the duration of a sampling run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from difflab.errors import DifflabError


@dataclass
class FeatureCache:
    """The cached deep features of one trajectory and the counts of full and shallow calls."""

    interval: int
    features: torch.Tensor | None = None
    last_noise: torch.Tensor | None = None
    since_full: int = 0
    counts: dict[str, int] = field(default_factory=lambda: {"full": 0, "shallow": 0})

    def reusable(self, c_noise: torch.Tensor, batch_shape: torch.Size) -> bool:
        """Whether this call may take the cached deep features (counts it either way)."""
        new_trajectory = self.last_noise is not None and bool((c_noise > self.last_noise).any())
        fresh = (self.features is None or self.last_noise.shape != c_noise.shape or new_trajectory
                 or self.features.shape[0] != batch_shape[0] or self.since_full + 1 >= self.interval)  # fmt: skip
        self.last_noise = c_noise.detach().clone()
        if fresh:
            self.counts["full"] += 1
            return False
        self.since_full += 1
        self.counts["shallow"] += 1
        return True

    def keep(self, features: torch.Tensor) -> None:
        """The deep features of a full call, for the next K - 1 calls."""
        self.features, self.since_full = features.detach(), 0


def check_interval(interval: int | None) -> None:
    if interval is not None and (isinstance(interval, bool) or not isinstance(interval, int) or interval < 1):
        raise DifflabError(f"--cache-interval must be an integer >= 1 (1 = no reuse), got {interval!r}")


@contextlib.contextmanager
def deep_cache(net: torch.nn.Module, interval: int | None) -> Iterator[FeatureCache | None]:
    """Within: `net` (a difflab U-Net) reuses its deep features for interval - 1 calls of every interval; yields the
    cache (its `counts`), None when interval is None."""
    check_interval(interval)
    if interval is None:
        yield None
        return
    if not hasattr(net, "feature_cache"):
        raise DifflabError(f"--cache-interval (DeepCache) needs a U-Net; this model's network is a "
                           f"{type(net).__name__}")  # fmt: skip
    net.feature_cache = cache = FeatureCache(interval)
    try:
        yield cache
    finally:
        net.feature_cache = None


def with_deep_cache(batches: Iterator, denoiser, interval: int | None, stats: dict | None) -> Iterator:
    """A sampling run's batches drawn with DeepCache on the denoiser's U-Net (`interval` None: as they are); the
    counts of full and shallow network calls go to stats["deep_cache"]."""
    check_interval(interval)
    if interval is None:
        yield from batches
        return
    with deep_cache(getattr(denoiser, "net", denoiser), interval) as cache:
        for batch in batches:
            if stats is not None:
                stats["deep_cache"] = dict(cache.counts)
            yield batch
