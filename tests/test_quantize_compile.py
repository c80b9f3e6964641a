"""int8 dynamic quantisation (torch's quantize_dynamic of nn.Linear; onnxruntime's of MatMul/Gemm) and torch.compile
for sampling (difflab.backends): each runs, changes what it says it changes, and stays close to the float model.

Closeness is measured on whole sampling runs of a class-conditional EDM MLP trained 150 steps on the moons (heun,
8 steps, CFG 2, 64 samples): max |backend - float| / max |float| and mean |backend - float| / mean |float|. Asserted:
int8 at most INT8_RTOL = 5e-2 (max) and INT8_MEAN_RTOL = 2e-2 (mean); measured (seeds 5, 6) torch 1.8e-2 .. 2.8e-2 and
1.0e-2, onnxruntime 1.1e-2 .. 1.7e-2 and 7e-3 .. 9e-3 (unguided: max 6e-3 .. 1.2e-2, mean 3e-3). Both quantise the
activations per tensor per batch (uint8) and the weights per output row with 7-bit range (x86's u8 x s8 products
saturate at 8 bits: onnxruntime without reduce_range measured 7e-2 .. 2e-1 on D alone); CFG's w = 2 triples a
branch's error. torch.compile: COMPILE_RTOL = 1e-5 (measured: inductor 2.6e-7 .. 4.6e-7; the eager backend 0).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, run_cli

import difflab
from difflab.backends import check_backend
from difflab.errors import DifflabError

INT8_RTOL, INT8_MEAN_RTOL = 5e-2, 2e-2
COMPILE_RTOL = 1e-5
SETTINGS = {"sampler": "heun", "steps": 8, "cond": {"class_label": 1}, "guidance": 2.0, "seed": 5}


def rel_err(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).abs().max()) / float(reference.abs().max())


def assert_int8_close(name: str, ours: torch.Tensor, reference: torch.Tensor) -> None:
    """Within the int8 tolerances, and not equal (the quantised model is the one that ran)."""
    worst, mean = rel_err(ours, reference), float((ours - reference).abs().mean() / reference.abs().mean())
    print(f"{name}: relative error max {worst:.1e}, mean {mean:.1e}")
    assert 0 < worst <= INT8_RTOL and mean <= INT8_MEAN_RTOL, (name, worst, mean)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    data = difflab.load_dataset("moons")
    config = difflab.run_config(data, process="edm", conditional=True, steps=150, seed=3)
    return difflab.train(config, tmp_path_factory.mktemp("quant") / "run", data=data, progress=False)


@pytest.fixture(scope="module")
def float_samples(trained_run):
    return difflab.load(trained_run).sample(64, **SETTINGS)


def test_torch_int8_quantises_the_linear_layers_and_stays_close(trained_run, float_samples):
    pipe = difflab.load(trained_run)
    int8 = pipe.with_backend("torch", quantize="int8")
    kinds = {type(m).__name__ for m in int8.denoiser.net.modules()}
    assert "Linear" in kinds and int8.denoiser.net.__class__.__name__ == "MLP"  # quantised (the dynamic Linear)
    assert {type(m) for m in int8.denoiser.net.modules()} & {torch.ao.nn.quantized.dynamic.Linear}
    assert not any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in pipe.denoiser.modules())  # untouched
    assert_int8_close("torch int8", int8.sample(64, **SETTINGS), float_samples)
    assert int8.backend.metadata() == {"backend": "torch", "quantize": "int8", "compile": False}


def test_onnxruntime_int8_stays_close_and_its_graph_is_integer(trained_run, float_samples, tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from difflab.interop.onnx_export import export_onnx

    pipe = difflab.load(trained_run)
    int8 = pipe.with_backend("onnxruntime", quantize="int8")
    assert int8.backend.quantize == "int8"
    assert_int8_close("onnxruntime int8", int8.sample(64, **SETTINGS), float_samples)
    # exported already quantised: the same graph, used as it is
    path = export_onnx(pipe, tmp_path / "int8.onnx", quantize="int8")
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "MatMulInteger" in ops and "Gemm" not in ops
    from_file = pipe.with_backend("onnxruntime", onnx=path)
    assert from_file.backend.quantize == "int8"
    torch.testing.assert_close(from_file.sample(64, **SETTINGS), int8.sample(64, **SETTINGS), rtol=0, atol=0)


def test_quantised_image_networks_run(tmp_path):
    """The U-Net's embeddings (noise level, pooled text) read their input dtype from a quantised Linear too."""
    from test_onnx import frozen_text_pipeline

    pipe = frozen_text_pipeline()
    int8 = pipe.with_backend("torch", quantize="int8")
    x, sigma = torch.randn(3, 1, 8, 8), torch.tensor([0.1, 1.0, 10.0])
    cond = {"text_embed": torch.randn(3, 4, 6), "text_mask": torch.ones(3, 4, dtype=torch.bool),
            "text_pooled": torch.randn(3, 5), "class_label": torch.tensor([0, 1, -1])}  # fmt: skip
    with torch.no_grad():
        err = rel_err(int8.denoiser(x, sigma, cond), pipe.denoiser(x, sigma, cond))
    assert 0 < err <= 0.1  # random weights of scale 0.2: a coarse check that it runs and means the same


def test_quantisation_refusals(trained_run):
    with pytest.raises(DifflabError, match="torch backend runs on the CPU only .* --backend onnxruntime"):
        check_backend("torch", quantize="int8", device="cuda")
    check_backend("onnxruntime", quantize="int8", device="cuda")  # onnxruntime quantises for any provider
    pipe = difflab.load(trained_run)
    with pytest.raises(DifflabError, match="already runs on torch int8 quantised"):
        pipe.with_backend("torch", quantize="int8").with_backend("torch", compile=True)
    assert pipe.with_backend("torch") is pipe


def test_compile_plumbing_with_the_eager_backend(trained_run, float_samples):
    """torch.compile's graph capture (dynamo) without code generation: fast, and exactly the float model."""
    compiled = difflab.load(trained_run).with_backend("torch", compile="eager")
    assert type(compiled.denoiser.net).__name__ == "OptimizedModule" and compiled.accepts == {"class_label"}
    err = rel_err(compiled.sample(64, **SETTINGS), float_samples)
    assert err <= COMPILE_RTOL
    assert compiled.backend.metadata() == {"backend": "torch", "quantize": None, "compile": True}


@pytest.fixture
def one_compile_thread():
    """No pool of compiler workers on a busy machine (inductor's own config.patch: its hidden settings cannot be
    monkeypatched back)."""
    import torch._inductor.config as inductor_config

    with inductor_config.patch(compile_threads=1):
        yield


@pytest.mark.slow
def test_cli_compile_and_quantize_stay_close(trained_run, tmp_path, capsys, one_compile_thread):
    """`difflab sample --compile` (inductor: C++ built with the system compiler, ~20-60 s on one busy core) and
    `--quantize int8`, against the float model through the same command."""
    common = ["sample", "--ckpt", trained_run, "--n", 64, "--sampler", "heun", "--steps", 8, "--class", "1",
              "--guidance", 2, "--seed", 5, "--threads", 1]  # fmt: skip
    results = {}
    for name, flags in (("float", []), ("compile", ["--compile"]), ("int8", ["--quantize", "int8"])):
        out = tmp_path / f"{name}.npy"
        code, _, err = run_cli(capsys, *common, *flags, "--out", out)
        assert code == 0, err
        results[name] = torch.from_numpy(np.load(out))
        meta = json.loads((tmp_path / f"{name}.npy.json").read_text())
        assert meta.get("compile", False) == (name == "compile") and meta.get("quantize") == ("int8" if name == "int8"
                                                                                               else None)  # fmt: skip
    compile_err = rel_err(results["compile"], results["float"])
    print(f"CLI --compile: relative error {compile_err:.1e}")
    assert compile_err <= COMPILE_RTOL
    assert_int8_close("CLI --quantize int8", results["int8"], results["float"])


def test_cli_quantize_on_cuda_is_refused_before_loading(trained_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the device check passes; the backend check does not
    code, _, err = run_cli(capsys, "sample", "--ckpt", trained_run, "--device", "cuda", "--quantize", "int8", "--n", 2,
                           "--out", tmp_path / "s.npy", "--threads", 1)  # fmt: skip
    assert_one_line_error(code, err, "--quantize int8 with the torch backend runs on the CPU only")


@pytest.mark.slow
def test_training_with_compile_follows_the_eager_weights(tmp_path, capsys, one_compile_thread):
    """`difflab train --compile` runs the loss through torch.compile (inductor): after 4 steps the weights are the
    eager run's to float rounding (measured 3.4e-7 after 5 steps on moons)."""
    from safetensors.torch import load_file
    from torch._dynamo.utils import counters

    runs, graphs = {}, {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        runs[name] = tmp_path / name
        counters.clear()
        code, _, err = run_cli(capsys, "train", "--data", "moons", "--out", runs[name], "--steps", "4", "--no-progress",
                               *extra)  # fmt: skip
        assert code == 0, err
        graphs[name] = counters["stats"]["unique_graphs"]
    assert graphs["eager"] == 0 and graphs["compiled"] >= 1  # dynamo did compile the compiled run's network
    eager, compiled = (load_file(runs[k] / "checkpoints" / "step_00000004" / "model.safetensors") for k in runs)
    assert max((eager[k] - compiled[k]).abs().max().item() for k in eager) < 1e-5
