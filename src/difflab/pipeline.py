"""The Python API: a loaded model as a pipeline (diffusers' pipelines are the anchor), `load(path)` to get one.

    pipe = difflab.load("runs/digits")
    images = pipe.sample(16, sampler="dpmpp_2m", steps=20, seed=0, guidance=3.0, cond={"class_label": 7})
    pipe.to_pil(images)[0].save("seven.png")

A pipeline holds the run's config, its formulation and the denoiser built from them; sampling composes guidance
(`difflab.guidance.compose`) and runs any registered sampler with per-sample seeds (`difflab.generate`).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from difflab.backends import with_backend
from difflab.conditioning import accepted_signals, as_cond, check_cond
from difflab.config import RunConfig
from difflab.errors import DifflabError
from difflab.formulations import Formulation, make_formulation
from difflab.generate import check_sampling_request, generate_batches, no_grad_batches, sample_seeds
from difflab.guidance.compose import Guidance, guide
from difflab.guidance.thresholding import X0Range, model_x0_range, refuse_diffusers_names, resolve_thresholding
from difflab.kernels import Kernel
from difflab.nets import build_network
from difflab.nets.deep_cache import with_deep_cache
from difflab.sampling.aliases import is_tuned_grid
from difflab.text.conditioned import FrozenTextConfig
from difflab.text.memo import PromptMemo
from difflab.types import Denoiser, StepCallback

# `prepare`'s keywords: what `sample` passes on to make the condition and the guided denoiser
CONDITION_KEYWORDS = ("cond", "guidance", "guidance_interval", "negative_cond", "classifier", "classifier_scale",
                      "prompt", "negative_prompt", "clip", "clip_prompt", "clip_scale", "clip_x0", "dynamic_threshold",
                      "x0_range")  # fmt: skip


class Pipeline:
    """A model ready to sample: `config` (RunConfig), `formulation`, `denoiser` (network + preconditioning, in eval
    mode), and where it came from (`checkpoint` folder, training `step`, `weights` file)."""

    def __init__(
        self,
        config: RunConfig,
        denoiser: nn.Module | None = None,
        *,
        checkpoint: Path | None = None,
        step: int = 0,
        weights: Path | None = None,
        autoencoder: nn.Module | None = None,
    ):
        self.config = config
        self.formulation: Formulation = make_formulation(config.formulation)
        self.denoiser = denoiser if denoiser is not None else self.formulation.denoiser(build_network(config.model))
        self.denoiser.eval()
        self.checkpoint, self.step, self.weights = checkpoint, step, weights
        self._text_encoder = None  # a frozen text encoder, loaded on the first prompt
        self.text_memo = PromptMemo(self.frozen_text_encoder)  # its encodings of recent prompts
        if config.latent is not None and autoencoder is None:
            from difflab.autoencoder.nets import KLAutoencoder

            autoencoder = KLAutoencoder(config.latent.autoencoder, config.latent.scale_factor)
        self.autoencoder = autoencoder.eval() if autoencoder is not None else None  # a latent model's decoder

    # ---- what the model is ------------------------------------------------------------------------------
    @property
    def kernel(self) -> Kernel:
        """The perturbation kernel whose draw at sigma_max starts sampling (Gaussian, or Poisson for PFGM/PFGM++)."""
        return self.formulation.kernel

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of a sample: a latent model's decoded images."""
        return tuple(self.config.data.sample_shape)

    @property
    def model_shape(self) -> tuple[int, ...]:
        """The shape the denoiser works at: the samples', or a latent model's latents (a diffusers folder's VAE is
        not described by config.latent: its factor and channels give the shape)."""
        if self.config.latent is None and self.autoencoder is not None:
            from difflab.autoencoder.base import latent_shape

            return latent_shape(self.autoencoder, self.sample_shape)
        return self.config.model_shape

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """What the denoiser made as samples: a latent model's latents decoded (on the pipeline's device), else x."""
        if self.autoencoder is None:
            return x
        with torch.no_grad():
            return self.autoencoder.decode(x.to(self.device)).cpu()

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images as what the denoiser works on: a latent model's scaled latents, else the images themselves."""
        if self.autoencoder is None:
            return images
        with torch.no_grad():
            return self.autoencoder.encode(images.to(self.device)).cpu()

    @property
    def accepts(self) -> frozenset[str]:
        """The conditioning signals the network was trained on."""
        return accepted_signals(self.denoiser.net)

    @property
    def num_classes(self) -> int | None:
        return self.config.model.num_classes

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def to(self, device: torch.device | str) -> Pipeline:
        if self.autoencoder is not None:
            self.autoencoder.to(device)
        self.denoiser.to(device)
        return self

    with_backend = with_backend  # this model on onnxruntime, int8 or torch.compile (difflab.backends)

    def sigmas(self, steps: int, grid: str | None = None, sampler: str | None = None) -> torch.Tensor:
        """The sampling grid: `steps` noise levels then 0, (steps + 1,). grid None: a student's own, else the
        formulation's default for `sampler` (log_snr for the lambda-multistep solvers, else the model's grid); "tuned":
        the levels `difflab tune-grid` stored with the checkpoint for this sampler and step count."""
        grid = grid or self.default_grid(sampler)
        if is_tuned_grid(grid):
            from difflab.tuned_grid import stored_sigmas  # levels `difflab tune-grid` stored with the checkpoint

            return stored_sigmas(self, sampler or self.sampling_defaults()["sampler"], steps)
        return self.formulation.sigmas(steps, grid, sampler)

    def default_grid(self, sampler: str | None = None) -> str:
        """The grid `sampler` gets when none is named: a distilled student's own, else the formulation's for it."""
        distill = self.config.distill
        return distill.grid if distill is not None else self.formulation.default_grid_for(sampler)

    def sampling_defaults(self) -> dict[str, Any]:
        """What the model samples with when nothing is asked for: a distilled student its own sampler, step count and
        grid (`RunConfig.distill`), any other model its formulation's (ddim, 50 steps; a consistency model 1 step)."""
        distill = self.config.distill
        return distill.sampling_defaults() if distill is not None else self.formulation.sampling_defaults()

    @functools.cached_property
    def data_range(self) -> X0Range | None:
        """(lo, hi) that the model's x0 lies in, to which x0_hat is clipped by default: [-1, 1] for pixel images, a 2-D
        toy's training-set box; None (no known range: not clipped) for latents and embeddings (`model_x0_range`)."""
        return model_x0_range(self.config, latent=self.autoencoder is not None)

    def thresholding(self, clip_x0: bool | None = None, dynamic_threshold: float | None = None,
                     x0_range: X0Range | None = None) -> tuple[X0Range | None, float | None]:  # fmt: skip
        """(the range x0_hat is limited to or None, the dynamic-thresholding percentile or None) that sampling with
        these settings uses (None, None, None: the model's default, `data_range`; `resolve_thresholding`)."""
        return resolve_thresholding(clip_x0, dynamic_threshold, x0_range, self.data_range)

    def weights_hash(self) -> str:
        """The first 10 hex digits of the SHA-256 of the weights file (AUTOMATIC1111's "Model hash"); read once per
        version of the file (its size and modification time), in chunks."""
        if self.weights is None:
            return "none"
        path = Path(self.weights)
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if getattr(self, "_weights_hash", (None, None))[0] != key:
            digest = hashlib.sha256()
            with path.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
            self._weights_hash = (key, digest.hexdigest()[:10])
        return self._weights_hash[1]

    # ---- conditioning and guidance ----------------------------------------------------------------------
    def make_cond(
        self, cond: Any, n: int, also: frozenset[str] = frozenset(), num_classes: int | None = None
    ) -> dict[str, torch.Tensor] | None:
        """A cond mapping with n rows: scalars and 1-row values are repeated; a class label must be in 0..K-1 (K the
        model's classes, or `num_classes`); a signal the model was not trained on (nor in `also`, e.g. a classifier's
        label) is refused."""
        if cond is None:
            return None
        if isinstance(cond, Mapping):
            cond = {k: _rows(k, v, n) for k, v in cond.items()}
        cond = as_cond(cond)
        check_cond(cond, self.accepts | also)
        labels = cond.get("class_label")
        k = num_classes or self.num_classes
        if labels is not None and k is not None and bool(((labels < 0) | (labels >= k)).any()):
            raise DifflabError(f"class labels must lie in 0..{k - 1}")
        return cond

    def text_cond(self, prompt: str | Sequence[str], n: int) -> dict[str, torch.Tensor]:
        """The text signals of one prompt (repeated) or n prompts: {"text_tokens": (n, L)} with the run's tokenizer, or
        for a frozen encoder its text_embed (n, L, D), text_mask (n, L) and text_pooled (n, P) (not cached on disk).
        An empty prompt is the null caption (the unconditional model). An unknown word is a one-line error naming it."""
        text = self.config.model.text
        if text is None:
            raise DifflabError(
                f"this model is not conditioned on text (it takes {', '.join(sorted(self.accepts)) or 'no condition'})"
                "; drop the prompt, or train with --text-encoder scratch on captioned data"
            )
        prompts = [prompt] * n if isinstance(prompt, str) else [str(p) for p in prompt]
        if len(prompts) != n:
            raise DifflabError(f"{len(prompts)} prompts for {n} samples; give one prompt, or one per sample")
        if isinstance(text, FrozenTextConfig):
            return self._frozen_text_cond(text, prompts)
        return {"text_tokens": text.tokenizer().encode_with_null(prompts)}  # an empty prompt: the null caption

    def frozen_text_encoder(self) -> Any:
        """The frozen text encoder the model was trained with, loaded on first use; other weights than it was trained
        with are a one-line DifflabError (`FrozenTextConfig.load_encoder`)."""
        if self._text_encoder is None:
            self._text_encoder = self.config.model.text.load_encoder()
        return self._text_encoder

    def _frozen_text_cond(self, text: FrozenTextConfig, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Each distinct non-empty prompt encoded once; empty ones are the null caption (zeros, mask all False)."""
        n = len(prompts)
        embed, mask = torch.zeros(n, text.max_length, text.dim), torch.zeros(n, text.max_length, dtype=torch.bool)
        pooled = torch.zeros(n, text.pooled_dim)
        distinct = [p for p in dict.fromkeys(prompts) if p.strip()]
        if distinct:
            out, row = self.text_memo.encode(distinct), {p: i for i, p in enumerate(distinct)}
            real = [i for i, p in enumerate(prompts) if p in row]
            pick = [row[prompts[i]] for i in real]
            embed[real], mask[real], pooled[real] = out.embed[pick], out.mask[pick], out.pooled[pick]
        return {"text_embed": embed, "text_mask": mask, "text_pooled": pooled}

    def guided_denoiser(self, guidance: Guidance | None, cond: Any) -> Denoiser:
        """The denoiser with classifier-free and/or classifier guidance composed around it (cond already made)."""
        guidance = guidance or Guidance()
        return guide(self.denoiser, guidance, conditional=bool(self.accepts), has_cond=cond is not None,
                     kernel=self.kernel)  # fmt: skip

    def prepare(
        self,
        n: int,
        *,
        cond: Any = None,
        guidance: float | None = None,
        guidance_interval: tuple[float, float] | None = None,
        negative_cond: Any = None,
        classifier: Any = None,
        classifier_scale: float | None = None,
        prompt: str | Sequence[str] | None = None,
        negative_prompt: str | None = None,
        clip: Any = None,
        clip_prompt: str | None = None,
        clip_scale: float | None = None,
        clip_x0: bool | None = None,
        dynamic_threshold: float | None = None,
        x0_range: X0Range | None = None,
    ) -> tuple[dict[str, torch.Tensor] | None, Denoiser]:
        """(cond with n rows, guided denoiser) for `sample`, inpainting and img2img (`compose.prepare_guidance`).
        classifier: a noise-aware classifier module or its folder, checked against the model (kernel, shape, class
        count); negative_cond: one row, used for every sample; prompt (one for all, or n) and negative_prompt: text,
        for a text model; clip: a noise-aware CLIP (module or `difflab train-clip` folder) guiding towards clip_prompt
        (default: the prompt, when it is one string) with scale clip_scale (GLIDE's CLIP guidance, any model);
        clip_x0, dynamic_threshold, x0_range: x0_hat's limits, outermost (`thresholding`)."""
        from difflab.guidance.compose import prepare_guidance

        return prepare_guidance(self, n, **{k: v for k, v in locals().items() if k in CONDITION_KEYWORDS})

    def upsampler_cond(self, cond: Any, low_res: Any, low_res_noise: float | None, seeds: Sequence[int]) -> Any:
        """cond with an upsampler's low_res (n or 1 rows, augmented at level low_res_noise; `difflab.cascade`) and
        low_res_noise signals; cond as it is for another model, which refuses low_res."""
        from difflab.cascade import low_res_signals

        up = self.config.upsampler
        if up is None:
            if low_res is not None or low_res_noise is not None:
                raise DifflabError("this model is not an upsampler (it was trained without --upsample-from); drop "
                                   "low_res and low_res_noise")  # fmt: skip
            return cond
        if low_res is None:
            return cond  # prepare() says what is missing
        signals = low_res_signals(up, self.sample_shape[0], low_res, low_res_noise, seeds)
        return {**(as_cond(cond) or {}), **signals}

    def load_classifier(self, classifier: Any) -> Any:
        """A noise-aware classifier given as a module or a folder, checked to fit the model (shape, class count)."""
        from difflab.guidance.classifier import check_fits, load_classifier

        if isinstance(classifier, (str, Path)):
            classifier = load_classifier(classifier, self.device)
        if hasattr(classifier, "config"):
            check_fits(classifier, self.model_shape, self.num_classes)
        return classifier

    # ---- sampling ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int | None = None, **kwargs: Any) -> torch.Tensor:
        """n samples (n, *sample_shape) in data space on the CPU; sample i uses seed `seed + i` (or seeds[i]).

        Takes the keyword arguments of `sample_batches` and concatenates its batches: seed, seeds, sampler (a
        registered name or an alias: "DPM++ 2M Karras" also picks the karras grid), steps and grid (None: the
        model's `sampling_defaults`, ddim and 50 steps for most), cond
        ({"class_label": 7} or per-sample tensors), guidance (CFG scale w), guidance_interval, negative_cond (one
        row, for every sample), classifier (a noise-aware classifier, module or folder) with classifier_scale,
        prompt (text: one for all samples or one each) and negative_prompt for a text model, clip_x0 (None: the model's
        default, clip x0_hat to `data_range` where known; True; False), dynamic_threshold (Imagen's percentile p, e.g.
        99.5), x0_range ((lo, hi) instead of the model's), low_res (an upsampler's
        input images (n or 1, C, r, r) in [-1, 1]) and low_res_noise (its augmentation level, default 0),
        batch_size (256), progress, callback, stats (stats["nfe"]: network evaluations per sample), and the sampler's
        own options (eta, s_churn, ...); cache_interval (DeepCache's K); watermark (`difflab.watermark`: TreeRing(key)
        or DwtDct(text)).
        """
        return torch.cat([x for _, x in self.sample_batches(n, **kwargs)])

    def sample_batches(
        self,
        n: int | None = None,
        *,
        seed: int = 0,
        seeds: Sequence[int] | None = None,
        sampler: str | None = None,
        steps: int | None = None,
        grid: str | None = None,
        low_res: torch.Tensor | None = None,
        low_res_noise: float | None = None,
        batch_size: int = 256,
        progress: bool = False,
        callback: StepCallback | None = None,
        stats: dict[str, Any] | None = None,
        **settings: Any,
    ) -> Iterator[tuple[Sequence[int], torch.Tensor]]:
        """`sample`, one batch at a time: yields (seeds of the batch, samples (B, *sample_shape) on the CPU); a batch
        is drawn when the caller asks for it, so each can be written before the next. Sizes (SAMPLING_LIMITS),
        seeds, sampler, options and conditioning are checked before the first batch. `settings` holds `prepare`'s
        conditioning and guidance keywords (CONDITION_KEYWORDS: cond, guidance, ...), watermark and sampler options."""
        from difflab.sampling import resolve_sampler

        seeds = sample_seeds(n, seed, seeds)
        defaults = self.sampling_defaults()
        sampler, steps = sampler or defaults["sampler"], steps or defaults["steps"]
        check_sampling_request(len(seeds), steps, batch_size, seed=None)
        spec, implied_grid = resolve_sampler(sampler)
        self.formulation.check_sampler(spec)
        request = {k: settings.pop(k) for k in CONDITION_KEYWORDS if k in settings}
        watermark, cache_interval = settings.pop("watermark", None), settings.pop("cache_interval", None)
        options = settings  # what is left: the sampler's own options, checked by generate_batches
        refuse_diffusers_names(options)
        request["cond"] = self.upsampler_cond(request.get("cond"), low_res, low_res_noise, seeds)
        cond, denoiser = self.prepare(len(seeds), **request)
        sigmas = self.sigmas(steps, grid or implied_grid, spec.name)
        batches = generate_batches(
            denoiser, self.model_shape, sigmas, seeds, sampler=spec.name, options=options, kernel=self.kernel,
            cond=cond, batch_size=batch_size, device=self.device, callback=callback, progress=progress, stats=stats,
            watermark=watermark,
        )  # fmt: skip
        batches = with_deep_cache(batches, self.denoiser, cache_interval, stats)  # DeepCache: --cache-interval K
        if self.autoencoder is not None:
            batches = ((batch_seeds, self.decode(x)) for batch_seeds, x in batches)
        return no_grad_batches(batches if watermark is None else watermark.mark_batches(batches, self.sample_shape))

    def inpaint(self, image: torch.Tensor, fill: torch.Tensor, n: int | None = None, **kwargs: Any) -> torch.Tensor:
        """Fill the region `fill` = 1 (1 or n, 1, R, R) of `image` (1 or n, C, R, R) with a model trained with
        --inpainting (GLIDE): `difflab.inpaint_model.inpaint_with_model`, with `sample`'s keyword arguments (prompt,
        guidance, seeds, ...) and `paste` (default True: the known pixels are the original's exactly)."""
        from difflab.inpaint_model import inpaint_with_model

        return inpaint_with_model(self, image, fill, n, **kwargs)

    def to_pil(self, images: torch.Tensor) -> list:
        """Images (N, C, H, W) in [-1, 1] as PIL images (8-bit, L or RGB)."""
        from PIL import Image

        from difflab.viz import images_to_uint8

        if self.config.data.kind != "images":
            raise DifflabError(f"this model makes {self.config.data.kind}, not images; plot them with save_scatter")
        arrays = images_to_uint8(images)
        return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arrays]

    def __repr__(self) -> str:
        return (f"Pipeline({self.formulation.name}, {self.config.model.backbone} '{self.config.model.preset}', "
                f"data {self.config.data.name} {self.sample_shape}, step {self.step})")  # fmt: skip


def _rows(name: str, value: Any, n: int) -> torch.Tensor:
    """A signal value as n rows: an int (a class label), a 0-d tensor or a 1-row tensor are repeated."""
    if not isinstance(value, torch.Tensor):
        value = torch.as_tensor(value)
    if name == "class_label":
        value = value.long()
    if value.ndim == 0:
        return value.expand(n).clone()
    if value.shape[0] == 1 and n != 1:
        return value.expand(n, *value.shape[1:]).clone()
    if value.shape[0] != n:
        raise DifflabError(f"cond '{name}' holds {value.shape[0]} rows for {n} samples; give 1 or {n}")
    return value


from difflab.loading import load  # noqa: E402, F401  (difflab.pipeline.load, as before: the loader lives in loading.py)
