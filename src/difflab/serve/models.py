"""The models a server offers: the run folders found under one folder, each offered by its folder name (a request
names a model, never a path), loaded once at start so a broken folder is reported then and skipped."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from difflab.errors import DifflabError

log = logging.getLogger("difflab.serve")

CONDITIONINGS = {frozenset(): "unconditional", frozenset({"class_label"}): "class"}


@dataclass
class ServedModel:
    """One model the server offers: its name, pipeline and what it is conditioned on."""

    name: str
    pipe: Any  # difflab.pipeline.Pipeline
    conditioning: str  # "unconditional", "class" or "text"

    def describe(self) -> dict[str, Any]:
        """What GET /api/models shows of it."""
        defaults = self.pipe.sampling_defaults()
        shape = self.pipe.sample_shape
        return {"name": self.name, "conditioning": self.conditioning, "num_classes": self.pipe.num_classes,
                "size": list(shape[-2:]), "channels": shape[0], "default_sampler": defaults["sampler"],
                "default_steps": defaults["steps"], "step": self.pipe.step}  # fmt: skip


def conditioning_of(pipe: Any) -> str | None:
    """ "unconditional", "class" or "text" for the models a prompt-or-class request can drive; None for the rest
    (upsamplers, inpainting models, unCLIP decoders, 2-D toys), which need inputs the server does not take."""
    if pipe.config.data.kind != "images":
        return None
    accepts = frozenset(pipe.accepts)
    if pipe.config.model.text is not None and accepts <= {"text_tokens", "text_embed", "text_mask", "text_pooled"}:
        return "text"
    return CONDITIONINGS.get(accepts)


def find_models(folder: str | Path, device: torch.device) -> dict[str, ServedModel]:
    """The run folders directly under `folder` (those holding a config.json), loaded on `device`, by folder name.
    Folders that fail to load or that the server cannot drive are logged and skipped; none at all is an error."""
    from difflab.loading import load

    folder = Path(folder)
    if not folder.is_dir():
        raise DifflabError(f"--models '{folder}' is not a folder; pass the folder that holds your run folders")
    models = {}
    for run in sorted(p for p in folder.iterdir() if p.is_dir() and (p / "config.json").is_file()):
        try:
            pipe = load(run, device=device)
        except DifflabError as err:
            log.warning("skipping %s: %s", run.name, err)
            continue
        conditioning = conditioning_of(pipe)
        if conditioning is None:
            log.warning("skipping %s: it needs inputs other than a prompt or a class (%s)", run.name, pipe)
            continue
        models[run.name] = ServedModel(run.name, pipe, conditioning)
    if not models:
        raise DifflabError(f"no model the server can run under '{folder}': put run folders of `difflab train` (image "
                           "models: unconditional, class or text) directly in it")  # fmt: skip
    return models
