"""Static int8 quantisation of the convolutions for the onnxruntime backend (`--quantize int8-static`;
difflab.interop.onnx_export.quantize_onnx_static, onnx_runtime.calibration_feeds): the calibration data are the
model's own sampling trajectories, the graph's convolutions are integer, and the result stays close to the float
ONNX model while a miscalibrated quantisation does not.

Model: a tiny class-conditional EDM U-Net (8 channels, 8x8) with random weights of scale 0.2 (difflab zero-initialises
output layers, which would hide whole paths). Closeness: max |int8 - float| / max |float|, on D at 12 noise levels
over the model's range (labels and the null label), and on whole sampling runs (heun, 8 steps, CFG 2, 32 samples; also
the mean error relative to the mean |float|). Asserted: D STATIC_RTOL = 3e-2, samples SAMPLE_RTOL = 0.15 and
SAMPLE_MEAN_RTOL = 3e-2. Measured (weight seeds 7, 8, 9, 11): D 1.3e-2; samples max 3.4e-2 .. 6.6e-2, mean 8.5e-3 ..
1.3e-2. The negative control, calibrated on x scaled by 1e-2 (activation ranges far too narrow: clipped), measured D
1.3e-1 and samples max 0.41 .. 0.76, mean 9.5e-2 .. 1.9e-1: beyond every tolerance.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, run_cli
from test_onnx import randomise

import difflab
from difflab.backends import check_backend
from difflab.config import DataConfig, RunConfig
from difflab.errors import DifflabError
from difflab.formulations import EDMConfig
from difflab.nets import ModelConfig
from difflab.nets.unet import UNetConfig
from difflab.pipeline import Pipeline

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from difflab.interop.onnx_export import export_onnx, quantize_onnx_static  # noqa: E402
from difflab.interop.onnx_runtime import calibration_feeds, load_onnx_denoiser  # noqa: E402

STATIC_RTOL, SAMPLE_RTOL, SAMPLE_MEAN_RTOL = 3e-2, 0.15, 3e-2
SETTINGS = {"sampler": "heun", "steps": 8, "cond": {"class_label": 1}, "guidance": 2.0, "seed": 5}


def rel_err(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).abs().max()) / float(reference.abs().max())


def mean_rel_err(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).abs().mean()) / float(reference.abs().mean())


def tiny_unet_pipeline(seed: int = 7) -> Pipeline:
    cfg = UNetConfig(in_channels=1, resolution=8, channels=8, channel_mult=(1, 2), num_res_blocks=1,
                     attention_resolutions=(4,), norm_groups=4, num_classes=3)  # fmt: skip
    config = RunConfig(DataConfig("toy", "images", (1, 8, 8), 8, 1), ModelConfig("unet", cfg), EDMConfig())
    return randomise(Pipeline(config), seed=seed)


@pytest.fixture(scope="module")
def pipe():
    return tiny_unet_pipeline()


@pytest.fixture(scope="module")
def files(pipe, tmp_path_factory):
    """The float export, its int8-static export, and the same quantisation miscalibrated (x scaled by 1e-2)."""
    folder = tmp_path_factory.mktemp("static_int8")
    float_file = export_onnx(pipe, folder / "float.onnx")
    static_file = export_onnx(pipe, folder / "static.onnx", quantize="int8-static")
    narrow = [{**feeds, "x": feeds["x"] * 1e-2} for feeds in calibration_feeds(pipe)]
    miscalibrated = quantize_onnx_static(float_file, folder / "miscalibrated.onnx", narrow)
    return {"float": float_file, "static": static_file, "miscalibrated": miscalibrated}


def denoised_across(pipe: Pipeline, path) -> torch.Tensor:
    """D of the file at 12 noise levels spread geometrically over the model's range, labels 0, 1, 2 and null."""
    g = torch.Generator().manual_seed(1)
    lo, hi = pipe.formulation.sigma_range()
    sigma = torch.logspace(np.log10(lo), np.log10(hi), 12).float()
    x = torch.rand(12, 1, 8, 8, generator=g) * 2 - 1 + sigma.view(-1, 1, 1, 1) * torch.randn(12, 1, 8, 8, generator=g)
    with torch.no_grad():
        return load_onnx_denoiser(pipe, path)(x, sigma, {"class_label": torch.tensor([0, 1, 2, -1] * 3)})


def test_calibration_feeds_are_the_models_own_trajectories(pipe):
    feeds = calibration_feeds(pipe)
    assert len(feeds) == pipe.sampling_defaults()["steps"]  # ddim: one denoiser call per step
    assert [sorted(f) for f in feeds[:1]] == [["class_label", "sigma", "x"]]
    labels = feeds[0]["class_label"]
    assert labels.shape == (64,) and set(labels[:32]) == {0, 1, 2} and set(labels[32:]) == {-1}  # CFG's two halves
    sigmas = [float(f["sigma"][0]) for f in feeds]
    lo, hi = pipe.formulation.sigma_range()
    assert sigmas == sorted(sigmas, reverse=True) and sigmas[0] == pytest.approx(hi) and sigmas[-1] < 10 * lo
    assert float(feeds[0]["x"].std()) == pytest.approx(hi, rel=0.2)  # pure noise at sigma_max
    again = calibration_feeds(pipe)
    assert all(np.array_equal(a["x"], b["x"]) for a, b in zip(feeds, again, strict=True))  # fixed seeds


def test_the_convolutions_are_quantised_and_run_as_qlinearconv(files, tmp_path):
    graph = onnx.load(str(files["static"])).graph
    producer = {out: node.op_type for node in graph.node for out in node.output}
    consumers = Counter(node.op_type for node in graph.node for name in node.input if producer.get(name) == "Conv")
    convs = [node for node in graph.node if node.op_type == "Conv"]
    assert len(convs) == sum(n.op_type == "Conv" for n in onnx.load(str(files["float"])).graph.node) > 0
    for node in convs:  # input, weight and bias dequantised from int8, the output quantised again
        assert [producer.get(name) for name in node.input] == ["DequantizeLinear"] * 3, node.name
    assert consumers == {"QuantizeLinear": len(convs)}
    weights = {i.name: i for i in graph.initializer}
    assert any(w.data_type == onnx.TensorProto.INT8 and len(w.dims) == 4 for w in weights.values())
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath, options.log_severity_level = str(tmp_path / "optimised.onnx"), 3
    ort.InferenceSession(str(files["static"]), options, providers=["CPUExecutionProvider"])
    fused = Counter(node.op_type for node in onnx.load(str(tmp_path / "optimised.onnx")).graph.node)
    assert fused["QLinearConv"] == len(convs) and fused["Conv"] == 0  # onnxruntime runs them in integer arithmetic


def test_static_int8_stays_close_to_the_float_model_and_miscalibration_does_not(pipe, files):
    reference = denoised_across(pipe, files["float"])
    static, miscalibrated = (rel_err(denoised_across(pipe, files[k]), reference) for k in ("static", "miscalibrated"))
    print(f"D: int8-static {static:.1e}, miscalibrated {miscalibrated:.1e}")
    assert 0 < static <= STATIC_RTOL < miscalibrated
    samples = {k: pipe.with_backend("onnxruntime", onnx=files[k]).sample(32, **SETTINGS) for k in files}
    errors = {k: (rel_err(samples[k], samples["float"]), mean_rel_err(samples[k], samples["float"]))
              for k in ("static", "miscalibrated")}  # fmt: skip
    print(f"samples (max, mean): {errors}")
    assert 0 < errors["static"][0] <= SAMPLE_RTOL and errors["static"][1] <= SAMPLE_MEAN_RTOL
    assert errors["miscalibrated"][0] > SAMPLE_RTOL and errors["miscalibrated"][1] > SAMPLE_MEAN_RTOL


def test_with_backend_quantises_a_float_file_and_records_it(pipe, files):
    static = pipe.with_backend("onnxruntime", onnx=files["float"], quantize="int8-static")
    assert static.backend.quantize == "int8-static" and static.denoiser.quantize == "int8-static"
    assert static.backend.metadata() == {"backend": "onnxruntime", "quantize": "int8-static", "compile": False}
    from_file = pipe.with_backend("onnxruntime", onnx=files["static"])  # already quantised: used as it is
    assert from_file.backend.quantize == "int8-static"
    torch.testing.assert_close(static.sample(8, **SETTINGS), from_file.sample(8, **SETTINGS), rtol=0, atol=0)


def test_static_int8_refusals(pipe, files, tmp_path):
    with pytest.raises(DifflabError, match="int8-static is onnxruntime's .* add --backend onnxruntime"):
        check_backend("torch", quantize="int8-static")
    with pytest.raises(DifflabError, match="unknown --quantize 'int4': choose int8, int8-static"):
        check_backend("onnxruntime", quantize="int4")
    with pytest.raises(DifflabError, match="already int8-static quantised; give the float export"):
        pipe.with_backend("onnxruntime", onnx=files["static"], quantize="int8")
    mlp = Pipeline(difflab.run_config(difflab.load_dataset("moons"), process="edm"))
    with pytest.raises(DifflabError, match="the convolutions, and this network has none; use --quantize int8"):
        mlp.with_backend("onnxruntime", quantize="int8-static")


def test_cli_sample_with_int8_static(tmp_path, capsys):
    run = difflab.train(difflab.run_config(difflab.load_dataset("digits"), model="tiny", steps=2, batch_size=4),
                        tmp_path / "run", progress=False)  # fmt: skip
    capsys.readouterr()  # training's own notices
    common = ["sample", "--ckpt", run, "--n", 4, "--steps", 4, "--threads", 1]
    code, _, err = run_cli(capsys, *common, "--quantize", "int8-static", "--out", tmp_path / "torch.npy")
    assert_one_line_error(code, err, "--quantize int8-static is onnxruntime's static quantisation")
    out = tmp_path / "static.npy"
    code, _, err = run_cli(capsys, *common, "--backend", "onnxruntime", "--quantize", "int8-static", "--out", out)
    assert code == 0, err
    assert np.load(out).shape == (4, 1, 8, 8)
    assert json.loads((tmp_path / "static.npy.json").read_text())["quantize"] == "int8-static"
