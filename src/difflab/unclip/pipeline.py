"""unCLIP (Ramesh et al. 2022, Fig. 2): a caption's CLIP text embedding -> the prior -> an image embedding -> the
decoder (-> a cascade's upsampler) -> an image; and what the embedding space enables (Sec. 3): variations of an image
(its embedding decoded with new noise), interpolation between two images (slerp of their embeddings and of their
DDIM-inverted noise) and text diffs (the image embedding slerped towards normalise(z_t(to) - z_t(from)))."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from difflab.errors import DifflabError
from difflab.generate import sample_seeds
from difflab.pipeline import Pipeline
from difflab.unclip.link import image_embeddings, linked_clip

DEFAULT_PRIOR_STEPS = 64  # DALL-E 2 samples its prior with 64 strided steps


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical linear interpolation (Shoemake 1985) of the rows of a and b (B, ...):
    sin((1 - t) theta) / sin(theta) a + sin(t theta) / sin(theta) b, theta the angle between a and b; t = 0 gives a,
    t = 1 gives b, unit vectors stay unit vectors along the great circle. Nearly parallel rows are interpolated
    linearly."""
    flat_a, flat_b = a.flatten(1).double(), b.flatten(1).double()
    cos = (F.normalize(flat_a, dim=1) * F.normalize(flat_b, dim=1)).sum(1).clamp(-1, 1)
    theta = torch.arccos(cos)[:, None]
    small = theta < 1e-6
    sin = torch.where(small, torch.ones_like(theta), theta.sin())
    wa = torch.where(small, 1 - t * torch.ones_like(theta), ((1 - t) * theta).sin() / sin)
    wb = torch.where(small, t * torch.ones_like(theta), (t * theta).sin() / sin)
    return (wa * flat_a + wb * flat_b).to(a.dtype).reshape(a.shape)


class UnclipPipeline:
    """The decoder (a `Pipeline` whose run is an unCLIP decoder), the prior (an unCLIP prior's `Pipeline`; needed for
    text) and optionally a cascade's upsampler, all reading one CLIP."""

    def __init__(self, decoder: Pipeline, prior: Pipeline | None = None, upsampler: Pipeline | None = None):
        for pipe, role in ((decoder, "decoder"), (prior, "prior")):
            unclip = getattr(pipe.config, "unclip", None) if pipe is not None else None
            if pipe is not None and (unclip is None or unclip.role != role):
                raise DifflabError(
                    f"'{pipe.checkpoint}' is not an unCLIP {role}; give one made by difflab train-{role}"
                )
        if prior is not None and prior.config.unclip.clip_hash != decoder.config.unclip.clip_hash:
            raise DifflabError("the prior and the decoder were trained with different CLIPs; train them on one")
        if upsampler is not None:
            from difflab.cascade import check_cascade

            check_cascade(decoder, upsampler)
        self.decoder, self.prior, self.upsampler = decoder, prior, upsampler
        self._clip = None

    @property
    def clip(self) -> Any:
        """The CLIP both models read (loaded on first use, its weights checked against the decoder's record)."""
        if self._clip is None:
            self._clip = linked_clip(self.decoder.config.unclip, self.decoder.device)
        return self._clip

    # ---- embeddings ---------------------------------------------------------------------------------------
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """Unit CLIP image embeddings z_i (B, E) of images (B, C, H, W) in [-1, 1], checked to be what the decoder
        makes (its channels and size)."""
        shape = tuple(self.decoder.sample_shape)
        if images.ndim != 4 or tuple(images.shape[1:]) != shape:
            raise DifflabError(f"the decoder makes images of shape {shape}; got {tuple(images.shape[1:])}: give "
                               f"{shape[-1]}x{shape[-2]} images with {shape[0]} channels")  # fmt: skip
        return image_embeddings(self.clip, images)

    def embed_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """Unit CLIP text embeddings z_t (B, E)."""
        with torch.no_grad():
            return self.clip.encode_prompts(list(prompts)).cpu()

    def image_embeds(self, prompt: str | Sequence[str], n: int | None = None, *, seed: int = 0,
                     seeds: Sequence[int] | None = None, steps: int = DEFAULT_PRIOR_STEPS, guidance: float = 1.0,
                     best_of: int = 2, sampler: str = "ddim") -> torch.Tensor:  # fmt: skip
        """Image embeddings (n, E), unit, sampled by the prior for a prompt (one for all or one each) with
        classifier-free guidance `guidance`; each is the best of `best_of` draws by its dot product with the
        prompt's text embedding (DALL-E 2, Sec. 2.2: two). Draw j of sample i uses seed seeds[i] * best_of + j."""
        if self.prior is None:
            raise DifflabError("text needs the prior: give --prior RUN (difflab train-prior), or use variations")
        if not isinstance(best_of, int) or best_of < 1:
            raise DifflabError(f"--best-of must be a positive integer, got {best_of!r}")
        seeds = sample_seeds(n, seed, seeds)
        prompts = [prompt] * len(seeds) if isinstance(prompt, str) else list(prompt)
        if len(prompts) != len(seeds):
            raise DifflabError(f"{len(prompts)} prompts for {len(seeds)} samples; give one prompt, or one per sample")
        draws = [s * best_of + j for s in seeds for j in range(best_of)]
        repeated = [p for p in prompts for _ in range(best_of)]
        z = self.prior.sample(seeds=draws, prompt=repeated, steps=steps, guidance=guidance, sampler=sampler)
        z = F.normalize(z.reshape(len(seeds), best_of, -1), dim=-1)
        text = self.embed_text(prompts)
        best = (z * text[:, None]).sum(-1).argmax(1)
        return z[torch.arange(len(seeds)), best]

    # ---- images ---------------------------------------------------------------------------------------------
    def decode(self, image_embed: torch.Tensor, *, seed: int = 0, seeds: Sequence[int] | None = None,
               **settings: Any) -> torch.Tensor:  # fmt: skip
        """Images of image embeddings (n, E): the decoder's `sample` with cond {"image_embed"} and its keyword
        arguments (steps, sampler, guidance on the embedding, prompt for a caption-conditioned decoder, ...), then the
        upsampler's from them if there is one (its steps: `upsampler_steps`, its augmentation: `low_res_noise`; a
        text-conditional one reads the prompt and the guidance scale)."""
        upsampler_settings = {"steps": settings.pop("upsampler_steps", None) or settings.get("steps", 50),
                              "low_res_noise": settings.pop("low_res_noise", None)}  # fmt: skip
        seeds = sample_seeds(len(image_embed), seed, seeds)
        cond = dict(settings.pop("cond", None) or {}) | {"image_embed": image_embed}
        images = self.decoder.sample(seeds=seeds, cond=cond, **settings)
        if self.upsampler is None:
            return images
        text = {}  # a text-conditional upsampler reads the prompt and guidance, as txt2img's cascade does
        if settings.get("prompt") and self.upsampler.config.model.text is not None:
            text = {"prompt": settings["prompt"], "guidance": settings.get("guidance")}
        return self.upsampler.sample(seeds=seeds, low_res=images, sampler=settings.get("sampler", "ddim"), **text,
                                     **upsampler_settings)  # fmt: skip

    def sample(self, prompt: str | Sequence[str], n: int | None = None, *, seed: int = 0,
               seeds: Sequence[int] | None = None, prior_steps: int = DEFAULT_PRIOR_STEPS, prior_guidance: float = 1.0,
               best_of: int = 2, caption: bool = True, **settings: Any) -> torch.Tensor:  # fmt: skip
        """Text to image: the prior's embeddings for the prompt, decoded (`decode`'s settings); a decoder trained on
        captions also reads the prompt unless `caption` is False."""
        seeds = sample_seeds(n, seed, seeds)
        z = self.image_embeds(prompt, seeds=seeds, steps=prior_steps, guidance=prior_guidance, best_of=best_of)
        if caption and self.decoder.config.model.text is not None:
            settings["prompt"] = prompt
        return self.decode(z, seeds=seeds, **settings)

    def variations(self, image: torch.Tensor, n: int, *, seed: int = 0, **settings: Any) -> torch.Tensor:
        """n variations of one image (1, C, H, W) or (C, H, W): its CLIP embedding decoded with n new noises (Sec. 3.1:
        what CLIP encodes is kept, the rest varies)."""
        z = self.embed_images(image.reshape(1, *image.shape[-3:]))
        return self.decode(z.expand(n, -1), seed=seed, **settings)

    def invert(self, images: torch.Tensor, image_embed: torch.Tensor, steps: int = 50) -> torch.Tensor:
        """The decoder's DDIM-inverted noise x_T of images given their embeddings: deterministic DDIM from it (same
        steps, no guidance) returns about the images."""
        from difflab.sampling.ancestral import invert_ddim

        dec = self.decoder
        sigmas = dec.sigmas(steps).to(dec.device)
        cond = {"image_embed": image_embed.to(dec.device)}
        return invert_ddim(dec.denoiser, images.to(dec.device), sigmas, cond=cond).cpu()

    def decode_from(self, noise: torch.Tensor, image_embed: torch.Tensor, steps: int = 50) -> torch.Tensor:
        """Deterministic DDIM (eta 0) from given states x_T (B, C, H, W) at the first level of the steps' grid."""
        from difflab.sampling.ancestral import sample_ddim

        dec = self.decoder
        sigmas = dec.sigmas(steps).to(dec.device)
        with torch.no_grad():
            x = sample_ddim(
                dec.denoiser, noise.to(dec.device), sigmas, cond={"image_embed": image_embed.to(dec.device)}
            )
        return x.cpu()

    def interpolate(self, a: torch.Tensor, b: torch.Tensor, frames: int, steps: int = 50) -> torch.Tensor:
        """`frames` images (K, C, H, W) from image a to image b (Sec. 3.2): z = slerp(z_a, z_b, t) and x_T =
        slerp(x_T(a), x_T(b), t) at t = 0, 1/(K-1), ..., 1, x_T the DDIM-inverted noise of each image under its own
        embedding, decoded with DDIM; the endpoints reproduce the inputs (up to the inversion's error)."""
        if not isinstance(frames, int) or frames < 2:
            raise DifflabError(f"--frames must be an integer >= 2 (both ends and what lies between), got {frames!r}")
        images = torch.stack([a.reshape(a.shape[-3:]), b.reshape(b.shape[-3:])])
        z = self.embed_images(images)
        noise = self.invert(images, z, steps)
        ts = [i / (frames - 1) for i in range(frames)]
        zs = torch.cat([F.normalize(slerp(z[:1], z[1:], t), dim=1) for t in ts])
        xs = torch.cat([slerp(noise[:1], noise[1:], t) for t in ts])
        return self.decode_from(xs, zs, steps)

    def textdiff(self, image: torch.Tensor, source: str, target: str, amounts: Sequence[float],
                 steps: int = 50) -> torch.Tensor:  # fmt: skip
        """The image edited towards a text change (Sec. 3.3): z_d = normalise(z_t(target) - z_t(source)), then
        z = slerp(z_i, z_d, theta) for each theta in `amounts` (0 = the image itself; the paper uses 0.25 to 0.5),
        decoded with DDIM from the image's inverted noise. Returns (len(amounts), C, H, W)."""
        if not amounts or any(not (0 <= float(t) <= 1) or math.isnan(float(t)) for t in amounts):
            raise DifflabError(f"--amounts must be numbers in [0, 1], got {list(amounts)}")
        image = image.reshape(1, *image.shape[-3:])
        z_i = self.embed_images(image)
        z_t = self.embed_text([source, target])
        z_d = F.normalize(z_t[1:] - z_t[:1], dim=1)
        noise = self.invert(image, z_i, steps)
        zs = torch.cat([F.normalize(slerp(z_i, z_d, float(t)), dim=1) for t in amounts])
        return self.decode_from(noise.expand(len(zs), -1, -1, -1), zs, steps)


def load_unclip(decoder: str | Path, prior: str | Path | None = None, upsampler: str | Path | None = None, *,
                device: str | torch.device = "cpu") -> UnclipPipeline:  # fmt: skip
    """An UnclipPipeline from run folders (or checkpoints): the decoder, the prior (for text), an upsampler."""
    from difflab.loading import load

    return UnclipPipeline(load(decoder, device=device), load(prior, device=device) if prior is not None else None,
                          load(upsampler, device=device) if upsampler is not None else None)  # fmt: skip
