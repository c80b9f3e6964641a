"""ONNX export of a whole sigma-space denoiser D(x, sigma[, cond]) -> x0_hat (Karras et al. 2022, Eq. 7: the
preconditioning and the sigma -> c_noise map are inside the graph), with a dynamic batch.

The graph's inputs are `x` (B, *model_shape) float32, `sigma` (B,) float32 and the model's condition signals by name
(sorted: class_label int64 (B,), text_tokens int64 (B, L), text_mask bool (B, L), ...); its output `denoised` (and
`variance`, the variance interpolation v, for a model that learns it). The file's metadata_props carry the difflab
config (JSON), the weights hash and the inputs, so that `onnx_runtime.load_onnx_denoiser` refuses a file of another
model. The TorchScript exporter (`dynamo=False`, opset 17) is used: torch 2.13's dynamo exporter failed on the DDPM
and conditional denoisers (data-dependent checks) and lost float64 precision in VP's t(sigma). Models of more than
2 GB (one protobuf) are not handled. `pip install 'difflab[onnx]'` (onnx, onnxruntime, onnxscript).

Quantisation (`QUANTIZATIONS`): "int8" is onnxruntime's dynamic quantisation of MatMul/Gemm (`quantize_onnx`);
"int8-static" its static quantisation of the convolutions, calibrated on the model's own sampling trajectories
(`quantize_onnx_static`, fed by `onnx_runtime.calibration_feeds`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from difflab.atomic import atomic_output, check_writable_file
from difflab.errors import DifflabError

ONNX_EXTRA = "pip install 'difflab[onnx]'"
OPSET = 17
FORMAT = "difflab-onnx-denoiser"
DYNAMIC_INT8, STATIC_INT8 = "int8", "int8-static"
QUANTIZATIONS = (DYNAMIC_INT8, STATIC_INT8)
# metadata_props keys
META_FORMAT, META_CONFIG, META_HASH = "difflab.format", "difflab.config", "difflab.weights_hash"
META_INPUTS, META_OUTPUTS, META_QUANTIZE = "difflab.inputs", "difflab.outputs", "difflab.quantize"
ONNX_TYPES = {"float32": "tensor(float)", "int64": "tensor(int64)", "bool": "tensor(bool)"}
TORCH_DTYPES = {"float32": torch.float32, "int64": torch.int64, "bool": torch.bool}


def import_onnx(what: str = "ONNX export") -> Any:
    """The onnx package, or a one-line DifflabError naming the extra."""
    try:
        import onnx
    except ImportError:
        raise DifflabError(f"{what} needs the onnx package: {ONNX_EXTRA}") from None
    return onnx


def import_onnxruntime(what: str = "the onnxruntime backend") -> Any:
    """The onnxruntime package, or a one-line DifflabError naming the extra."""
    try:
        import onnxruntime
    except ImportError:
        raise DifflabError(f"{what} needs onnxruntime: {ONNX_EXTRA}") from None
    return onnxruntime


@dataclass(frozen=True)
class InputSpec:
    """One input of the exported graph: its name, dtype (float32, int64, bool) and shape without the batch."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, value: Any) -> InputSpec:
        return cls(str(value["name"]), str(value["dtype"]), tuple(int(d) for d in value["shape"]))

    def __str__(self) -> str:
        return f"{self.name} {self.dtype} (B{''.join(f', {d}' for d in self.shape)})"


def describe_inputs(specs: Sequence[InputSpec]) -> str:
    return ", ".join(str(s) for s in specs)


def signal_input(pipe: Any, name: str) -> InputSpec:
    """The input of condition signal `name` for this model, sized from its config (`difflab.conditioning`)."""
    config, text = pipe.config, pipe.config.model.text
    settings, shape = config.model.settings, tuple(pipe.model_shape)
    sizes: dict[str, tuple[str, tuple[int, ...]]] = {"class_label": ("int64", ()), "low_res_noise": ("float32", ())}
    if text is not None:
        length = text.max_length
        sizes["text_tokens"], sizes["text_mask"] = ("int64", (length,)), ("bool", (length,))
        sizes["text_embed"], sizes["text_pooled"] = ("float32", (length, text.dim)), ("float32", (text.pooled_dim,))
    if getattr(settings, "image_embed_dim", None):
        sizes["image_embed"] = ("float32", (settings.image_embed_dim,))
    if config.upsampler is not None and getattr(settings, "low_res_channels", None):
        r = config.upsampler.low_res
        sizes["low_res"] = ("float32", (settings.low_res_channels, r, r))
    if getattr(settings, "inpaint_channels", None):
        sizes["mask"] = ("float32", (1, *shape[1:]))
        sizes["masked_image"] = ("float32", (settings.inpaint_channels, *shape[1:]))
    if name not in sizes:
        raise DifflabError(f"cannot export a model conditioned on '{name}' to ONNX (its input size is unknown here)")
    return InputSpec(name, *sizes[name])


def denoiser_inputs(pipe: Any) -> list[InputSpec]:
    """x, sigma, then the model's condition signals in sorted order: the inputs of its exported graph."""
    signals = [signal_input(pipe, name) for name in sorted(pipe.accepts)]
    return [InputSpec("x", "float32", tuple(pipe.model_shape)), InputSpec("sigma", "float32", ()), *signals]


def denoiser_outputs(pipe: Any) -> list[str]:
    return ["denoised", "variance"] if getattr(pipe.denoiser, "learns_variance", False) else ["denoised"]


def weights_fingerprint(pipe: Any) -> str:
    """The pipeline's `weights_hash()` (10 hex digits of the weights file's SHA-256); for a model built in memory
    (no file) 'state-' and the SHA-256 of its denoiser's tensors."""
    fingerprint = pipe.weights_hash()
    if fingerprint != "none":
        return fingerprint
    digest = hashlib.sha256()
    for name, tensor in sorted(pipe.denoiser.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return "state-" + digest.hexdigest()[:10]


def model_identity(pipe: Any) -> dict[str, Any]:
    """What an exported file must agree with: the network and formulation parts of the config (as JSON reads back)."""
    values = json.loads(pipe.config.to_json())
    return {"model": values["model"], "formulation": values["formulation"]}


class PositionalDenoiser(nn.Module):
    """D(x, sigma, *signals): the condition signals as positional inputs, as an ONNX graph takes them; with
    `with_variance` (a learned-variance model) the outputs (x0_hat, v) of `denoise_with_variance`."""

    def __init__(self, denoiser: nn.Module, signals: Sequence[str], with_variance: bool = False):
        super().__init__()
        self.denoiser, self.signals, self.with_variance = denoiser, tuple(signals), with_variance

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, *values: torch.Tensor) -> Any:
        cond = dict(zip(self.signals, values, strict=True)) or None
        if self.with_variance:
            return self.denoiser.denoise_with_variance(x, sigma, cond)
        return self.denoiser(x, sigma, cond)


def example_inputs(pipe: Any, specs: Sequence[InputSpec], batch: int = 2) -> tuple[torch.Tensor, ...]:
    """Inputs to trace with: x ~ N(0, 1), sigma at both ends of the model's range, valid non-null signals (label 0,
    every token a word, every mask position real); the traced graph does not depend on their values."""
    lo, hi = pipe.formulation.sigma_range()
    generator = torch.Generator().manual_seed(0)
    values = []
    for spec in specs:
        if spec.name == "sigma":
            values.append(torch.linspace(lo, hi, batch, dtype=torch.float64).float())
        elif spec.name == "x":
            values.append(torch.randn(batch, *spec.shape, generator=generator))
        else:
            fill = {"text_tokens": 2, "class_label": 0, "text_mask": True, "mask": 1.0}.get(spec.name, 0.0)
            values.append(torch.full((batch, *spec.shape), fill, dtype=TORCH_DTYPES[spec.dtype]))
    device = pipe.device
    return tuple(v.to(device) for v in values)


def _asinh_symbolic(g: Any, x: Any) -> Any:
    """asinh(x) = sign(x) log(|x| + sqrt(x^2 + 1)) (sub-VP's t(sigma)): the TorchScript exporter has no asinh, and
    ONNX Runtime's Asinh has no float64 kernel."""
    one = g.op("CastLike", g.op("Constant", value_t=torch.tensor(1.0)), x)
    size = g.op("Abs", x)
    root = g.op("Sqrt", g.op("Add", g.op("Mul", size, size), one))
    return g.op("Mul", g.op("Sign", x), g.op("Log", g.op("Add", size, root)))


@contextmanager
def traceable(denoiser: nn.Module) -> Iterator[None]:
    """The denoiser as the tracer must see it: gradients on, with its parameters requiring them (PyTorch's fused
    inference path of nn.TransformerEncoderLayer, taken without gradients, has no ONNX form, and a scratch text
    encoder's cache of its last encoding would be traced as a constant); the exporter's warnings silenced."""
    params = list(denoiser.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.register_custom_op_symbolic("aten::asinh", _asinh_symbolic, 9)
            yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


def trace_to_onnx(pipe: Any, out: Path, opset: int = OPSET) -> None:
    """Write the denoiser of `pipe` to `out` as an ONNX graph (no metadata yet)."""
    specs, outputs = denoiser_inputs(pipe), denoiser_outputs(pipe)
    module = PositionalDenoiser(pipe.denoiser, [s.name for s in specs[2:]], len(outputs) == 2).eval()
    names = [s.name for s in specs]
    axes = {name: {0: "batch"} for name in [*names, *outputs]}
    with traceable(pipe.denoiser):
        try:
            torch.onnx.export(module, example_inputs(pipe, specs), str(out), dynamo=False, opset_version=opset,
                              input_names=names, output_names=outputs, dynamic_axes=axes)  # fmt: skip
        except DifflabError:
            raise
        except Exception as err:  # an operator without an ONNX form, a model over 2 GB, ...
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise DifflabError(f"cannot export this {pipe.formulation.name} model to ONNX: {first}") from None


def set_metadata(model: Any, values: dict[str, str]) -> None:
    """Set (replace) metadata_props entries of an onnx ModelProto."""
    kept = [(p.key, p.value) for p in model.metadata_props if p.key not in values]
    del model.metadata_props[:]
    for key, value in [*kept, *values.items()]:
        model.metadata_props.add(key=key, value=value)


def metadata_of(pipe: Any, quantize: str | None) -> dict[str, str]:
    return {
        META_FORMAT: FORMAT,
        META_CONFIG: pipe.config.to_json(),
        META_HASH: weights_fingerprint(pipe),
        META_INPUTS: json.dumps([s.to_json() for s in denoiser_inputs(pipe)]),
        META_OUTPUTS: json.dumps(denoiser_outputs(pipe)),
        META_QUANTIZE: quantize or "none",
    }


def check_quantize(quantize: str | None) -> None:
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise DifflabError(f"unknown --quantize '{quantize}': choose {', '.join(QUANTIZATIONS)}")


@contextmanager
def quiet_root_logger() -> Iterator[None]:
    """onnxruntime.quantization logs its advice (pre-process the model, ...) on the root logger: errors only."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def carry_metadata(src: str | Path, dst: str | Path, quantize: str) -> Path:
    """Copy the difflab metadata of `src` onto the quantised `dst`, with difflab.quantize = `quantize`."""
    onnx = import_onnx()
    metadata = {p.key: p.value for p in onnx.load(str(src), load_external_data=False).metadata_props}
    model = onnx.load(str(dst))
    set_metadata(model, {k: v for k, v in metadata.items() if k.startswith("difflab.")} | {META_QUANTIZE: quantize})
    onnx.save(model, str(dst))
    return Path(dst)


def quantize_onnx(src: str | Path, dst: str | Path) -> Path:
    """onnxruntime's int8 dynamic quantisation of an exported denoiser: the weights of MatMul/Gemm (nn.Linear) int8,
    activations quantised per batch at run time (convolutions stay float, as with torch's quantize_dynamic of
    nn.Linear); the metadata is carried over with difflab.quantize = int8."""
    import_onnx("int8 quantisation of an ONNX model")
    import_onnxruntime("int8 quantisation of an ONNX model")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with quiet_root_logger():
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"],
                         per_channel=True, reduce_range=True)  # fmt: skip
    return carry_metadata(src, dst, DYNAMIC_INT8)


def check_has_convolutions(src: str | Path) -> None:
    """Static int8 quantises Conv nodes only: a graph without one (an MLP, a DiT) is refused in one line."""
    graph = import_onnx().load(str(src), load_external_data=False).graph
    if not any(node.op_type == "Conv" for node in graph.node):
        raise DifflabError(f"--quantize {STATIC_INT8} quantises the convolutions, and this network has none; use "
                           f"--quantize {DYNAMIC_INT8} (dynamic, the linear layers)")  # fmt: skip


def quantize_onnx_static(src: str | Path, dst: str | Path, calibration: Iterable[dict[str, Any]]) -> Path:
    """Static int8 quantisation of an exported denoiser's convolutions (Jacob et al. 2018, integer-arithmetic-only
    inference), by onnxruntime's quantize_static in QDQ form: each Conv's weights int8 per output channel, its input
    activations uint8 with one scale and zero point per tensor fixed from the min/max over `calibration` (feeds of the
    graph: `onnx_runtime.calibration_feeds`); onnxruntime fuses each QuantizeLinear-DequantizeLinear-Conv into
    QLinearConv. The weights keep a 7-bit range (reduce_range): x86's u8 x s8 products saturate at 8 bits (without it
    the digits model's FD rose 11 % instead of 4 %). Everything else (normalisation, attention, the preconditioning)
    stays float. The metadata is carried over with difflab.quantize = int8-static."""
    import_onnx("int8 quantisation of an ONNX model")
    import_onnxruntime("int8 quantisation of an ONNX model")
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    check_has_convolutions(src)

    class Feeds(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration)

        def get_next(self) -> dict[str, Any] | None:
            return next(self.batches, None)

    with quiet_root_logger():
        quantize_static(str(src), str(dst), Feeds(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["Conv"],
                        per_channel=True, reduce_range=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)  # fmt: skip
    return carry_metadata(src, dst, STATIC_INT8)


def quantize_for(pipe: Any, src: Path, quantize: str | None, work: Path) -> Path:
    """The float graph `src` of `pipe`'s denoiser quantised as asked, written into the folder `work` (None: `src`):
    "int8" dynamically (`quantize_onnx`), "int8-static" with calibration on the model's own sampling trajectories
    (`quantize_onnx_static`, `onnx_runtime.calibration_feeds`)."""
    check_quantize(quantize)
    if quantize == DYNAMIC_INT8:
        return quantize_onnx(src, work / "denoiser.int8.onnx")
    if quantize == STATIC_INT8:
        from difflab.interop.onnx_runtime import calibration_feeds

        check_has_convolutions(src)
        return quantize_onnx_static(src, work / "denoiser.int8-static.onnx", calibration_feeds(pipe))
    return src


def check_exportable(pipe: Any) -> None:
    """A pipeline on another backend (already ONNX, quantised or compiled) is not exported again."""
    from difflab.backends import backend_of

    backend = backend_of(pipe)
    if not backend.is_plain_torch:
        raise DifflabError(f"this pipeline runs on {backend.describe()}; export the model as loaded (difflab.load), "
                           "without --backend, --quantize or --compile")  # fmt: skip


def export_onnx(source: Any, out: str | Path, *, use_ema: bool = True, quantize: str | None = None,
                opset: int = OPSET) -> Path:  # fmt: skip
    """Write the whole denoiser of `source` (a Pipeline, or a run / checkpoint / weights path for difflab.load, EMA
    weights unless use_ema=False) to the ONNX file `out` (atomically): inputs x, sigma and the condition signals,
    dynamic batch, difflab metadata; `quantize` "int8" or "int8-static" quantises it (`quantize_for`). Returns
    `out`."""
    from difflab.pipeline import Pipeline, load

    onnx = import_onnx()
    check_quantize(quantize)
    out = check_writable_file(out, "--out")
    if out.suffix != ".onnx":
        raise DifflabError(f"--out '{out}' must end in .onnx")
    pipe = source if isinstance(source, Pipeline) else load(source, use_ema=use_ema)
    check_exportable(pipe)
    with tempfile.TemporaryDirectory(prefix="difflab-onnx-") as work:
        traced = Path(work) / "denoiser.onnx"
        trace_to_onnx(pipe, traced, opset)
        model = onnx.load(str(traced))
        set_metadata(model, metadata_of(pipe, None))
        onnx.save(model, str(traced))
        traced = quantize_for(pipe, traced, quantize, Path(work))
        with atomic_output(out) as tmp:
            tmp.write_bytes(traced.read_bytes())
    return out
