"""Checks on weights files before and after they are read: a regular file (never a FIFO or a device, which could
hang or never end), a safetensors header whose tensor names, shapes and floating-point dtypes match the network the
config describes (compared before the network is built, so a damaged config.json or a wrong file allocates
nothing), and finite values. Every failure is one line naming the file and the tensor.

    expected = meta_state(lambda: build_network(config.model))   # shapes only: no memory
    check_header(path, expected)                                   # reads the header, not the data
    tensors = load_tensors(path)                                   # reads the data, refuses NaN/inf
"""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from difflab.errors import DifflabError
from difflab.limits import check_parameter_count

FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
_DAMAGED = "the checkpoint is damaged or belongs to another config; use another checkpoint or retrain"


def check_regular_file(path: str | Path, what: str = "weights file") -> None:
    """Refuse a missing path, a directory, a FIFO, a device or a link to one before anything opens it."""
    p = Path(path)
    try:
        mode = os.stat(p).st_mode  # follows symlinks: a link to /dev/zero is a device
    except OSError as err:
        raise DifflabError(f"{what} '{p}' cannot be read ({err.strerror}); pass an existing file") from None
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a special file"
        raise DifflabError(f"{what} '{p}' is {kind}, not a regular file; replace it with the file itself")


MAX_CONFIG_BYTES = 1 << 20  # a config.json is a few kB; a larger one is not read


def read_config_text(path: str | Path) -> str:
    """The text of a config.json: a regular file (never a FIFO or device) of at most MAX_CONFIG_BYTES."""
    check_regular_file(path, "config file")
    if Path(path).stat().st_size > MAX_CONFIG_BYTES:
        raise DifflabError(f"'{path}' is over {MAX_CONFIG_BYTES} bytes, not a difflab config; use another checkpoint")
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DifflabError(f"'{path}' cannot be read as text ({err}); use another checkpoint") from None


def meta_state(build: Callable[[], nn.Module], what: str = "the network") -> dict[str, torch.Tensor]:
    """The state dict `build()` would have, as meta tensors (shapes and dtypes, no memory); more than
    MAX_PARAMETERS values is refused (call it once the settings passed `difflab.limits.check_limits`)."""
    with torch.device("meta"):
        module = build()
    state = module.state_dict()
    check_parameter_count(sum(t.numel() for t in state.values()), what)
    return state


def read_header(path: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (safetensors dtype such as "F32", shape) of every tensor in a safetensors file, without reading data."""
    check_regular_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            names = f.keys()  # a safe_open handle is not iterable
            return {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in names}
    except Exception as err:  # safetensors raises several error types for corrupt input
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DifflabError(
            f"'{path}' is not a readable safetensors file ({first_line}); re-export the weights"
        ) from None


def _names(keys: set[str]) -> str:
    shown = sorted(keys)[:3]
    return ", ".join(f"'{k}'" for k in shown) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def check_header(path: str | Path, expected: dict[str, torch.Tensor]) -> None:
    """Refuse a weights file whose size, tensor names, shapes or dtypes differ from `expected` (a meta state dict),
    reading only its header."""
    header = read_header(path)
    have = sum(math.prod(shape) for _, shape in header.values())
    want = sum(t.numel() for t in expected.values())
    if have != want and not (0.5 < have / max(want, 1) < 2):
        raise DifflabError(
            f"'{path}' holds {have:,} values but config.json describes a network of {want:,}; {_DAMAGED}"
        )
    missing, unexpected = set(expected) - set(header), set(header) - set(expected)
    if missing:
        raise DifflabError(f"'{path}' lacks tensor {_names(missing)} that config.json's network has; {_DAMAGED}")
    if unexpected:
        raise DifflabError(f"'{path}' holds tensor {_names(unexpected)} that config.json's network lacks; {_DAMAGED}")
    for name, want_t in expected.items():
        dtype, shape = header[name]
        if shape != tuple(want_t.shape):
            raise DifflabError(
                f"'{path}': tensor '{name}' has shape {list(shape)} but config.json's network needs "
                f"{list(want_t.shape)}; {_DAMAGED}"
            )
        if want_t.is_floating_point() and dtype not in FLOAT_DTYPES:
            raise DifflabError(f"'{path}': tensor '{name}' is stored as {dtype}, not floating point; {_DAMAGED}")


def check_finite(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """Refuse floating-point tensors holding NaN or inf (a diverged or damaged checkpoint samples NaN)."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise DifflabError(
                f"'{path}': tensor '{name}' holds NaN/inf values; the checkpoint is damaged — use another checkpoint "
                "or retrain"
            )
