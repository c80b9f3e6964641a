"""ONNX export of the whole denoiser and the onnxruntime sampling backend (difflab.interop.onnx_export/onnx_runtime,
difflab.backends): the exported graph against torch for every formulation, conditional and text models, sampling
through `Pipeline.with_backend`, the CLI (`difflab export`, `difflab sample --backend onnxruntime`) and the refusals.

Agreement is max |onnxruntime - torch| / max |torch| over a batch whose size (5) differs from the traced one (2), at
noise levels across the model's whole range, with labels and captions (the null ones included) other than the traced
ones. Asserted: RTOL = 1e-5 for D and for whole sampling runs. Measured (torch 2.13 CPU, onnxruntime 1.32): points
MLPs of every formulation 7e-8 .. 1.1e-6, U-Net (class, scratch text, frozen text) 1.3e-7 .. 4.7e-7, DiT 4.8e-6 (the
largest); sampling (heun with CFG, ddpm with the learned variance) 3e-7 .. 5e-7. Both run the same float32 graph; the
float64 sigma -> t lookup (DDPM, VP) is float64 in the graph too. A wrong c_in, c_noise, prediction or condition is
1e-2 or more (random weights of scale 0.2 make every path reach the output; feeding null labels measured 2e-2).
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, run_cli

import difflab
from difflab.config import DataConfig, RunConfig
from difflab.errors import DifflabError
from difflab.formulations import DDPMConfig
from difflab.nets import ModelConfig
from difflab.nets.unet import UNetConfig
from difflab.pipeline import Pipeline
from difflab.schedules import DiscreteSchedule
from difflab.sigmas import sigma_to_t
from difflab.text.conditioned import FrozenTextConfig

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from difflab.interop.onnx_export import META_HASH, export_onnx, weights_fingerprint  # noqa: E402
from difflab.interop.onnx_runtime import load_onnx_denoiser  # noqa: E402

RTOL = 1e-5
MEASURED: dict[str, float] = {}  # printed by `pytest -s`: the relative errors behind RTOL


def rel_err(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).abs().max()) / float(reference.abs().max())


def randomise(pipe: Pipeline, scale: float = 0.2, seed: int = 7) -> Pipeline:
    """Every weight random (difflab zero-initialises output layers, which would hide whole paths)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pipe.denoiser.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return pipe


@pytest.fixture(scope="module")
def moons():
    return difflab.load_dataset("moons")


def points_pipeline(data, process: str, seed: int = 7, **settings) -> Pipeline:
    return randomise(Pipeline(difflab.run_config(data, process=process, **settings)), seed=seed)


def inputs_across(pipe: Pipeline, batch: int = 5, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """x = x0 + sigma n at `batch` noise levels spread geometrically over the model's range."""
    lo, hi = pipe.formulation.sigma_range()
    sigma = torch.logspace(np.log10(lo), np.log10(hi), batch).float()
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(batch, *pipe.model_shape, generator=g) * 2 - 1
    shape = (batch,) + (1,) * len(pipe.model_shape)
    return x0 + sigma.reshape(shape) * torch.randn(x0.shape, generator=g), sigma


def compare_denoisers(name: str, pipe: Pipeline, path, cond=None) -> float:
    """Export `pipe` to `path`, run both on the same inputs; the relative error (also recorded in MEASURED)."""
    export_onnx(pipe, path)
    ours = load_onnx_denoiser(pipe, path)
    x, sigma = inputs_across(pipe)
    with torch.no_grad():
        want = pipe.denoiser(x, sigma, cond)
        got = ours(x, sigma, cond)
    err = rel_err(got, want)
    if getattr(pipe.denoiser, "learns_variance", False):
        with torch.no_grad():
            err = max(err, rel_err(ours.denoise_with_variance(x, sigma, cond)[1],
                                   pipe.denoiser.denoise_with_variance(x, sigma, cond)[1]))  # fmt: skip
    MEASURED[name] = err
    print(f"{name}: relative error {err:.1e}")
    return err


def test_sigma_to_t_counts_table_entries_exactly_as_searchsorted():
    """The exportable bracket (entries below the value) gives searchsorted-left's t bit for bit, at table entries,
    between them, outside the table and for any input shape."""
    table = DiscreteSchedule.from_name("cosine", 1000).sigmas
    g = torch.Generator().manual_seed(0)
    values = torch.cat([torch.exp(torch.randn(4000, generator=g, dtype=torch.float64) * 4), table, table[:7] / 3,
                        torch.tensor([0.0, 1e-40, 1e12])])  # fmt: skip

    def searchsorted_t(sigma):
        log_table = table.log()
        log_sigma = sigma.double().clamp_min(1e-30).log().clamp(log_table[0], log_table[-1]).reshape(-1)
        hi = torch.searchsorted(log_table, log_sigma).clamp(1, len(table) - 1)
        frac = (log_sigma - log_table[hi - 1]) / (log_table[hi] - log_table[hi - 1])
        return ((hi - 1).double() + frac).reshape(sigma.shape).to(sigma.dtype)

    for sigma in (values, values.float(), values[:12].float().reshape(3, 4)):
        assert torch.equal(sigma_to_t(sigma, table), searchsorted_t(sigma))


@pytest.mark.parametrize(
    ("process", "settings"),
    [("ddpm", {}), ("ddpm", {"prediction": "v"}), ("ddpm", {"prediction": "x0", "schedule": "cosine"}),
     ("ddpm", {"learn_sigma": True, "hybrid_loss": True}), ("vp", {}), ("subvp", {}), ("ve", {}), ("edm", {}),
     ("pfgmpp", {"aug_dim": 128}), ("pfgm", {}), ("ct", {})],
    ids=["ddpm-eps", "ddpm-v", "ddpm-x0", "ddpm-learned-variance", "vp", "subvp", "ve", "edm", "pfgmpp", "pfgm", "ct"],
)  # fmt: skip
def test_every_formulation_exports_and_matches_torch(moons, tmp_path, process, settings):
    pipe = points_pipeline(moons, process, **settings)
    assert compare_denoisers(f"{process}{settings}", pipe, tmp_path / "d.onnx") <= RTOL


def test_a_class_conditional_model_matches_with_labels_nulls_and_no_condition(moons, tmp_path):
    pipe = points_pipeline(moons, "edm", conditional=True)
    labels = {"class_label": torch.tensor([1, 0, -1, 1, 0])}
    assert compare_denoisers("edm-class", pipe, tmp_path / "d.onnx", labels) <= RTOL
    assert compare_denoisers("edm-class-none", pipe, tmp_path / "d.onnx", None) <= RTOL  # missing = the null label
    graph = onnx.load(str(tmp_path / "d.onnx"))
    assert [i.name for i in graph.graph.input] == ["x", "sigma", "class_label"]
    meta = {p.key: p.value for p in graph.metadata_props}
    assert json.loads(meta["difflab.config"])["formulation"]["name"] == "edm" and meta[META_HASH].startswith("state-")
    assert json.loads(meta["difflab.inputs"])[2] == {"name": "class_label", "dtype": "int64", "shape": []}


def test_image_models_match_unet_dit_and_a_scratch_text_model(tmp_path, small_shapes):
    digits = difflab.load_dataset("digits")
    labels = {"class_label": torch.tensor([3, -1, 0, 9, 5])}
    unet = randomise(Pipeline(difflab.run_config(digits, process="ddpm", conditional=True)))
    assert compare_denoisers("unet-class", unet, tmp_path / "unet.onnx", labels) <= RTOL
    dit = randomise(Pipeline(difflab.run_config(digits, process="edm", model="dit-tiny", conditional=True)))
    assert compare_denoisers("dit-class", dit, tmp_path / "dit.onnx", labels) <= RTOL
    text = randomise(Pipeline(difflab.run_config(small_shapes, process="ddpm", text_encoder="scratch")))
    prompts = ["a red circle", "", small_shapes.captions[0], small_shapes.captions[1], "a red circle"]
    tokens = text.text_cond(prompts, 5)
    assert compare_denoisers("unet-scratch-text", text, tmp_path / "text.onnx", tokens) <= RTOL


def frozen_text_pipeline(seed: int = 7) -> Pipeline:
    """A tiny class- and frozen-text-conditional U-Net: float, bool (text_mask) and int64 inputs; no encoder needed."""
    cfg = UNetConfig(in_channels=1, resolution=8, channels=8, channel_mult=(1, 2), num_res_blocks=1,
                     attention_resolutions=(4,), norm_groups=4, num_classes=3, context_dim=6, pooled_dim=5)  # fmt: skip
    text = FrozenTextConfig("minilm", "test", dim=6, pooled_dim=5, max_length=4)
    data = DataConfig("toy", "images", (1, 8, 8), 8, 1)
    config = RunConfig(data, ModelConfig("unet", cfg, text=text), DDPMConfig("linear", 1000))
    return randomise(Pipeline(config), seed=seed)


def test_a_frozen_text_model_takes_embeddings_masks_and_labels(tmp_path):
    pipe = frozen_text_pipeline()
    g = torch.Generator().manual_seed(3)
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    cond = {"text_embed": torch.randn(5, 4, 6, generator=g) * mask[..., None], "text_mask": mask,
            "text_pooled": torch.randn(5, 5, generator=g), "class_label": torch.tensor([0, -1, 2, 1, 0])}  # fmt: skip
    assert compare_denoisers("unet-frozen-text", pipe, tmp_path / "d.onnx", cond) <= RTOL
    names = [i.name for i in onnx.load(str(tmp_path / "d.onnx")).graph.input]
    assert names == ["x", "sigma", "class_label", "text_embed", "text_mask", "text_pooled"]


def test_sampling_on_onnxruntime_matches_torch_and_leaves_the_pipeline_alone(moons, tmp_path):
    pipe = points_pipeline(moons, "edm", conditional=True)
    fast = pipe.with_backend("onnxruntime")  # exported to a temporary file
    assert fast.accepts == {"class_label"} and fast.device == pipe.device and fast.backend.name == "onnxruntime"
    assert type(pipe.denoiser).__name__ == "PreconditionedDenoiser" and not hasattr(pipe, "backend")
    settings = {"sampler": "heun", "steps": 6, "cond": {"class_label": torch.tensor([0, 1, 1, 0, 1])}, "guidance": 2.5}
    err = rel_err(fast.sample(5, seed=3, **settings), pipe.sample(5, seed=3, **settings))
    variance = points_pipeline(moons, "ddpm", learn_sigma=True, hybrid_loss=True)
    export_onnx(variance, tmp_path / "v.onnx")
    ddpm = {"sampler": "ddpm", "steps": 10, "seed": 1}  # the learned variance's own step
    err_v = rel_err(variance.with_backend("onnxruntime", onnx=tmp_path / "v.onnx").sample(6, **ddpm),
                    variance.sample(6, **ddpm))  # fmt: skip
    MEASURED.update({"sample-heun-cfg": err, "sample-ddpm-learned-variance": err_v})
    print(f"sampling: relative errors {err:.1e} (heun, CFG), {err_v:.1e} (ddpm, learned variance)")
    assert err <= RTOL and err_v <= RTOL
    with pytest.raises(DifflabError, match="already runs on onnxruntime; load the model again"):
        fast.with_backend("torch", quantize="int8")
    with pytest.raises(DifflabError, match="runs on onnxruntime; export the model as loaded"):
        export_onnx(fast, tmp_path / "again.onnx")


def test_files_of_other_models_and_other_files_are_refused_in_one_line(moons, tmp_path):
    pipe = points_pipeline(moons, "edm")
    export_onnx(pipe, tmp_path / "mine.onnx")
    with pytest.raises(DifflabError, match="no ONNX file at"):
        load_onnx_denoiser(pipe, tmp_path / "missing.onnx")
    with pytest.raises(DifflabError, match="is not a file"):
        load_onnx_denoiser(pipe, tmp_path)
    (tmp_path / "text.onnx").write_text("not a model\n" * 20)
    with pytest.raises(DifflabError, match="is not an ONNX model"):
        load_onnx_denoiser(pipe, tmp_path / "text.onnx")
    with pytest.warns(DeprecationWarning):  # the TorchScript exporter's notice
        torch.onnx.export(torch.nn.Linear(2, 2), (torch.zeros(1, 2),), str(tmp_path / "plain.onnx"), dynamo=False)
    with pytest.raises(DifflabError, match="was not written by `difflab export --format onnx`"):
        load_onnx_denoiser(pipe, tmp_path / "plain.onnx")
    conditional = points_pipeline(moons, "edm", conditional=True)
    with pytest.raises(
        DifflabError,
        match=r"takes inputs x float32 \(B, 2\), sigma float32 \(B\) but this model "
        r"takes .*class_label int64 \(B\): it was exported from another model",
    ):
        load_onnx_denoiser(conditional, tmp_path / "mine.onnx")
    with pytest.raises(DifflabError, match="its formulation config differs"):
        load_onnx_denoiser(points_pipeline(moons, "ve"), tmp_path / "mine.onnx")
    other_weights = points_pipeline(moons, "edm", seed=8)
    with pytest.raises(DifflabError, match=f"exported from other weights \\(hash {weights_fingerprint(pipe)}"):
        load_onnx_denoiser(other_weights, tmp_path / "mine.onnx")
    # a graph whose metadata claims another model's inputs: the graph itself is checked too
    export_onnx(conditional, tmp_path / "theirs.onnx")
    graph = onnx.load(str(tmp_path / "mine.onnx"))
    theirs = {p.key: p.value for p in onnx.load(str(tmp_path / "theirs.onnx")).metadata_props}
    for p in graph.metadata_props:
        p.value = theirs[p.key]
    onnx.save(graph, str(tmp_path / "forged.onnx"))
    with pytest.raises(DifflabError, match="the graph in .* takes x tensor\\(float\\) \\[2\\], sigma tensor"):
        load_onnx_denoiser(conditional, tmp_path / "forged.onnx")


def test_a_missing_extra_names_the_install_command(moons, tmp_path, monkeypatch):
    pipe = points_pipeline(moons, "edm")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(DifflabError, match=r"needs onnxruntime: pip install 'difflab\[onnx\]'"):
        pipe.with_backend("onnxruntime")
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(DifflabError, match=r"ONNX export needs the onnx package: pip install 'difflab\[onnx\]'"):
        export_onnx(pipe, tmp_path / "d.onnx")


@pytest.fixture(scope="module")
def moons_run(tmp_path_factory, moons):
    """A class-conditional EDM MLP trained 30 steps (EMA and raw weights differ)."""
    config = difflab.run_config(moons, process="edm", conditional=True, steps=30, seed=2)
    return difflab.train(config, tmp_path_factory.mktemp("onnx") / "run", data=moons, progress=False)


def test_cli_exports_and_samples_on_onnxruntime(moons_run, tmp_path, capsys):
    model = tmp_path / "model.onnx"
    code, out, _ = run_cli(capsys, "export", "--ckpt", moons_run, "--format", "onnx", "--out", model)
    assert code == 0 and "--backend onnxruntime --onnx" in out and model.is_file()
    meta = {p.key: p.value for p in onnx.load(str(model)).metadata_props}
    assert meta[META_HASH] == difflab.load(moons_run).weights_hash()
    common = ["--n", 6, "--sampler", "heun", "--steps", 5, "--class", "1", "--guidance", 2, "--threads", 1]
    assert run_cli(capsys, "sample", "--ckpt", moons_run, *common, "--out", tmp_path / "torch.npy")[0] == 0
    for name, flags in (("file", ["--onnx", model]), ("temporary", [])):
        out_file = tmp_path / f"{name}.npy"
        assert run_cli(capsys, "sample", "--ckpt", moons_run, *common, "--backend", "onnxruntime", *flags,
                       "--out", out_file)[0] == 0  # fmt: skip
        err = rel_err(torch.from_numpy(np.load(out_file)), torch.from_numpy(np.load(tmp_path / "torch.npy")))
        assert err <= RTOL, (name, err)
        assert json.loads((tmp_path / f"{name}.npy.json").read_text())["backend"] == "onnxruntime"
    assert "backend" not in json.loads((tmp_path / "torch.npy.json").read_text())  # plain torch records nothing new


def test_cli_refusals_are_one_line(moons_run, tmp_path, capsys):
    model = tmp_path / "model.onnx"
    assert run_cli(capsys, "export", "--ckpt", moons_run, "--out", model)[0] == 0  # EMA weights
    base = ["sample", "--ckpt", moons_run, "--n", 2, "--out", tmp_path / "s.npy", "--threads", 1]
    code, _, err = run_cli(capsys, *base, "--backend", "onnxruntime", "--onnx", model, "--no-ema")
    assert_one_line_error(code, err, "exported from other weights", "EMA or raw weights?")
    code, _, err = run_cli(capsys, *base, "--backend", "onnxruntime", "--onnx", tmp_path / "none.onnx")
    assert_one_line_error(code, err, "no ONNX file at", "difflab export")
    code, _, err = run_cli(capsys, *base, "--onnx", model)
    assert_one_line_error(code, err, "--onnx FILE runs the model on onnxruntime: add --backend onnxruntime")
    code, _, err = run_cli(capsys, *base, "--backend", "onnxruntime", "--compile")
    assert_one_line_error(code, err, "--compile compiles the torch network")
    code, _, err = run_cli(capsys, *base, "--backend", "tensorrt")
    assert_one_line_error(code, err, "unknown --backend 'tensorrt': choose torch or onnxruntime")
    code, _, err = run_cli(capsys, *base, "--quantize", "int4")
    assert_one_line_error(code, err, "unknown --quantize 'int4': choose int8")
    code, _, err = run_cli(capsys, "export", "--ckpt", moons_run, "--out", tmp_path / "m.txt")
    assert_one_line_error(code, err, "must end in .onnx")
    code, _, err = run_cli(capsys, "export", "--ckpt", moons_run, "--format", "tflite", "--out", tmp_path / "x")
    assert_one_line_error(code, err, "unknown --format 'tflite': choose onnx or diffusers")
    code, _, err = run_cli(capsys, "export", "--ckpt", moons_run, "--format", "diffusers", "--quantize", "int8",
                           "--out", tmp_path / "x")  # fmt: skip
    assert_one_line_error(code, err, "--quantize int8 quantises an ONNX export")
    code, _, err = run_cli(capsys, "export", "--ckpt", moons_run, "--format", "diffusers", "--out", tmp_path / "x")
    assert_one_line_error(code, err, "cannot export a edm model to diffusers")


def test_cli_exports_a_ddpm_unet_to_diffusers(tmp_path, capsys):
    pytest.importorskip("diffusers")
    digits = difflab.load_dataset("digits")
    run = difflab.train(difflab.run_config(digits, process="ddpm", steps=1, batch_size=4), tmp_path / "run",
                        data=digits, progress=False)  # fmt: skip
    code, out, _ = run_cli(capsys, "export", "--ckpt", run, "--format", "diffusers", "--out", tmp_path / "folder")
    assert code == 0 and "DDPMPipeline folder" in out
    back = difflab.load(tmp_path / "folder")
    x, sigma = inputs_across(back, batch=3)
    with torch.no_grad():
        assert rel_err(back.denoiser(x, sigma), difflab.load(run).denoiser(x, sigma)) <= 1e-4
