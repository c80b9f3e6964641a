"""Checkpoints: safetensors weights + config.json + training state, written atomically; safe loading.

Layout of a run folder:  RUN/config.json, RUN/train_log.jsonl, RUN/checkpoints/step_00001000/{config.json,
model.safetensors, ema.safetensors, training_state.safetensors, training_state.json}, RUN/.lock while a process
trains into it. A checkpoint is written to a hidden temporary folder and renamed into place, so a crash mid-save
leaves the previous one intact; re-saving a step deletes the old copy only once the new one is in place.
Weights are only ever read with safetensors: no pickle, so no code from a file is executed.
"""

from __future__ import annotations

import contextlib
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
from difflab.training.lock import LOCK_FILE

CHECKPOINT_DIR = "checkpoints"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_OLD_DIR = re.compile(r"^\.old-(step_(\d+))-\d+$")  # a copy moved aside while its step was re-saved
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


class NonFiniteCheckpoint(DifflabError):
    """A checkpoint would hold NaN or infinite weights; it is never written."""


def save_checkpoint(
    run_dir: Path,
    step: int,
    config: RunConfig,
    tensors: dict[str, dict[str, torch.Tensor]],
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write RUN/checkpoints/step_N atomically. tensors: file stem -> flat tensor dict; state: JSON-able.
    Re-saving a step moves the old copy aside, renames the new one into place, and only then deletes the old one:
    at every instant a complete copy of step N exists (`list_checkpoints` finds an aside copy too)."""
    _check_finite(step, tensors)
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
        _fsync_dir(tmp)
        _install(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed save leaves nothing half-written behind
        raise
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old)
    return final


def _check_finite(step: int, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
    for stem, flat in tensors.items():
        for key, value in flat.items():
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise NonFiniteCheckpoint(
                    f"refusing to write the checkpoint of step {step}: {stem} tensor '{key}' is not finite (the "
                    "run diverged); resume from the previous checkpoint with a lower --lr"
                )


def _install(tmp: Path, final: Path) -> None:
    """Rename the complete folder tmp to final; an existing final is deleted only once the new one is in place."""
    old = final.parent / f".old-{final.name}-{os.getpid()}"
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    try:
        os.rename(tmp, final)
    except BaseException:
        if old.exists() and not final.exists():
            with contextlib.suppress(OSError):
                os.rename(old, final)  # put the old copy back (a kill here is undone by recover_checkpoints)
        raise
    _fsync_dir(final.parent)
    if old.exists():
        with contextlib.suppress(OSError):
            shutil.rmtree(old)  # a leftover is removed by recover_checkpoints


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first. A step whose folder is missing but whose copy was moved
    aside by an interrupted re-save (.old-step_N-PID) is listed by that copy."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found: dict[int, Path] = {}
    aside: dict[int, Path] = {}
    for p in sorted(root.iterdir()):
        if (m := _STEP_DIR.match(p.name)) and p.is_dir():
            found[int(m.group(1))] = p
        elif (m := _OLD_DIR.match(p.name)) and p.is_dir():
            aside.setdefault(int(m.group(2)), p)
    for step, p in aside.items():
        found.setdefault(step, p)
    return [found[step] for step in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def recover_checkpoints(run_dir: Path) -> None:
    """Undo what a killed save left (call it holding the run's lock): a copy moved aside whose step folder is
    missing is renamed back, one whose step folder exists is deleted, and half-written temporary folders go."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return
    for p in sorted(root.iterdir()):
        if m := _OLD_DIR.match(p.name):
            final = root / m.group(1)
            if final.exists():
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.rename(p, final)
        elif p.name.startswith(".tmp-"):
            shutil.rmtree(p, ignore_errors=True)


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
    """Read a safetensors file, turning any failure into a one-line DifflabError: not a regular file (a FIFO or
    device is never opened), unreadable, or holding NaN/inf values (`difflab.weights`)."""
    from difflab.weights import check_finite, check_regular_file

    check_regular_file(path)
    try:
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises several error types for corrupt input
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DifflabError(
            f"'{path}' is not a readable safetensors file ({first_line}); re-export the weights"
        ) from None
    check_finite(tensors, path)
    return tensors


def load_config(ckpt_dir: Path) -> RunConfig:
    """The RunConfig of a checkpoint folder; a missing, special, oversized or invalid config.json is one line naming
    the file and the key."""
    from difflab.weights import read_config_text

    path = Path(ckpt_dir) / "config.json"
    text = read_config_text(path)
    try:
        if '"difflab-noisy-classifier"' in text:
            raise DifflabError(
                f"'{ckpt_dir}' holds a noise-aware classifier, not a diffusion model; pass it as --classifier"
            )
        if '"difflab-clip"' in text:
            raise DifflabError(f"'{ckpt_dir}' holds a CLIP (image-text embeddings), not a diffusion model")
        if '"difflab-autoencoder"' in text:
            raise DifflabError(
                f"'{ckpt_dir}' holds an autoencoder, not a diffusion model; train a latent model on it with "
                "`difflab train --autoencoder` and use that run"
            )
        return RunConfig.from_json(text)
    except (OSError, ValueError, TypeError, KeyError) as err:
        advice = "" if isinstance(err, DifflabError) else "; fix that key or use another checkpoint"
        raise DifflabError(f"'{path}' is not a valid difflab config ({err}){advice}") from None


def checkpoint_step(ckpt_dir: Path) -> int:
    """The training step a checkpoint folder was written at (0 if it records none)."""
    state = Path(ckpt_dir) / "training_state.json"
    return int(json.loads(state.read_text()).get("step", 0)) if state.exists() else 0


RESUME_FILES = ("model.safetensors", "ema.safetensors", "training_state.safetensors")


def checkpoint_problem(ckpt_dir: Path, required: tuple[str, ...] = RESUME_FILES) -> str | None:
    """Why a checkpoint folder cannot be resumed from (a missing or truncated file, unreadable JSON), or None. The
    safetensors files are checked against the sizes their headers give, without reading the weights."""
    ckpt_dir = Path(ckpt_dir)
    for name in ("config.json", "training_state.json"):
        try:
            values = json.loads((ckpt_dir / name).read_text())
        except (OSError, ValueError) as err:
            return f"{name}: {type(err).__name__}"
        if not isinstance(values, dict):
            return f"{name} is not a JSON object"
    for name in sorted({*required, *(p.name for p in ckpt_dir.glob("*.safetensors"))}):
        problem = _safetensors_problem(ckpt_dir / name)
        if problem:
            return f"{name}: {problem}"
    return None


def _safetensors_problem(path: Path) -> str | None:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or 8 + n > size:
                return f"truncated ({size} bytes)"
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as err:
        return f"unreadable ({type(err).__name__})"
    return None if 8 + n + end == size else f"{size} bytes where its header needs {8 + n + end}"


def resume_checkpoint(run_dir: Path) -> tuple[Path | None, str | None]:
    """The newest intact checkpoint of a run and a warning naming the corrupt newer ones, which are renamed to
    checkpoints/corrupt-step_N (kept for inspection, never pruned or resumed). Call it holding the run's lock."""
    recover_checkpoints(run_dir)
    corrupt = []
    for ckpt in reversed(list_checkpoints(run_dir)):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            break
        corrupt.append((ckpt, problem, _set_aside(ckpt)))
    else:
        ckpt = None
    if not corrupt:
        return ckpt, None
    named = "; ".join(f"'{c}' ({problem}) moved to '{aside.name}'" for c, problem, aside in corrupt)
    used = f"resuming from '{ckpt}' (step {checkpoint_step(ckpt)})" if ckpt else "no intact checkpoint is left"
    return ckpt, f"corrupt checkpoint {named}; {used}"


def _set_aside(ckpt: Path) -> Path:
    target = ckpt.parent / f"corrupt-{ckpt.name}"
    n = 1
    while target.exists():
        n += 1
        target = ckpt.parent / f"corrupt-{ckpt.name}-{n}"
    os.rename(ckpt, target)
    return target


def check_run_folder(run_dir: Path) -> None:
    """Refuse to write a run into a folder that is neither new, empty nor a difflab run (one whose config.json is a
    difflab config, or that holds checkpoints): it belongs to someone else, and its config.json would be lost."""
    p = Path(run_dir)
    if not p.exists():
        return
    if not p.is_dir():
        raise DifflabError(f"--out '{p}' is a file; pass a folder for the run")
    entries = sorted(e.name for e in p.iterdir() if e.name != LOCK_FILE)
    if not entries or list_checkpoints(p) or _is_difflab_config(p / "config.json"):
        return
    shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
    raise DifflabError(
        f"'{p}' is not empty and not a difflab run (no difflab config.json or checkpoints; it holds {shown}); "
        "pass a new or empty --out"
    )


def _is_difflab_config(path: Path) -> bool:
    try:
        text = path.read_text()
        if json.loads(text).get("format") in ("difflab-noisy-classifier", "difflab-autoencoder", "difflab-clip"):
            return True
        RunConfig.from_json(text)
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return False
    return True


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
