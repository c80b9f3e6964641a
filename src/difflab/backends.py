"""Sampling backends for deployment: a loaded Pipeline whose denoiser runs on ONNX Runtime, is int8-quantised
(dynamic quantisation: torch's quantize_dynamic of nn.Linear, or onnxruntime's of MatMul/Gemm; or onnxruntime's
static quantisation of the convolutions, calibrated on the model's own sampling trajectories) or compiled by
torch.compile; the grid, samplers, guidance, conditioning and outputs stay difflab's.

    pipe = difflab.load("runs/digits").with_backend("onnxruntime", onnx="digits.onnx", quantize="int8")
    pipe = difflab.load("runs/digits").with_backend("onnxruntime", quantize="int8-static")
    pipe = difflab.load("runs/digits").with_backend("torch", compile=True)

Only the network changes: for torch a shallow copy of the denoiser holds the quantised or compiled network (the
original pipeline is untouched); for onnxruntime an `OnnxDenoiser` replaces the whole denoiser (preconditioning
included), from a file of `difflab export --format onnx` or, without one, a temporary export of the model.
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from difflab.errors import DifflabError
from difflab.interop.onnx_export import QUANTIZATIONS, STATIC_INT8

if TYPE_CHECKING:
    from difflab.pipeline import Pipeline

BACKENDS = ("torch", "onnxruntime")


@dataclass(frozen=True)
class Backend:
    """Where a pipeline's denoiser runs: `name` (torch or onnxruntime), `quantize` (None, int8, or int8-static for
    onnxruntime), `compile` (False, or the torch.compile backend: "inductor" for --compile), `onnx` (the file, None
    for a temporary export)."""

    name: str = "torch"
    quantize: str | None = None
    compile: str | None = None
    onnx: str | None = None

    @property
    def is_plain_torch(self) -> bool:
        return self.name == "torch" and self.quantize is None and self.compile is None

    def describe(self) -> str:
        parts = [self.name] + ([f"{self.quantize} quantised"] if self.quantize else [])
        return " ".join(parts) + (f" (torch.compile, {self.compile})" if self.compile else "")

    def metadata(self) -> dict[str, Any]:
        """What a generated file records (nothing for plain torch): backend, quantize, compile."""
        if self.is_plain_torch:
            return {}
        return {"backend": self.name, "quantize": self.quantize, "compile": self.compile is not None}


def backend_of(pipe: Any) -> Backend:
    """The backend a pipeline runs on (plain torch unless `with_backend` made it)."""
    return getattr(pipe, "backend", None) or Backend()


def check_backend(backend: str = "torch", *, onnx: str | Path | None = None, quantize: str | None = None,
                  compile: bool | str = False, device: torch.device | str = "cpu") -> None:  # fmt: skip
    """The request alone, before a model is loaded: known names, --onnx only for onnxruntime, --compile only for
    torch, int8-static only for onnxruntime, torch's int8 only on the CPU."""
    if backend not in BACKENDS:
        raise DifflabError(f"unknown --backend '{backend}': choose {' or '.join(BACKENDS)}")
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise DifflabError(f"unknown --quantize '{quantize}': choose {', '.join(QUANTIZATIONS)}")
    if onnx is not None and backend != "onnxruntime":
        raise DifflabError("--onnx FILE runs the model on onnxruntime: add --backend onnxruntime")
    if quantize == STATIC_INT8 and backend != "onnxruntime":
        raise DifflabError(f"--quantize {STATIC_INT8} is onnxruntime's static quantisation of the convolutions: add "
                           "--backend onnxruntime (torch's backend has --quantize int8, dynamic)")  # fmt: skip
    if compile and backend != "torch":
        raise DifflabError("--compile compiles the torch network; it does not apply to --backend onnxruntime")
    if backend == "torch" and quantize is not None and torch.device(device).type != "cpu":
        raise DifflabError(f"--quantize {quantize} with the torch backend runs on the CPU only (torch's dynamic "
                           "quantisation has no CUDA kernels); use --device cpu, or --backend onnxruntime")  # fmt: skip


def with_backend(pipe: Pipeline, backend: str = "torch", *, onnx: str | Path | None = None,
                 quantize: str | None = None, compile: bool | str = False) -> Pipeline:  # fmt: skip
    """This model on another backend (a new Pipeline; this one is unchanged): "onnxruntime" runs the exported
    denoiser (`onnx`: a file from `difflab export --format onnx`, checked to be this model; None: exported to a
    temporary file first); quantize="int8" quantises the network's linear layers (torch: CPU only), "int8-static"
    (onnxruntime) its convolutions with activation ranges calibrated on its own samples; compile=True
    (or a torch.compile backend name) compiles the torch network (`compiled_denoiser`)."""
    check_backend(backend, onnx=onnx, quantize=quantize, compile=compile, device=pipe.device)
    current = backend_of(pipe)
    if not current.is_plain_torch:
        raise DifflabError(f"this pipeline already runs on {current.describe()}; load the model again to change it")
    if backend == "torch" and quantize is None and not compile:
        return pipe
    new = copy.copy(pipe)
    if backend == "onnxruntime":
        new.denoiser = onnx_denoiser(pipe, onnx, quantize)
        quantize = new.denoiser.quantize
    else:
        denoiser = pipe.denoiser
        if quantize is not None:
            denoiser = quantized_denoiser(denoiser)
        if compile:
            denoiser = compiled_denoiser(denoiser, "inductor" if compile is True else str(compile))
        new.denoiser = denoiser
    compile_backend = None if not compile else "inductor" if compile is True else str(compile)
    new.backend = Backend(backend, quantize, compile_backend, None if onnx is None else str(onnx))
    return new


def onnx_denoiser(pipe: Pipeline, onnx: str | Path | None, quantize: str | None) -> nn.Module:
    """The pipeline's denoiser on onnxruntime, from `onnx` or from a temporary export."""
    from difflab.interop.onnx_export import export_onnx
    from difflab.interop.onnx_runtime import load_onnx_denoiser

    if onnx is not None:
        return load_onnx_denoiser(pipe, onnx, quantize=quantize)
    with tempfile.TemporaryDirectory(prefix="difflab-onnx-") as work:
        path = export_onnx(pipe, Path(work) / "denoiser.onnx", quantize=quantize)
        return load_onnx_denoiser(pipe, path)


def with_network(denoiser: nn.Module, net: nn.Module) -> nn.Module:
    """A shallow copy of `denoiser` holding `net` as its network; the original keeps its own. A copy left without
    parameters (every layer quantised) gets an empty one, which keeps `Pipeline.device`."""
    twin = copy.copy(denoiser)
    twin._modules, twin._parameters, twin._buffers = dict(twin._modules), dict(twin._parameters), dict(twin._buffers)
    twin.net = net
    if next(twin.parameters(), None) is None:
        twin.anchor = nn.Parameter(torch.empty(0), requires_grad=False)
    return twin


def quantized_denoiser(denoiser: nn.Module) -> nn.Module:
    """The denoiser with its network's nn.Linear layers int8 dynamically quantised (torch.ao.quantization's
    quantize_dynamic: int8 weights, activations quantised per batch; convolutions stay float). CPU only."""
    device = next(denoiser.parameters()).device
    if device.type != "cpu":
        raise DifflabError("--quantize int8 with the torch backend runs on the CPU only; use --device cpu, or "
                           "--backend onnxruntime")  # fmt: skip
    if not any(isinstance(m, nn.Linear) for m in denoiser.net.modules()):
        raise DifflabError("this network has no linear layer to quantise (torch's int8 backend quantises nn.Linear)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice (torchao is its successor)
        quantization = torch.ao.quantization
        spec = {nn.Linear: quantization.per_channel_dynamic_qconfig}  # a scale per output row, as onnxruntime's
        net = quantization.quantize_dynamic(denoiser.net, spec, dtype=torch.qint8)
    return with_network(denoiser, net)


def compiled_denoiser(denoiser: nn.Module, backend: str = "inductor") -> nn.Module:
    """The denoiser with its network compiled by torch.compile. The first call compiles (tens of seconds on a CPU,
    where inductor builds C++ with the system compiler); the first other batch size (the last partial batch, a
    classifier-free-guidance batch of 2B) compiles once more with the batch dimension symbolic (torch's automatic
    dynamic shapes). dynamic=True, every dimension symbolic, fails in inductor on the U-Net's attention (torch 2.13)."""
    return with_network(denoiser, torch.compile(denoiser.net, backend=backend))
