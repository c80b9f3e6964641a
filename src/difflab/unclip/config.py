"""The unCLIP part of a RunConfig (Ramesh et al. 2022): which of the two diffusion models of unCLIP a run is (the prior
over CLIP image embeddings, or the decoder conditioned on them) and the frozen CLIP both read."""

from __future__ import annotations

from dataclasses import dataclass

from difflab.errors import DifflabError

ROLES = ("prior", "decoder")


@dataclass(frozen=True)
class UnclipConfig:
    """`role`: "prior" (a diffusion model of embed_scale * z_i given the caption's CLIP text encoding) or "decoder" (an
    image model conditioned on z_i); `clip`: the CLIP checkpoint folder (absolute), `clip_hash`: the first 10 hex
    digits of its weights' SHA-256 (checked whenever the CLIP is loaded again); the CLIP's embedding size and image
    size. embed_scale = sqrt(E): unit embeddings scaled so that each coordinate has about unit variance, as the
    prior's Gaussian noise expects (DALLE2-pytorch's image_embed_scale)."""

    role: str
    clip: str
    clip_hash: str
    embed_dim: int
    image_size: int

    def __post_init__(self):
        if self.role not in ROLES:
            raise DifflabError(f"unclip.role must be prior or decoder, got {self.role!r}")
        if not 1 <= self.embed_dim <= 4096 or not 1 <= self.image_size <= 1024:
            raise DifflabError("unclip sizes out of range: embed_dim 1..4096, image_size 1..1024")

    @property
    def embed_scale(self) -> float:
        return self.embed_dim**0.5
