"""Loading a checkpoint users can trust (issue 11): damaged weights, a config.json that does not match them or asks
for an absurd network, and special files where files are expected are one-line errors naming the file and the key or
tensor, found before anything large is allocated (and a FIFO never hangs)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, run_cli
from safetensors.torch import load_file, save_file

import difflab
import difflab.pipeline
from difflab.config import DataConfig, RunConfig
from difflab.errors import DifflabError
from difflab.formulations import make_config
from difflab.guidance.classifier import ClassifierConfig, build_classifier, load_classifier, save_classifier
from difflab.nets import ModelConfig, build_network
from difflab.nets.mlp import MLPConfig
from difflab.training.checkpoint import save_checkpoint


def _checkpoint(root: Path, hidden: int = 16) -> Path:
    """A checkpoint of a small untrained MLP on 2-D points (no training: the files are what is tested)."""
    model = ModelConfig("mlp", MLPConfig(data_dim=2, hidden=hidden, num_blocks=1, embed_dim=8))
    config = RunConfig(DataConfig("moons", "points", (2,)), model, make_config("edm"))
    state = build_network(model).state_dict()
    return save_checkpoint(root, 1, config, {"model": state, "ema": state}, {"step": 1})


@pytest.fixture
def ckpt(tmp_path) -> Path:
    return _checkpoint(tmp_path / "run")


def _edit_weights(path: Path, **changes: torch.Tensor | None) -> None:
    """Rewrite a safetensors file with some tensors replaced (None = removed)."""
    tensors = load_file(str(path))
    for name, value in changes.items():
        name = name.replace("__", ".")
        if value is None:
            del tensors[name]
        else:
            tensors[name] = value
    save_file(tensors, str(path))


def _edit_config(ckpt: Path, edit) -> None:
    values = json.loads((ckpt / "config.json").read_text())
    edit(values)
    (ckpt / "config.json").write_text(json.dumps(values))


def test_the_untouched_checkpoint_loads_and_samples_finite_values(ckpt):
    """The baseline the refusals below are measured against."""
    pipe = difflab.load(ckpt)
    assert torch.isfinite(pipe.sample(3, sampler="euler", steps=2)).all()


def test_nan_or_inf_weights_are_refused_naming_file_and_tensor(ckpt, tmp_path, capsys):
    weight = load_file(str(ckpt / "ema.safetensors"))["blocks.0.lin1.weight"]
    weight[3, 5] = float("nan")
    _edit_weights(ckpt / "ema.safetensors", blocks__0__lin1__weight=weight)
    with pytest.raises(DifflabError, match=r"ema\.safetensors': tensor 'blocks\.0\.lin1\.weight' holds NaN/inf values"):
        difflab.load(ckpt)
    code, _, err = run_cli(capsys, "sample", "--ckpt", ckpt, "--n", 2, "--steps", 2, "--out", tmp_path / "x.npy")
    assert_one_line_error(code, err, "ema.safetensors': tensor 'blocks.0.lin1.weight' holds NaN/inf", "retrain")
    assert not (tmp_path / "x.npy").exists()
    _edit_weights(ckpt / "model.safetensors", out__2__bias=torch.tensor([0.0, float("inf")]))
    with pytest.raises(DifflabError, match=r"model\.safetensors': tensor 'out\.2\.bias' holds NaN/inf"):
        difflab.load(ckpt, use_ema=False)


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"out__2__bias": torch.tensor([1, 2])}, "tensor 'out.2.bias' is stored as I64, not floating point"),
        ({"out__2__bias": torch.zeros(3)}, "tensor 'out.2.bias' has shape [3] but config.json's network needs [2]"),
        ({"out__2__bias": None}, "lacks tensor 'out.2.bias' that config.json's network has"),
        ({"extra": torch.zeros(2)}, "holds tensor 'extra' that config.json's network lacks"),
    ],
)
def test_weights_of_another_dtype_shape_or_names_are_refused_naming_the_tensor(ckpt, change, fragment):
    _edit_weights(ckpt / "ema.safetensors", **change)
    with pytest.raises(DifflabError, match="ema.safetensors") as err:
        difflab.load(ckpt)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def _built_on(monkeypatch) -> list[str]:
    """The default device of every build_network call that difflab.load makes ("meta" = no memory)."""
    import difflab.loading

    calls, real = [], difflab.loading.build_network

    def recording(config):
        calls.append(str(torch.get_default_device()))
        return real(config)

    monkeypatch.setattr(difflab.loading, "build_network", recording)
    return calls


def test_a_config_far_larger_than_its_weights_allocates_nothing(ckpt, monkeypatch):
    """hidden 16384 is within the per-setting limits (~270M parameters, 1 GB): the file's header is compared before
    the network is built, so only the meta-device build happens."""
    _edit_config(ckpt, lambda v: v["model"]["settings"].update(hidden=16384, num_blocks=0))
    calls = _built_on(monkeypatch)
    with pytest.raises(DifflabError, match=r"holds [\d,]+ values but config.json describes a network of 268,"):
        difflab.load(ckpt)
    assert calls == ["meta"]


def test_absurd_sizes_in_config_json_are_refused_before_anything_is_built(ckpt, monkeypatch):
    calls = _built_on(monkeypatch)
    _edit_config(ckpt, lambda v: v["model"]["settings"].update(num_blocks=100000))
    with pytest.raises(DifflabError, match=r"config\.json' is not a valid difflab config \(model\.settings\.num_blocks"
                       r" is 100000, outside difflab's limits 0\.\.256"):  # fmt: skip
        difflab.load(ckpt)
    _edit_config(ckpt, lambda v: v["model"]["settings"].update(num_blocks=256, hidden=16384))
    start = time.perf_counter()
    with pytest.raises(DifflabError, match=r"the mlp network would have [\d,]+ parameters, above difflab's limit of"):
        difflab.load(ckpt)
    assert time.perf_counter() - start < 10 and calls == []
    _edit_config(ckpt, lambda v: v["data"].update(sample_shape=[3, 100000, 100000], kind="images"))
    with pytest.raises(DifflabError, match=r"data\.sample_shape\[1\] is 100000, outside difflab's limits"):
        difflab.load(ckpt)


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda v: v["data"].pop("kind"), "(data.kind is missing)"),
        (lambda v: v.pop("formulation"), "(config.formulation is missing)"),
        (lambda v: v["formulation"].pop("name"), "(formulation.name is missing"),
        (lambda v: v["model"]["settings"].update(hidden=16.0), "(model.settings.hidden must be an integer, got 16.0)"),
        (lambda v: v["model"]["settings"].update(num_blocks=True), "settings.num_blocks must be an integer, got true)"),
        (lambda v: v["formulation"].update(sigma_max="80"), '(formulation.sigma_max must be a number, got "80")'),
        (lambda v: v["data"].update(sample_shape=2), "(data.sample_shape must be a list, got 2)"),
        (lambda v: v["train"].update(colour="blue"), "(train has unknown keys colour)"),
        (lambda v: v.update(extras={}), "(config has unknown keys extras)"),
        (lambda v: v.update(version=3), "(config version 3 is newer than this difflab reads (2); upgrade difflab)"),
        (lambda v: v.update(version="2"), '(version must be an integer from 1 to 2, got "2")'),
        (lambda v: v.update(conditioning={}), "(conditioning must be a list, got {})"),
    ],
)  # fmt: skip
def test_config_json_errors_name_the_key_and_the_file(ckpt, edit, fragment):
    _edit_config(ckpt, edit)
    with pytest.raises(DifflabError) as err:
        difflab.load(ckpt)
    message = str(err.value)
    assert message.startswith(f"'{ckpt / 'config.json'}' is not a valid difflab config") and "\n" not in message
    assert fragment in message, message


def test_typed_config_reading_keeps_what_is_valid(ckpt):
    """An integer where a float is expected is read as that float; a null optional stays None; round trips hold."""
    _edit_config(ckpt, lambda v: v["formulation"].update(sigma_max=80) or v["train"].update(minutes=None))
    config = difflab.load(ckpt).config
    assert config.formulation.sigma_max == 80.0 and isinstance(config.formulation.sigma_max, float)
    assert RunConfig.from_json(config.to_json()) == config


def _with_alarm(seconds: int, call):
    """Run call() and fail (instead of hanging the suite) if it blocks, e.g. opening a FIFO."""

    def timeout(*_):
        raise AssertionError("blocked: a special file was opened")

    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(seconds)
    try:
        return call()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda p: p.mkdir(), "is a directory, not a regular file"),
        (lambda p: os.mkfifo(p), "is a FIFO, not a regular file"),
        (lambda p: p.symlink_to("/dev/zero"), "is a special file, not a regular file"),
        (lambda p: p.symlink_to(p.parent / "missing"), "cannot be read (No such file or directory)"),
    ],
)
def test_special_files_where_weights_are_expected_are_refused_without_opening_them(ckpt, make, fragment):
    (ckpt / "ema.safetensors").unlink()
    make(ckpt / "ema.safetensors")
    with pytest.raises(DifflabError, match="ema.safetensors") as err:
        _with_alarm(20, lambda: difflab.load(ckpt))
    assert fragment in str(err.value)
    assert difflab.load(ckpt, use_ema=False).weights == ckpt / "model.safetensors"


def test_a_fifo_or_device_as_config_json_is_refused_without_hanging(ckpt):
    """Loading the run folder finds its latest checkpoint folder and reads config.json there."""
    run = ckpt.parent.parent
    (ckpt / "config.json").unlink()
    os.mkfifo(ckpt / "config.json")
    with pytest.raises(DifflabError, match=r"config file '.*config\.json' is a FIFO, not a regular file"):
        _with_alarm(20, lambda: difflab.load(run))
    (ckpt / "config.json").unlink()
    (ckpt / "config.json").symlink_to("/dev/zero")
    with pytest.raises(DifflabError, match="is a special file"):
        _with_alarm(20, lambda: difflab.load(run))


def test_classifier_weights_are_checked_like_model_weights(tmp_path):
    config = ClassifierConfig("moons", "points", (2,), 2, 8, 1)
    folder = tmp_path / "clf"
    ckpt = save_classifier(build_classifier(config), folder)
    assert load_classifier(folder).config == config
    _edit_weights(ckpt / "model.safetensors", net__inp__bias=torch.full((8,), float("nan")))
    with pytest.raises(DifflabError, match=r"model\.safetensors': tensor 'net\.inp\.bias' holds NaN/inf values"):
        load_classifier(folder)
    _edit_weights(ckpt / "model.safetensors", net__inp__bias=torch.zeros(9))
    with pytest.raises(DifflabError, match=r"tensor 'net\.inp\.bias' has shape \[9\] but config\.json's network"):
        load_classifier(folder)
    values = json.loads((ckpt / "config.json").read_text()) | {"depth": 100000}
    (ckpt / "config.json").write_text(json.dumps(values))
    with pytest.raises(DifflabError, match=r"classifier\.depth is 100000, outside difflab's limits 1\.\.64"):
        load_classifier(folder)
