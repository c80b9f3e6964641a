"""Tree-Ring watermarks (Wen et al. 2023, "Tree-Ring Watermarks: Fingerprints for Diffusion Images that are Invisible
and Robust", Sec. 3, the "ring" key): FFT(x_T / sigma_max)[M] = k, rings of constant values in the Fourier transform of
the initial noise, found again by inverting the image to noise (DDIM inversion) and testing FFT(noise)[M] against k.

Writing the key. M is the disc of radius r around zero frequency (|f| <= r in integer frequency units, the
paper's centred disc, read on the unshifted FFT) in one channel of the initial noise; the key is one real value per
ring ceil(|f|) = 0, 1, ..., r, drawn N(0, N) (N = H W) from a generator seeded with the key seed. A real value constant
on rings is Hermitian-symmetric (k(-f) = k(f)), so the inverse FFT is real and the marked noise's FFT equals k on M
exactly; N(0, N) is the energy of a white-noise coefficient (E|FFT(n)(f)|^2 = N), so the noise keeps unit variance
on average. (The paper writes complex ring values and keeps the real part of the inverse FFT, which leaves Re(k) on
M: the imaginary parts are lost, and its detector still compares with them.)
r scales with the size, round(10/64 min(H, W)) (the paper's 10 on 64x64 latents), at least 1; images smaller than
8x8 are refused (no ring fits with room around it).

Detecting it. y = FFT(n_hat) of the inverted noise n_hat = x_T / sigma_max; the score is the paper's L1 distance,
mean over M of |y - k|, in units of a white-noise coefficient's std sqrt(N). The p-value is the paper's test: under
H0 (no mark) the coefficients are white Gaussian with per-pixel variance v, estimated from M as mean |y|^2 / N; then
eta = sum_M |y - k|^2 / (N v) is non-central chi-square with |M| degrees of freedom (the FFT of a real image pairs f
with -f: of the 2|M| real and imaginary parts on M half are copies; counting 2|M| would treat them as independent) and
non-centrality lambda = sum_M k^2 / (N v); p = P(chi2 <= eta), small when y lies close to the key (with v estimated
the test is a little conservative). `detected` is p < a stated threshold (DEFAULT_THRESHOLD).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from difflab.errors import DifflabError

KIND = "tree-ring"
RADIUS_PER_SIDE = 10 / 64  # the paper's radius 10 on Stable Diffusion's 64x64 latents
MIN_SIDE = 8  # smaller images have no room for a ring (r = 1 needs frequencies up to 1 < side / 2, and more)
DEFAULT_THRESHOLD = 0.01  # detected when the p-value is below this (the false-positive rate if H0's model holds)
KEY_LIMIT = 2**63  # key seeds are 0..2**63 - 1, as sample seeds


def default_radius(height: int, width: int) -> int:
    """The key's radius at this size: round(10/64 min(H, W)), at least 1 (8x8 -> 1, 16 -> 3, 32 -> 5, 64 -> 10)."""
    return max(1, math.floor(RADIUS_PER_SIDE * min(height, width) + 0.5))


def frequency_radius(height: int, width: int) -> torch.Tensor:
    """|f| of every bin of an unshifted H x W FFT in integer frequency units, float64 (H, W); 0 at [0, 0]."""
    fy = torch.fft.fftfreq(height, 1 / height, dtype=torch.float64)
    fx = torch.fft.fftfreq(width, 1 / width, dtype=torch.float64)
    return (fy[:, None] ** 2 + fx[None, :] ** 2).sqrt()


@dataclass(frozen=True)
class TreeRing:
    """A Tree-Ring key: `key` (the seed of its ring values), `radius` (None: `default_radius` of the image size) and
    `channel` (-1: the last, as the paper marks SD's fourth latent channel). Pass it as `watermark=` to
    `Pipeline.sample` / `sample_batches` (or `generate_batches`): every sample's initial noise carries the key, so every
    deterministic sampler draws marked images. `detect_tree_ring` finds it again."""

    key: int
    radius: int | None = None
    channel: int = -1
    kind = KIND

    def __post_init__(self) -> None:
        if isinstance(self.key, bool) or not isinstance(self.key, int) or not 0 <= self.key < KEY_LIMIT:
            raise DifflabError(f"a Tree-Ring key must be an integer in 0..2**63 - 1, got {self.key!r}")
        if self.radius is not None and (isinstance(self.radius, bool) or not isinstance(self.radius, int)
                                        or self.radius < 1):  # fmt: skip
            raise DifflabError(f"a Tree-Ring radius must be an integer >= 1, got {self.radius!r}")

    # ---- the key at one shape ---------------------------------------------------------------------------
    def resolve(self, shape: Sequence[int]) -> tuple[int, int]:
        """(channel index, radius) for noise of shape (C, H, W); a one-line error where no key fits."""
        if len(shape) != 3:
            raise DifflabError(f"Tree-Ring watermarks mark images (C, H, W); this model makes {tuple(shape)}")
        channels, height, width = (int(s) for s in shape)
        if min(height, width) < MIN_SIDE:
            raise DifflabError(f"{height}x{width} is too small for a Tree-Ring watermark: its rings need at least "
                               f"{MIN_SIDE}x{MIN_SIDE} (the Fourier transform has no room for them)")  # fmt: skip
        if not -channels <= self.channel < channels:
            raise DifflabError(f"Tree-Ring channel {self.channel} does not exist in {channels}-channel noise")
        radius = self.radius if self.radius is not None else default_radius(height, width)
        if 2 * radius >= min(height, width):
            raise DifflabError(f"a Tree-Ring radius of {radius} does not fit {height}x{width}: it must stay below half "
                               f"the smaller side ({(min(height, width) - 1) // 2} at most)")  # fmt: skip
        return self.channel % channels, radius

    def mask_and_pattern(self, shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(M as bool (H, W), the key k as float64 (H, W), zero off M) for noise of shape (C, H, W)."""
        _, radius = self.resolve(shape)
        height, width = int(shape[-2]), int(shape[-1])
        distance = frequency_radius(height, width)
        mask = distance <= radius
        generator = torch.Generator().manual_seed(self.key)
        ring_values = torch.randn(radius + 1, generator=generator, dtype=torch.float64) * math.sqrt(height * width)
        rings = distance.ceil().long().clamp(max=radius)
        return mask, torch.where(mask, ring_values[rings], torch.zeros((), dtype=torch.float64))

    def metadata(self, shape: Sequence[int]) -> dict[str, Any]:
        """What reproduces the mark (the PNG parameters' "watermark"): kind, key, radius and channel, resolved."""
        channel, radius = self.resolve(shape)
        return {"kind": KIND, "key": self.key, "radius": radius, "channel": channel}

    # ---- the sampling hook (`difflab.generate.generate_batches`) --------------------------------------
    def check(self, shape: Sequence[int], kernel: Any) -> None:
        """Refuse (one line) a model this key cannot mark: not images, too small, or a non-Gaussian prior."""
        if not getattr(kernel, "is_gaussian", True):
            raise DifflabError("Tree-Ring watermarks mark Gaussian initial noise; this model starts from PFGM's "
                               "Poisson kernel")  # fmt: skip
        self.resolve(shape)

    def mark_initial_noise(self, x: torch.Tensor, sigma_max: float, kernel: Any = None) -> torch.Tensor:
        """x_T = sigma_max n (B, C, H, W) with FFT(n)[M] = k in the key's channel (the other channels untouched)."""
        self.check(x.shape[1:], kernel)
        channel, _ = self.resolve(x.shape[1:])
        mask, pattern = self.mask_and_pattern(x.shape[1:])
        spectrum = torch.fft.fft2(x[:, channel].to(torch.float64))
        spectrum = torch.where(mask.to(x.device), (pattern * sigma_max).to(x.device), spectrum)
        marked = x.clone()
        marked[:, channel] = torch.fft.ifft2(spectrum).real.to(x.dtype)
        return marked

    def mark_batches(self, batches: Iterator, sample_shape: Sequence[int]) -> Iterator:
        """The samples as drawn: the mark is already in them through the initial noise."""
        return batches


@dataclass(frozen=True)
class TreeRingDetection:
    """One image's test: `distance` (mean |y - k| over M / sqrt(N)), `p_value` (P(chi2 <= eta) under H0), `detected`
    (p_value < threshold) and the `threshold` used."""

    distance: float
    p_value: float
    detected: bool
    threshold: float


def tree_ring_test(
    noise: torch.Tensor, mark: TreeRing, threshold: float = DEFAULT_THRESHOLD
) -> list[TreeRingDetection]:
    """The key's test on unit-variance noise (B, C, H, W) (an inverted x_T / sigma_max), one result per row."""
    from scipy.stats import ncx2

    check_threshold(threshold)
    channel, _ = mark.resolve(noise.shape[1:])
    mask, pattern = mark.mask_and_pattern(noise.shape[1:])
    size = noise.shape[-2] * noise.shape[-1]
    y = torch.fft.fft2(noise[:, channel].detach().cpu().to(torch.float64))[:, mask]  # (B, |M|)
    key = pattern[mask]
    variance = (y.abs() ** 2).mean(1) / size  # per-pixel variance under H0, estimated on M
    eta = ((y - key).abs() ** 2).sum(1) / (size * variance)
    noncentrality = (key**2).sum() / (size * variance)
    distance = (y - key).abs().mean(1) / math.sqrt(size)
    results = []
    for d, e, lam in zip(distance.tolist(), eta.tolist(), noncentrality.tolist(), strict=True):
        p = float(ncx2.cdf(e, int(mask.sum()), lam))
        results.append(TreeRingDetection(distance=d, p_value=p, detected=p < threshold, threshold=threshold))
    return results


def check_threshold(threshold: float) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold < 1:
        raise DifflabError(f"the p-value threshold must lie strictly between 0 and 1, got {threshold!r}")


def invert_to_noise(denoiser: Any, x0: torch.Tensor, sigmas: torch.Tensor, *, cond: Any = None) -> torch.Tensor:
    """x0 (B, *shape) at sigma 0 run up the probability-flow ODE to sigmas[0] by DDIM inversion (`invert_ddim`, the
    grid `sigmas` descending to 0), divided by sigmas[0]: the unit-variance noise that would have drawn x0."""
    from difflab.sampling.ancestral import invert_ddim

    with torch.no_grad():
        return invert_ddim(denoiser, x0, sigmas, cond=cond) / float(sigmas[0])


def detect_tree_ring(
    denoiser: Any,
    x0: torch.Tensor,
    sigmas: torch.Tensor,
    mark: TreeRing,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    batch_size: int = 64,
) -> list[TreeRingDetection]:
    """Invert x0 (B, *shape), the model's own space (pixels, or a latent model's latents), along `sigmas` with the
    (unconditional) `denoiser`, then test the key: one TreeRingDetection per row."""
    check_threshold(threshold)
    mark.resolve(x0.shape[1:])
    results = []
    for start in range(0, x0.shape[0], batch_size):
        noise = invert_to_noise(denoiser, x0[start : start + batch_size], sigmas)
        results += tree_ring_test(noise, mark, threshold)
    return results


def detect_with_pipeline(
    pipe: Any, images: torch.Tensor, mark: TreeRing, *, steps: int = 50, threshold: float = DEFAULT_THRESHOLD,
    batch_size: int = 64,
) -> list[TreeRingDetection]:  # fmt: skip
    """`detect_tree_ring` with a loaded `Pipeline`: images (B, *sample_shape) in [-1, 1] (a latent model encodes
    them first), inverted with DDIM on the model's grid of `steps` levels, unconditionally, x0_hat limited as sampling
    limits it by default."""
    if tuple(images.shape[1:]) != tuple(pipe.sample_shape):
        raise DifflabError(f"the images are {tuple(images.shape[1:])} but this model makes {tuple(pipe.sample_shape)}")
    mark.check(pipe.model_shape, pipe.kernel)
    if steps < 1:
        raise DifflabError(f"--steps of the inversion must be >= 1, got {steps}")
    _, denoiser = pipe.prepare(images.shape[0])
    x0 = pipe.encode(images).to(pipe.device)
    return detect_tree_ring(denoiser, x0, pipe.sigmas(steps), mark, threshold=threshold, batch_size=batch_size)
