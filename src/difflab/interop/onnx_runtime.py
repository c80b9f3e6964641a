"""ONNX Runtime as a sampling backend: `OnnxDenoiser` runs a denoiser exported by `onnx_export` through an
InferenceSession as the Denoiser D(x, sigma, cond) -> x0_hat, so every sampler, guidance wrapper and writer works on
it unchanged; `load_onnx_denoiser` first checks that the file is the pipeline's model (difflab metadata, the inputs,
the config, the weights hash) and refuses anything else in one line.

Tensors go through host memory (numpy) on every call; on a CUDA device the session uses onnxruntime's
CUDAExecutionProvider when that build is installed (onnxruntime-gpu), else the CPU provider. `calibration_feeds`
records the denoiser's inputs along the model's own sampling trajectories: the calibration data of static int8.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from difflab.conditioning import NULL_VALUES
from difflab.errors import DifflabError
from difflab.interop.onnx_export import (
    FORMAT,
    META_CONFIG,
    META_FORMAT,
    META_HASH,
    META_INPUTS,
    META_OUTPUTS,
    META_QUANTIZE,
    ONNX_TYPES,
    TORCH_DTYPES,
    InputSpec,
    check_quantize,
    denoiser_inputs,
    denoiser_outputs,
    describe_inputs,
    import_onnx,
    import_onnxruntime,
    model_identity,
    quantize_for,
    weights_fingerprint,
)

EXPORT_HINT = "export this model with `difflab export --ckpt RUN --format onnx --out FILE.onnx`"
CALIBRATION_SAMPLES, CALIBRATION_SEED, CALIBRATION_GUIDANCE = 32, 1_000_000, 2.0


class SignalsOnly(nn.Module):
    """Stands where a denoiser holds its network (`.net`): the signals it accepts, for `Pipeline.accepts`."""

    def __init__(self, accepts: frozenset[str]):
        super().__init__()
        self.accepts = frozenset(accepts)


class OnnxDenoiser(nn.Module):
    """D(x, sigma, cond) -> x0_hat through an onnxruntime InferenceSession of an exported denoiser. A missing signal
    is fed as its null (`difflab.conditioning.NULL_VALUES`), as the torch network reads a missing one; a model with a
    learned variance also gives `denoise_with_variance` -> (x0_hat, v). It holds no weights: an empty parameter keeps
    the pipeline's device."""

    def __init__(self, session: Any, inputs: Sequence[InputSpec], outputs: Sequence[str], accepts: frozenset[str],
                 device: torch.device | str = "cpu", quantize: str | None = None):  # fmt: skip
        super().__init__()
        self.session, self.inputs, self.outputs = session, list(inputs), list(outputs)
        self.net = SignalsOnly(accepts)
        self.learns_variance = len(self.outputs) == 2
        self.quantize = quantize
        self.anchor = nn.Parameter(torch.empty(0, device=device), requires_grad=False)

    def feeds(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any = None) -> dict[str, np.ndarray]:
        return graph_feeds(self.inputs, x, sigma, cond)

    def run(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any = None) -> list[torch.Tensor]:
        results = self.session.run(None, self.feeds(x, sigma, cond))
        return [torch.from_numpy(r).to(x.device, x.dtype) for r in results]

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any = None) -> torch.Tensor:
        return self.run(x, sigma, cond)[0]

    def denoise_with_variance(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any = None):
        """(x0_hat, v) of a learned-variance model (`difflab.adapters.LearnedVarianceDenoiser`)."""
        if not self.learns_variance:
            raise DifflabError("this ONNX model has no variance output")
        denoised, variance = self.run(x, sigma, cond)
        return denoised, variance


def graph_feeds(inputs: Sequence[InputSpec], x: torch.Tensor, sigma: Any, cond: Any = None) -> dict[str, np.ndarray]:
    """The exported graph's inputs for D(x, sigma, cond): x and sigma as float32 (a scalar sigma repeated over the
    batch), each signal in its dtype, nulls (`NULL_VALUES`) for missing signals; an unknown or misshapen signal is a
    one-line DifflabError."""
    batch, cond = x.shape[0], dict(cond or {})
    sigma = torch.as_tensor(sigma).reshape(-1)
    feeds = {"x": _numpy(x, torch.float32), "sigma": _numpy(sigma.expand(batch) if sigma.numel() == 1 else sigma,
                                                             torch.float32)}  # fmt: skip
    for spec in inputs[2:]:
        value = cond.pop(spec.name, None)
        if value is None:
            feeds[spec.name] = np.full((batch, *spec.shape), NULL_VALUES[spec.name], dtype=spec.dtype)
            continue
        array = _numpy(torch.as_tensor(value), TORCH_DTYPES[spec.dtype])
        if array.shape != (batch, *spec.shape):
            raise DifflabError(f"cond '{spec.name}' has shape {tuple(array.shape)}; the ONNX model takes "
                               f"{(batch, *spec.shape)}")  # fmt: skip
        feeds[spec.name] = array
    if cond:
        raise DifflabError(f"this ONNX model does not take {', '.join(sorted(cond))}")
    return feeds


def _numpy(t: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    return t.detach().to("cpu", dtype).contiguous().numpy()


def read_metadata(path: Path) -> dict[str, str]:
    """The difflab metadata of an ONNX file; a one-line DifflabError for a file that is not one difflab wrote."""
    onnx = import_onnx("the onnxruntime backend")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf's DecodeError and friends
        raise DifflabError(f"'{path}' is not an ONNX model ({type(err).__name__}); {EXPORT_HINT}") from None
    metadata = {p.key: p.value for p in model.metadata_props}
    if metadata.get(META_FORMAT) != FORMAT:
        raise DifflabError(f"'{path}' was not written by `difflab export --format onnx` (it has no difflab "
                           f"metadata); {EXPORT_HINT}")  # fmt: skip
    return metadata


def check_metadata(metadata: dict[str, str], pipe: Any, path: Path) -> list[InputSpec]:
    """The file's inputs, outputs, config and weights hash against the pipeline's; returns the inputs."""
    expected = denoiser_inputs(pipe)
    try:
        inputs = [InputSpec.from_json(v) for v in json.loads(metadata[META_INPUTS])]
        outputs = json.loads(metadata[META_OUTPUTS])
        identity = {k: json.loads(metadata[META_CONFIG])[k] for k in ("model", "formulation")}
    except (KeyError, TypeError, ValueError):
        raise DifflabError(f"'{path}' has damaged difflab metadata; {EXPORT_HINT}") from None
    if inputs != expected:
        raise DifflabError(f"'{path}' takes inputs {describe_inputs(inputs)} but this model takes "
                           f"{describe_inputs(expected)}: it was exported from another model; "
                           f"{EXPORT_HINT}")  # fmt: skip
    if outputs != denoiser_outputs(pipe):
        raise DifflabError(f"'{path}' gives {', '.join(outputs)} but this model {', '.join(denoiser_outputs(pipe))}"
                           f": it was exported from another model; {EXPORT_HINT}")  # fmt: skip
    ours = model_identity(pipe)
    differs = [k for k in ("model", "formulation") if identity[k] != ours[k]]
    if differs:
        raise DifflabError(f"'{path}' was exported from another model (its {' and '.join(differs)} config differs); "
                           f"{EXPORT_HINT}")  # fmt: skip
    fingerprint = weights_fingerprint(pipe)
    if metadata.get(META_HASH) != fingerprint:
        raise DifflabError(f"'{path}' was exported from other weights (hash {metadata.get(META_HASH)}, this model's "
                           f"{fingerprint}; EMA or raw weights?); {EXPORT_HINT}")  # fmt: skip
    return inputs


def make_session(path: Path, device: torch.device) -> Any:
    """An InferenceSession on the CUDA provider for a CUDA device when onnxruntime has it, else the CPU provider, with
    torch's intra-op thread count."""
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = torch.get_num_threads(), 1
    options.log_severity_level = 3  # errors only
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DifflabError(f"onnxruntime cannot load '{path}': {first}") from None


def check_session_inputs(session: Any, inputs: Sequence[InputSpec], path: Path) -> None:
    """The graph's own inputs (names, types, non-batch sizes) must be those its metadata names."""
    graph = [(i.name, i.type, tuple(i.shape[1:])) for i in session.get_inputs()]
    wanted = [(s.name, ONNX_TYPES[s.dtype], s.shape) for s in inputs]
    if graph != wanted:
        found = ", ".join(f"{name} {kind} {list(shape)}" for name, kind, shape in graph)
        raise DifflabError(f"the graph in '{path}' takes {found}, not the {describe_inputs(inputs)} its metadata "
                           f"names; {EXPORT_HINT}")  # fmt: skip


def stored_quantization(metadata: dict[str, str], quantize: str | None, path: Path) -> str | None:
    """The file's own quantisation (None: float); asking for another one than a quantised file holds is refused."""
    stored = metadata.get(META_QUANTIZE, "none")
    stored = None if stored == "none" else stored
    if quantize is not None and stored is not None and quantize != stored:
        raise DifflabError(f"'{path}' is already {stored} quantised; give the float export (`difflab export --format "
                           f"onnx` without --quantize) to quantise it {quantize}, or drop --quantize")  # fmt: skip
    return stored


def load_onnx_denoiser(pipe: Any, path: str | Path, *, quantize: str | None = None) -> OnnxDenoiser:
    """The OnnxDenoiser of file `path` for `pipe` (on the pipeline's device), after checking that the file is that
    model; quantize "int8" or "int8-static" quantises a float file first (`onnx_export.quantize_for`; a file exported
    with that --quantize is used as it is)."""
    check_quantize(quantize)
    path = Path(path)
    if not path.exists():
        raise DifflabError(f"no ONNX file at '{path}'; {EXPORT_HINT}")
    if not path.is_file():
        raise DifflabError(f"'{path}' is not a file; give the .onnx file `difflab export --format onnx` wrote")
    metadata = read_metadata(path)
    inputs = check_metadata(metadata, pipe, path)
    stored = stored_quantization(metadata, quantize, path)
    with tempfile.TemporaryDirectory(prefix="difflab-onnx-") as work:
        if stored is None:
            path, stored = quantize_for(pipe, path, quantize, Path(work)), quantize
        session = make_session(path, pipe.device)
    check_session_inputs(session, inputs, path)
    return OnnxDenoiser(session, inputs, denoiser_outputs(pipe), pipe.accepts, pipe.device, stored)


def calibration_settings(pipe: Any, n: int) -> dict[str, Any]:
    """How `calibration_feeds` samples: the model's default sampler, steps and grid, seeds CALIBRATION_SEED + i; a
    class-conditional model draws the labels 0..K-1 in turn with classifier-free guidance (w = 2), so that its
    labelled and its null-label batches are both recorded. Other signals (text, low_res, ...) are fed as nulls."""
    settings: dict[str, Any] = {"seed": CALIBRATION_SEED, "batch_size": n}
    if "class_label" in pipe.accepts and pipe.num_classes:
        labels = torch.arange(n) % pipe.num_classes
        settings |= {"cond": {"class_label": labels}, "guidance": CALIBRATION_GUIDANCE}
    return settings


@contextmanager
def recording_inputs(denoiser: nn.Module, inputs: Sequence[InputSpec]) -> Iterator[list[dict[str, np.ndarray]]]:
    """A list that fills with the graph feeds of every call of `denoiser` (forward, and `denoise_with_variance` for a
    learned-variance model) while the context is open."""
    recorded: list[dict[str, np.ndarray]] = []

    def record(x: torch.Tensor, sigma: Any, cond: Any = None) -> None:
        recorded.append(graph_feeds(inputs, x, sigma, cond))

    hook = denoiser.register_forward_pre_hook(lambda _, args, kwargs: record(*args, **kwargs), with_kwargs=True)
    with_variance = getattr(denoiser, "denoise_with_variance", None)

    def recorded_with_variance(*args: Any, **kwargs: Any) -> Any:
        record(*args, **kwargs)
        return with_variance(*args, **kwargs)

    if with_variance is not None:
        denoiser.denoise_with_variance = recorded_with_variance  # an instance attribute, deleted on the way out
    try:
        yield recorded
    finally:
        hook.remove()
        if with_variance is not None:
            del denoiser.denoise_with_variance


def calibration_feeds(pipe: Any, n: int = CALIBRATION_SAMPLES) -> list[dict[str, np.ndarray]]:
    """Static quantisation's calibration data, from the model itself: the inputs of its denoiser (x along the
    trajectory, sigma, the signals) at every step of sampling `n` images with fixed seeds (`calibration_settings`),
    as feeds of the exported graph. Deterministic: the same model gives the same feeds."""
    with recording_inputs(pipe.denoiser, denoiser_inputs(pipe)) as recorded, torch.no_grad():
        try:
            pipe.sample(n, **calibration_settings(pipe, n))
        except DifflabError as err:
            raise DifflabError(f"cannot calibrate int8-static on this model's own samples: {err}") from None
    return recorded
