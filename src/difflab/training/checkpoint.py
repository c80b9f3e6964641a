"""Checkpoints: safetensors weights + config.json + training state, written atomically; safe loading.

Layout of a run folder:  RUN/config.json, RUN/train_log.jsonl, RUN/checkpoints/step_00001000/{config.json,
model.safetensors, ema.safetensors, training_state.safetensors, training_state.json}. A checkpoint is written
to a hidden temporary folder and renamed into place, so a crash mid-save leaves the previous one intact.
Weights are only ever read with safetensors: no pickle, so no code from a file is executed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from difflab.config import RunConfig
from difflab.errors import DifflabError

CHECKPOINT_DIR = "checkpoints"
_STEP_DIR = re.compile(r"^step_(\d+)$")
WEIGHT_FILES = ("model.safetensors", "ema.safetensors")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: Path, writer) -> None:
    writer(path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save_checkpoint(
    run_dir: Path,
    step: int,
    config: RunConfig,
    tensors: dict[str, dict[str, torch.Tensor]],
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write RUN/checkpoints/step_N atomically. tensors: file stem -> flat tensor dict; state: JSON-able."""
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for stem, flat in tensors.items():
            contiguous = {k: v.detach().contiguous().cpu() for k, v in flat.items()}
            _write(tmp / f"{stem}.safetensors", lambda p, t=contiguous: save_file(t, str(p)))
        _write(tmp / "config.json", lambda p: p.write_text(config.to_json()))
        _write(tmp / "training_state.json", lambda p: p.write_text(json.dumps(state, indent=2)))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed save leaves nothing half-written behind
        raise
    if final.exists():  # re-saving the same step: move the old one aside first
        old = root / f".old-{final.name}-{os.getpid()}"
        final.rename(old)
        shutil.rmtree(old)
    tmp.rename(final)
    _fsync_dir(root)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path, hint: str = "pass a run folder written by 'difflab train'") -> Path:
    """A run folder, a checkpoint folder or a weights file inside one -> the checkpoint folder; `hint` says what to
    do when there is none."""
    p = Path(path)
    if not p.exists():
        raise DifflabError(f"checkpoint '{p}' does not exist; {hint}")
    if p.is_file():
        if p.suffix != ".safetensors":
            raise DifflabError(
                f"'{p}' is not a .safetensors file; difflab only loads safetensors weights (never pickle files)"
            )
        p = p.parent
    if (p / "config.json").is_file() and any((p / w).is_file() for w in WEIGHT_FILES):
        return p
    latest = latest_checkpoint(p)
    if latest is None:
        raise DifflabError(f"'{p}' holds no difflab checkpoint (config.json + model.safetensors); {hint}")
    return latest


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file, turning any failure into a one-line DifflabError."""
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises several error types for corrupt input
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DifflabError(
            f"'{path}' is not a readable safetensors file ({first_line}); re-export the weights"
        ) from None


def load_config(ckpt_dir: Path) -> RunConfig:
    try:
        text = (Path(ckpt_dir) / "config.json").read_text()
        if '"difflab-noisy-classifier"' in text:
            raise DifflabError(
                f"'{ckpt_dir}' holds a noise-aware classifier, not a diffusion model; pass it as --classifier"
            )
        return RunConfig.from_json(text)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise DifflabError(f"'{ckpt_dir}/config.json' is not a valid difflab config ({err})") from None


def checkpoint_step(ckpt_dir: Path) -> int:
    """The training step a checkpoint folder was written at (0 if it records none)."""
    state = Path(ckpt_dir) / "training_state.json"
    return int(json.loads(state.read_text()).get("step", 0)) if state.exists() else 0


def optimizer_to_tensors(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Flatten torch optimizer state into safetensors-ready tensors plus JSON metadata."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, param_state in state["state"].items():
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of optimizer_to_tensors."""
    state: dict[int, dict[str, Any]] = {}
    for flat, value in [*tensors.items(), *meta["scalars"].items()]:
        idx, key = flat.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}
