"""Runs users can trust (issue 11), outputs: every file records what made its pixels (scatter plots too), batches are
written as they finish, a bad output place or a full disk is one line with exit code 2 found before any work, and
no failed write leaves a partial or temporary file. The model is a tiny untrained network (no training): what
matters here is bookkeeping."""

import errno
import os
from shutil import _ntuple_diskusage as shutil_usage

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, run_cli
from PIL import Image

import difflab.generate
import difflab.outputs
import difflab.pipeline
from difflab.atomic import atomic_output
from difflab.data import load_dataset
from difflab.errors import DifflabError
from difflab.outputs import MAX_GRID, read_generation_parameters
from difflab.pipeline import Pipeline
from difflab.training.run import run_config


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """Untrained tiny models of digit images and of 2-D moons points, as `load` would return them."""
    folder = tmp_path_factory.mktemp("models")
    made = {}
    for kind, data in (("images", "digits"), ("points", "moons")):
        torch.manual_seed(0)
        made[kind] = Pipeline(run_config(load_dataset(data), model="tiny"), checkpoint=folder / data, step=0)
    return made


@pytest.fixture
def model(pipes, monkeypatch):
    """`model("images")` makes `difflab.pipeline.load` return that pipeline and records each load."""
    loads = []

    def choose(kind):
        def fake_load(path, use_ema=True, device="cpu"):
            loads.append((path, use_ema))
            return pipes[kind]

        monkeypatch.setattr(difflab.pipeline, "load", fake_load)
        return loads

    return choose


def _no_leftovers(folder):
    """Nothing partial or temporary in `folder`: no hidden .tmp files, no empty files."""
    names = os.listdir(folder)
    assert not [n for n in names if ".tmp" in n], names
    assert not [n for n in names if (folder / n).is_file() and (folder / n).stat().st_size == 0], names


# ---- what the files record ----------------------------------------------------------------------------------


def test_scatter_png_carries_the_generation_parameters(model, tmp_path, capsys):
    model("points")
    out = tmp_path / "moons.png"
    code, _, err = run_cli(capsys, "sample", "--ckpt", "run", "--n", 7, "--seed", 5, "--steps", 3, "--batch-size", 4,
                           "--sampler", "euler", "--no-ema", "--out", out)  # fmt: skip
    assert code == 0, err
    meta = read_generation_parameters(out)
    assert (meta["sampler"], meta["steps"], meta["seed"], meta["n"]) == ("euler", 3, 5, 7)
    assert (meta["batch_size"], meta["use_ema"], meta["nfe"], meta["device"]) == (4, False, 3, "cpu")
    with Image.open(out) as image:
        params = image.text["parameters"]
    assert "Steps: 3, Sampler: euler" in params and "Seed: 5" in params and "Version: difflab " in params


def test_grid_png_records_batch_size_ema_and_device(model, tmp_path, capsys):
    loads = model("images")
    code, _, err = run_cli(capsys, "sample", "--ckpt", "run", "--n", 3, "--steps", 2, "--batch-size", 2, "--no-ema",
                           "--out", tmp_path / "grid.png")  # fmt: skip
    assert code == 0, err
    meta = read_generation_parameters(tmp_path / "grid.png")
    assert (meta["batch_size"], meta["use_ema"], meta["device"]) == (2, False, "cpu") and loads == [("run", False)]


# ---- streaming -----------------------------------------------------------------------------------------------


@pytest.fixture
def events(monkeypatch):
    """A log of batches started (("batch", first seed)) and files written (("png", name) / ("npy", rows))."""
    log = []
    real_noise = difflab.generate.PerSampleNoise

    def noise(seeds):
        log.append(("batch", seeds[0]))
        return real_noise(seeds)

    monkeypatch.setattr(difflab.generate, "PerSampleNoise", noise)
    real_png, real_npy = difflab.outputs.write_png, difflab.outputs.NpyStream.write

    def png(images, path, meta, nrow=None):
        log.append(("png", path.name))
        return real_png(images, path, meta, nrow)

    def npy(self, rows):
        log.append(("npy", len(rows)))
        return real_npy(self, rows)

    monkeypatch.setattr(difflab.outputs, "write_png", png)
    monkeypatch.setattr(difflab.outputs.NpyStream, "write", npy)
    return log


def test_each_batch_is_written_before_the_next_is_drawn(model, events, tmp_path, capsys):
    model("images")
    code, _, err = run_cli(capsys, "sample", "--ckpt", "run", "--n", 5, "--seed", 10, "--steps", 2, "--batch-size",
                           2, "--out-dir", tmp_path / "pngs", "--out", tmp_path / "all.npy")  # fmt: skip
    assert code == 0, err
    pngs = [("png", f"seed_{s:08d}.png") for s in range(10, 15)]
    assert events == [("batch", 10), *pngs[:2], ("npy", 2), ("batch", 12), *pngs[2:4], ("npy", 2),
                      ("batch", 14), pngs[4], ("npy", 1)]  # fmt: skip
    array = np.load(tmp_path / "all.npy")
    sidecar = read_generation_parameters(tmp_path / "all.npy")
    assert array.shape == (5, 1, 8, 8) and sidecar["shape"] == [5, 1, 8, 8] and sidecar["batch_size"] == 2
    one = np.asarray(Image.open(tmp_path / "pngs" / "seed_00000013.png"), dtype=np.float32) / 127.5 - 1
    assert np.abs(one - array[3, 0].clip(-1, 1)).max() <= 1 / 127.5 + 1e-6  # the PNG is that sample, 8-bit
    _no_leftovers(tmp_path)


def test_a_huge_grid_is_refused_before_sampling(model, events, tmp_path, capsys):
    model("images")
    code, _, err = run_cli(capsys, "sample", "--ckpt", "run", "--n", MAX_GRID + 1, "--out", tmp_path / "grid.png")
    assert_one_line_error(code, err, f"at most {MAX_GRID} images in a grid, not {MAX_GRID + 1}", "--out-dir")
    assert events == [] and os.listdir(tmp_path) == []


def test_a_npy_larger_than_the_free_disk_is_refused_before_sampling(model, events, tmp_path, capsys, monkeypatch):
    model("images")
    monkeypatch.setattr("shutil.disk_usage", lambda path: shutil_usage(total=10**6, used=10**6 - 1000, free=1000))
    code, _, err = run_cli(capsys, "sample", "--ckpt", "run", "--n", 100, "--out", tmp_path / "x.npy")
    assert_one_line_error(code, err, "needs 25.6 kB (100 samples of 1x8x8 float32) but its disk has 1.0 kB free")
    assert events == [] and os.listdir(tmp_path) == []


# ---- bad output places, found before any work ---------------------------------------------------------------


@pytest.mark.parametrize(
    "make,flag,fragment",
    [
        (lambda t: (t / "d.png").mkdir() or t / "d.png", "--out", "is a folder; give a file name in it"),
        (lambda t: (t / "f").write_text("x") and t / "f" / "sub" / "x.png", "--out", "is a file, not a folder"),
        (lambda t: t / "x.gif", "--out", "must end in .png"),
        (lambda t: (t / "f").write_text("x") and t / "f", "--out-dir", "is a file; give a folder"),
        (lambda t: (t / "f").write_text("x") and t / "f" / "pngs", "--out-dir", "is a file, not a folder"),
    ],
)
def test_sample_refuses_a_bad_output_place_before_loading(model, tmp_path, capsys, make, flag, fragment):
    loads = model("images")
    code, _, err = run_cli(capsys, "sample", "--ckpt", "run", "--n", 2, flag, make(tmp_path))
    assert_one_line_error(code, err, fragment)
    assert loads == []


def test_a_read_only_place_is_refused_before_loading(model, tmp_path, capsys, monkeypatch):
    loads = model("images")
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    for flag, target in (("--out", tmp_path / "new" / "x.png"), ("--out-dir", tmp_path / "pngs")):
        code, _, err = run_cli(capsys, "sample", "--ckpt", "run", "--n", 2, flag, target)
        assert_one_line_error(code, err, f"cannot write to '{tmp_path}'", f"choose another {flag}")
    assert loads == []


@pytest.mark.parametrize(
    "argv",
    [
        ["inpaint", "--ckpt", "run", "--image", "i.png", "--mask", "m.png"],
        ["img2img", "--ckpt", "run", "--image", "i.png"],
        ["eval", "--ckpt", "run"],
        ["nll", "--ckpt", "run"],
        ["demo"],
    ],
)
def test_other_commands_check_their_output_before_work(model, tmp_path, capsys, argv):
    loads = model("images")
    (tmp_path / "taken").write_text("a file")
    target = tmp_path / "taken" if argv[0] in ("eval", "demo") else tmp_path / "taken" / "x.png"  # folder or file
    code, _, err = run_cli(capsys, *argv, "--out", target)
    assert_one_line_error(code, err, f"'{tmp_path / 'taken'}' is a file")
    assert loads == [] and not (tmp_path / "run").exists()


def test_edit_commands_refuse_bad_seeds_before_loading(model, tmp_path, capsys):
    loads = model("images")
    code, _, err = run_cli(capsys, "img2img", "--ckpt", "run", "--image", "i.png", "--seed", -1, "--out",
                           tmp_path / "x.png")  # fmt: skip
    assert_one_line_error(code, err, "seeds must lie in 0..2**63 - 1")
    assert loads == []


# ---- failed writes leave nothing behind ---------------------------------------------------------------------


def _disk_full_after_some_bytes(self, fp, *args, **kwargs):
    with open(fp, "wb") as f:
        f.write(b"\x89PNG partial")
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_writing_a_png_is_one_line_and_leaves_no_file(model, tmp_path, capsys, monkeypatch):
    model("images")
    monkeypatch.setattr(Image.Image, "save", _disk_full_after_some_bytes)
    for flag, target in (("--out", tmp_path / "grid.png"), ("--out-dir", tmp_path / "pngs")):
        code, _, err = run_cli(capsys, "sample", "--ckpt", "run", "--n", 2, "--steps", 2, flag, target)
        assert_one_line_error(code, err, "no space left on the device writing", "free space or write elsewhere")
    assert not (tmp_path / "grid.png").exists() and os.listdir(tmp_path / "pngs") == []
    _no_leftovers(tmp_path)


def test_disk_full_writing_a_npy_is_one_line_and_leaves_no_file(model, tmp_path, capsys, monkeypatch):
    model("images")
    real_open = open

    class FullFile:
        def __init__(self, path, mode):
            self.file = real_open(path, mode)

        def write(self, data):
            self.file.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            self.file.close()

    monkeypatch.setattr("builtins.open", lambda path, mode="r", *a, **k: FullFile(path, mode) if mode == "wb" else
                        real_open(path, mode, *a, **k))  # fmt: skip
    code, _, err = run_cli(capsys, "sample", "--ckpt", "run", "--n", 3, "--steps", 2, "--out", tmp_path / "x.npy")
    assert_one_line_error(code, err, "no space left on the device writing", "x.npy")
    assert os.listdir(tmp_path) == []


def test_atomic_output_leaves_nothing_when_the_writer_fails_midway(tmp_path):
    target = tmp_path / "sub" / "out.png"
    with pytest.raises(RuntimeError, match="writer broke"), atomic_output(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("writer broke")
    assert os.listdir(tmp_path / "sub") == []
    target.write_bytes(b"old")  # a failed rewrite keeps the old file whole
    with pytest.raises(DifflabError, match="no space left"), atomic_output(target) as tmp:
        tmp.write_bytes(b"new, half")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path / "sub") == ["out.png"]
    with atomic_output(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and os.listdir(tmp_path / "sub") == ["out.png"]
