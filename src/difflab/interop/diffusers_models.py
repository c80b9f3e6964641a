"""diffusers components in difflab's interfaces: a UNet2DModel / UNet2DConditionModel or DiTPipeline's
DiTTransformer2DModel as a network F(x, c_noise, cond), CLIP's text tower and tokenizer as a frozen text encoder, an
AutoencoderKL as an `Autoencoder`.

The networks take difflab's fractional training timestep c_noise directly: diffusers' sinusoidal time projection
(`Timesteps`) computes sin/cos of t times its frequencies for any float t, so integer t gives exactly what diffusers'
own pipelines feed and a fractional t (a Karras grid) interpolates the embedding as difflab's own U-Net does.
"""

from __future__ import annotations

import importlib
import os
import warnings
from typing import Any

import torch
from torch import nn

from difflab.conditioning import NULL_LABEL, as_cond, check_cond
from difflab.errors import DifflabError
from difflab.text.base import FrozenTextEncoder, TextEncoding, TextTruncationWarning, truncation_message
from difflab.text.conditioned import TEXT_SIGNALS

INSTALL_DIFFUSERS = "pip install 'difflab[diffusers]'"
# DiTPipeline's transformer; DiT folders saved before diffusers' rename (facebook/DiT-XL-2-*) name it Transformer2DModel
DIT_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")


def import_diffusers(what: str = "a diffusers folder", module: str = "diffusers") -> Any:
    """diffusers (or transformers), offline and quiet; if missing, a one-line DifflabError naming the extra."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    try:
        lib = importlib.import_module(module)
    except ImportError:
        raise DifflabError(f"{what} needs `{INSTALL_DIFFUSERS}` (missing Python package '{module}')") from None
    lib.utils.logging.disable_progress_bar()
    return lib


def check_unet_config(config: Any, class_name: str, where: str = "unet/config.json") -> None:
    """Refuse, in one line, a diffusers U-Net whose inputs difflab cannot give it."""
    time_embedding = config.get("time_embedding_type", "positional")
    if time_embedding != "positional":
        raise DifflabError(f"{where}: time_embedding_type '{time_embedding}' is not supported (positional only: the "
                           "DDPM timestep as input)")  # fmt: skip
    if config.get("center_input_sample"):
        raise DifflabError(f"{where}: center_input_sample is not supported")
    if config.get("class_embed_type") is not None:
        raise DifflabError(f"{where}: class_embed_type '{config['class_embed_type']}' is not supported")
    if class_name == "UNet2DConditionModel":
        for key, what in (
            ("addition_embed_type", "added conditions (SDXL's text_embeds and time_ids)"),
            ("time_cond_proj_dim", "a guidance-scale embedding (LCM)"),
            ("num_class_embeds", "class labels"),
            ("encoder_hid_dim", "a projected text input"),
        ):
            if config.get(key) is not None:
                raise DifflabError(f"{where}: {key} ({what}) is not supported; difflab runs Stable Diffusion 1.x/2.x "
                                   "style text U-Nets")  # fmt: skip


def check_transformer_config(config: Any, class_name: str, where: str = "transformer/config.json") -> None:
    """Refuse, in one line, a diffusers transformer other than DiTPipeline's class-conditional DiT (adaLN-Zero with a
    class table, patches, no cross-attention): PixArt, SD3, Flux, ... are text-conditional (T5, CLIP) and not read."""
    norm = config.get("norm_type", "ada_norm_zero" if class_name == DIT_CLASSES[0] else "layer_norm")
    dit = (class_name in DIT_CLASSES and norm == "ada_norm_zero" and config.get("num_embeds_ada_norm") is not None
           and config.get("patch_size") is not None and config.get("cross_attention_dim") is None)  # fmt: skip
    if not dit:
        what = class_name + (f" (norm_type '{norm}')" if class_name in DIT_CLASSES else "")
        raise DifflabError(f"{where} holds a {what}; difflab loads DiTPipeline's class-conditional "
                           "DiTTransformer2DModel (text-conditional transformers: PixArt, SD3, Flux are not "
                           "supported)")  # fmt: skip


def class_labels(labels: torch.Tensor | None, batch: int, device: torch.device, null_class: int | None,
                 num_classes: int | None = None) -> torch.Tensor:  # fmt: skip
    """A network's class_labels: difflab's null label -1 (and no label) is the row `null_class`; a model without one
    refuses it; a label outside 0..num_classes-1 is refused (when num_classes is known)."""
    if labels is None:
        labels = torch.full((batch,), NULL_LABEL, dtype=torch.long, device=device)
    labels = labels.to(device=device, dtype=torch.long)
    if num_classes is not None and bool(((labels < NULL_LABEL) | (labels >= num_classes)).any()):
        raise DifflabError(f"class labels must lie in 0..{num_classes - 1} (or -1, the null label)")
    if bool((labels == NULL_LABEL).any()):
        if null_class is None:
            raise DifflabError("this diffusers model has no null class: give a class label to every sample (no "
                               "unconditional sampling, no classifier-free guidance)")  # fmt: skip
        labels = torch.where(labels == NULL_LABEL, null_class, labels)
    return labels


class DiffusersUNet(nn.Module):
    """A diffusers U-Net as difflab's network F(x, c_noise, cond) -> (B, C, H, W).

    UNet2DModel: unconditional, or class-conditional (num_class_embeds) with cond {"class_label"}; difflab's null label
    -1 is the class row `null_class` (an exported difflab model's last row), and a model without one refuses it.
    UNet2DConditionModel: cond text_embed (B, L, D) goes in as encoder_hidden_states; a row whose text_mask has no real
    token is the null caption and gets `null_text` (1, L, D), the empty prompt's embedding, which is what diffusers'
    pipelines use for "" and for the unconditional branch of guidance; a partly masked row passes its mask as
    encoder_attention_mask (Stable Diffusion's encoder gives full rows: it attends to the padding tokens' states).
    text_pooled is accepted and unused (SD 1.x/2.x do not take it). A learned-variance output (2C channels) is cut to
    its first C, the mean's prediction."""

    def __init__(self, unet: nn.Module, *, null_text: torch.Tensor | None = None, null_class: int | None = None,
                 out_channels: int | None = None):  # fmt: skip
        super().__init__()
        self.unet = unet.eval().requires_grad_(False)
        config = unet.config
        self.text = config.get("cross_attention_dim") is not None
        self.classes = config.get("num_class_embeds")
        self.null_class = null_class
        self.out_channels = out_channels or config.in_channels
        if self.text:
            if null_text is None:
                raise ValueError("a text U-Net needs null_text, the empty prompt's embedding (1, L, D)")
            self.register_buffer("null_text", null_text.detach().float().clone(), persistent=False)
        self.accepts = (TEXT_SIGNALS if self.text else frozenset()) | (
            frozenset({"class_label"}) if self.classes else frozenset()
        )

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, cond: Any = None) -> torch.Tensor:
        cond = as_cond(cond) or {}
        check_cond(cond, self.accepts)
        kwargs: dict[str, Any] = {}
        if self.text:
            kwargs.update(self._text_inputs(cond, x.shape[0]))
        if self.classes:
            kwargs["class_labels"] = class_labels(cond.get("class_label"), x.shape[0], x.device, self.null_class)
        dtype = self.unet.dtype
        out = self.unet(x.to(dtype), c_noise.to(torch.float32), **kwargs).sample
        return out[:, : self.out_channels].to(x.dtype)

    def _text_inputs(self, cond: dict[str, torch.Tensor], batch: int) -> dict[str, torch.Tensor]:
        embed, mask = cond.get("text_embed"), cond.get("text_mask")
        null = self.null_text.expand(batch, -1, -1)
        if embed is None and mask is None:
            return {"encoder_hidden_states": null.to(self.unet.dtype)}
        if embed is None or mask is None:
            raise DifflabError("text_embed and text_mask come together: pass both (text_mask 1 = real token)")
        if embed.ndim != 3 or embed.shape[0] != batch or embed.shape[2] != null.shape[2]:
            raise DifflabError(f"text_embed must have shape ({batch}, tokens, {null.shape[2]}), got "
                               f"{tuple(embed.shape)}; use this folder's text encoder")  # fmt: skip
        keep = mask != 0
        empty = ~keep.any(dim=1)  # the null caption: no real token
        if bool(empty.any()):
            if embed.shape[1] != null.shape[1]:
                raise DifflabError(f"text_embed has {embed.shape[1]} tokens; this model's captions have "
                                   f"{null.shape[1]}")  # fmt: skip
            embed = torch.where(empty[:, None, None], null.to(embed.dtype), embed)
            keep = keep | empty[:, None]
        out = {"encoder_hidden_states": embed.to(self.unet.dtype)}
        if not bool(keep.all()):
            out["encoder_attention_mask"] = keep
        return out


class DiffusersDiT(nn.Module):
    """DiTPipeline's DiTTransformer2DModel as difflab's network F(x, c_noise, cond) -> (B, C, H, W), class-conditional.

    It is called as DiTPipeline calls it, transformer(x, timestep=t, class_labels=y): t is difflab's c_noise, the
    DDPM timestep as a float (DiT's sinusoidal projection takes any float t); y is cond["class_label"], with
    difflab's null label -1 (and a missing label) mapped to row `num_embeds_ada_norm` of the class table, the
    class-dropout row DiT was trained with for guidance (DiTPipeline passes 1000: the same row for every published
    DiT, whose num_embeds_ada_norm is 1000). A learned-sigma output (2C channels) is cut to its first C, the eps
    prediction, as DiTPipeline does; the variance half is unused (difflab's samplers pick their own variance)."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer.eval().requires_grad_(False)
        config = transformer.config
        self.num_classes = int(config.num_embeds_ada_norm)
        table = transformer.transformer_blocks[0].norm1.emb.class_embedder.embedding_table
        self.null_class = self.num_classes if table.num_embeddings > self.num_classes else None
        self.out_channels = int(config.in_channels)
        self.accepts = frozenset({"class_label"})

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, cond: Any = None) -> torch.Tensor:
        cond = as_cond(cond) or {}
        check_cond(cond, self.accepts)
        labels = class_labels(cond.get("class_label"), x.shape[0], x.device, self.null_class, self.num_classes)
        t = c_noise.to(device=x.device, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        out = self.transformer(x.to(self.transformer.dtype), timestep=t, class_labels=labels).sample
        return out[:, : self.out_channels].to(x.dtype)


class DiffusersTextEncoder(FrozenTextEncoder):
    """A diffusers folder's text_encoder/ (CLIPTextModel or CLIPTextModelWithProjection) and tokenizer/, encoding as
    diffusers' Stable Diffusion pipelines do: every prompt padded to the tokenizer's max length (77), the last hidden
    state of every position (padding included) as embed, mask all True; pooled = pooler_output (or text_embeds)."""

    def __init__(self, folder: Any, *, spec: str, name: str):
        transformers = import_diffusers("a diffusers text encoder", "transformers")
        transformers.utils.logging.disable_progress_bar()
        self.spec, self.name = spec, name
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder / "tokenizer"),
                                                                        local_files_only=True)  # fmt: skip
            config = transformers.AutoConfig.from_pretrained(str(folder / "text_encoder"), local_files_only=True)
            arch = (getattr(config, "architectures", None) or ["CLIPTextModel"])[0]
            cls = getattr(transformers, arch, None) if arch.startswith("CLIPTextModel") else None
            if cls is None:
                raise DifflabError(f"'{folder / 'text_encoder'}' holds a {arch}; difflab reads CLIPTextModel and "
                                   "CLIPTextModelWithProjection")  # fmt: skip
            self.model = cls.from_pretrained(str(folder / "text_encoder"), local_files_only=True,
                                             use_safetensors=True)  # fmt: skip
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise DifflabError(f"cannot load the text encoder of '{folder}' ({first[:200]})") from None
        self.model.eval().requires_grad_(False)
        self.max_length = int(self.tokenizer.model_max_length)
        if not 2 <= self.max_length <= 4096:
            raise DifflabError(f"'{folder / 'tokenizer'}' has model_max_length {self.max_length}; expected 77")
        self.dim = int(self.model.config.hidden_size)
        projected = "Projection" in arch  # pooled = text_embeds (projection_dim), else pooler_output (hidden_size)
        self.pooled_dim = int(self.model.config.projection_dim) if projected else self.dim
        self.use_attention_mask = bool(getattr(self.model.config, "use_attention_mask", False))

    def encode(self, prompts: list[str]) -> TextEncoding:
        if isinstance(prompts, str):
            raise TypeError("encode takes a list of prompts")
        lengths = [len(ids) for ids in self.tokenizer(list(prompts), truncation=False, verbose=False)["input_ids"]]
        if lengths and max(lengths) > self.max_length:
            message = truncation_message(max(lengths), self.max_length, "tokens")
            warnings.warn(message, TextTruncationWarning, stacklevel=2)
        batch = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length, truncation=True,
                               return_tensors="pt")  # fmt: skip
        mask = batch["attention_mask"] if self.use_attention_mask else None
        with torch.no_grad():
            out = self.model(batch["input_ids"], attention_mask=mask)
        embed = out[0].float()
        pooled = getattr(out, "pooler_output", None)
        pooled = (pooled if pooled is not None else out.text_embeds).float()
        return TextEncoding(embed, torch.ones(embed.shape[:2], dtype=torch.bool), pooled)


class DiffusersAutoencoder(nn.Module):
    """A diffusers AutoencoderKL as difflab's `Autoencoder`: encode(images in [-1, 1]) = the posterior mean, shifted
    by shift_factor (if the config has one) and times scaling_factor; decode(z) = vae.decode(z / scaling_factor +
    shift).sample. Frozen, in eval mode; gradients flow through it (for guidance on decoded images)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        config = vae.config
        self.factor = 2 ** (len(config.block_out_channels) - 1)
        self.latent_channels = int(config.latent_channels)
        self.image_channels = int(config.in_channels)
        self.scale_factor = float(config.scaling_factor)
        self.shift_factor = float(config.get("shift_factor") or 0.0)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        posterior = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        return ((posterior.mean - self.shift_factor) * self.scale_factor).to(images.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(self.vae.dtype) / self.scale_factor + self.shift_factor
        return self.vae.decode(z).sample.to(latents.dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(images))
