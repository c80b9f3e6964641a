"""The invisible-watermark package's DWT-DCT mark (ShieldMnt/invisible-watermark, method "dwtDct"), as Stable
Diffusion's scripts apply it: bit b goes into the largest AC coefficient c of each 4x4 DCT block of the Haar DWT's
approximation band of the U (chroma) channel, |c| -> (floor(|c| / 36) + 1/4 + b/2) 36, the text's bits repeated over
the blocks; read back as b = [|c| mod 36 > 18], averaged over the repeats.

An optional extra (`pip install 'difflab[watermark]'`, import name `imwatermark`). The package refuses images below
256x256 pixels; difflab refuses them (and grey images: the mark lives in a chroma channel) in one line before any
sampling. Detection: the share of the text's bits read back, and the p-value of that many matches or more when every
bit is a coin flip (no mark), binomial(n bits, 1/2); detected below the same threshold as Tree-Ring's.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from difflab.errors import DifflabError

KIND = "dwtdct"
MIN_SIDE = 256  # the package's own limit (H W >= 256^2); difflab asks for both sides
MAX_TEXT_BYTES = 32  # 256 bits: a 256x256 image repeats each bit at least four times
DEFAULT_TEXT = "difflab"
METHOD = "dwtDct"
INSTALL_HINT = "pip install 'difflab[watermark]'"


def load_package() -> Any:
    """The `imwatermark` module, or a one-line DifflabError naming the extra to install."""
    try:
        import imwatermark
    except ImportError:
        raise DifflabError(f"the DWT-DCT watermark needs the invisible-watermark package: {INSTALL_HINT}") from None
    return imwatermark


def check_image_shape(shape: Sequence[int]) -> None:
    """Refuse (one line) what the DWT-DCT mark cannot hold: not a colour image, or smaller than 256x256."""
    if len(shape) != 3 or int(shape[0]) != 3:
        raise DifflabError(f"the DWT-DCT watermark marks colour images (3, H, W), not {tuple(shape)}: it writes into a "
                           "colour channel; use --watermark tree-ring")  # fmt: skip
    height, width = int(shape[1]), int(shape[2])
    if min(height, width) < MIN_SIDE:
        raise DifflabError(f"the DWT-DCT watermark needs images of at least {MIN_SIDE}x{MIN_SIDE} pixels, these are "
                           f"{width}x{height}; use --watermark tree-ring for small images")  # fmt: skip


def text_bits(text: str) -> np.ndarray:
    """The UTF-8 bits of `text` (uint8 0/1), checked: 1..MAX_TEXT_BYTES bytes."""
    data = text.encode("utf-8") if isinstance(text, str) else b""
    if not 1 <= len(data) <= MAX_TEXT_BYTES:
        raise DifflabError(f"the DWT-DCT watermark text must be 1..{MAX_TEXT_BYTES} bytes of UTF-8, got {text!r}")
    return np.unpackbits(np.frombuffer(data, dtype=np.uint8))


@dataclass(frozen=True)
class DwtDct:
    """The DWT-DCT mark of `text`: pass it as `watermark=` to `Pipeline.sample`; each colour image of 256x256 or more
    is marked after sampling (8-bit, as it will be saved). The initial noise is left alone."""

    text: str = DEFAULT_TEXT
    kind = KIND

    def __post_init__(self) -> None:
        text_bits(self.text)

    def metadata(self, shape: Sequence[int] | None = None) -> dict[str, Any]:
        return {"kind": KIND, "text": self.text}

    def check(self, shape: Sequence[int], kernel: Any) -> None:
        """Nothing to check on the model's noise (the image is checked in `mark_batches`)."""

    def mark_initial_noise(self, x: torch.Tensor, sigma_max: float, kernel: Any = None) -> torch.Tensor:
        return x

    def mark_batches(self, batches: Iterator, sample_shape: Sequence[int]) -> Iterator:
        """(seeds, samples) batches with every sample marked; the shape and the package are checked now, before the
        first batch is drawn."""
        check_image_shape(sample_shape)
        load_package()
        return ((seeds, self.mark_samples(x)) for seeds, x in batches)

    def mark_samples(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> marked, on the 256 levels of 8-bit data (x = p / 127.5 - 1)."""
        from difflab.viz import images_to_uint8

        check_image_shape(images.shape[1:])
        marked = np.stack([embed_dwtdct(rgb, self.text) for rgb in images_to_uint8(images)])
        return torch.from_numpy(marked).permute(0, 3, 1, 2).to(torch.float32).div(127.5).sub(1.0)


def embed_dwtdct(rgb: np.ndarray, text: str) -> np.ndarray:
    """One RGB image (H, W, 3) uint8 with `text` written in, as Stable Diffusion's scripts do (the package works in
    OpenCV's BGR order)."""
    check_image_shape((rgb.shape[2], rgb.shape[0], rgb.shape[1]))
    encoder = load_package().WatermarkEncoder()
    encoder.set_watermark("bits", text_bits(text).tolist())
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    return np.ascontiguousarray(encoder.encode(bgr, METHOD)[..., ::-1])


@dataclass(frozen=True)
class DwtDctDetection:
    """One image's test: `bit_accuracy` (share of the text's bits read back), `p_value` (P(at least that many
    matches | random bits)), `detected` (p_value < threshold), `decoded` (the bytes read, as text where possible)."""

    bit_accuracy: float
    p_value: float
    detected: bool
    decoded: str
    threshold: float


def detect_dwtdct(rgb: np.ndarray, text: str, threshold: float = 0.01) -> DwtDctDetection:
    """Read `text`'s worth of bits from one RGB image (H, W, 3) uint8 and compare them with `text`'s."""
    from scipy.stats import binom

    from difflab.watermark.tree_ring import check_threshold

    check_threshold(threshold)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise DifflabError(f"the DWT-DCT watermark is read from colour images, not an array of shape {rgb.shape}")
    check_image_shape((3, rgb.shape[0], rgb.shape[1]))
    expected = text_bits(text)
    decoder = load_package().WatermarkDecoder("bits", len(expected))
    bits = np.asarray(decoder.decode(np.ascontiguousarray(rgb[..., ::-1]), METHOD), dtype=np.uint8)
    matches = int((bits == expected).sum())
    p_value = float(binom.sf(matches - 1, len(expected), 0.5))
    decoded = np.packbits(bits).tobytes().decode("utf-8", errors="replace")
    return DwtDctDetection(bit_accuracy=matches / len(expected), p_value=p_value, detected=p_value < threshold,
                           decoded=decoded, threshold=threshold)  # fmt: skip
