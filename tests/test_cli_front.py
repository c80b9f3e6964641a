"""The CLI as a front: lazy start-up, per-sample PNGs with difflab JSON and AUTOMATIC1111 parameters, --from-png
reproduction bit for bit, .npy sidecars, `difflab info`, `difflab samplers`, eval with guidance, --threads and the
oversubscription warning, previews and TensorBoard during training, and the short-run warning."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, run_cli
from PIL import Image

from difflab.training import threads


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A class-conditional tiny U-Net on the digits, 30 steps: what matters here is bookkeeping, not quality."""
    out = tmp_path_factory.mktemp("digits") / "run"
    from difflab.cli.main import main

    assert main(["train", "--data", "digits", "--conditional", "--steps", "30", "--out", str(out), "--no-progress",
                 "--batch-size", "32"]) == 0  # fmt: skip
    return out


def test_help_and_samplers_do_not_import_torch():
    """`difflab --help` imports only the command table; `difflab samplers` reads signatures without torch."""
    for argv in (["--help"], ["samplers"]):
        code = (
            "import sys\nfrom difflab.cli.main import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        assert out.strip().endswith("NO-TORCH"), (argv, out[-300:])


def test_samplers_lists_options_with_real_defaults_and_aliases(capsys):
    code, out, _ = run_cli(capsys, "samplers", "--aliases")
    assert code == 0
    assert "ald" in out and "0.2 sigma_min^2" in out  # the real default, not the 2e-5 the old help claimed
    assert "DPM++ 2M Karras" in out and "exponential = log_snr" in out


def test_out_dir_writes_one_png_per_seed_with_both_metadata_formats(digits_run, tmp_path, capsys):
    out_dir = tmp_path / "pngs"
    code, out, err = run_cli(capsys, "sample", "--ckpt", digits_run, "--n", 5, "--seed", 40, "--batch-size", 2,
                             "--class", "all", "--guidance", 2, "--sampler", "DPM++ 2M Karras", "--steps", 6,
                             "--out-dir", out_dir)  # fmt: skip
    assert code == 0, err
    names = sorted(p.name for p in out_dir.glob("*.png"))
    assert names == [f"seed_{s:08d}.png" for s in range(40, 45)]
    with Image.open(out_dir / "seed_00000042.png") as image:
        params, meta = image.text["parameters"], json.loads(image.text["difflab"])
    assert params.splitlines()[0] == "class 2"  # --class all cycles 0, 1, 2, ...
    for fragment in ("Steps: 6", "Sampler: DPM++ 2M Karras", "CFG scale: 2.0", "Seed: 42", "Size: 8x8",
                     "Model hash: ", "Version: difflab "):  # fmt: skip
        assert fragment in params.splitlines()[1], params
    assert meta["seed"] == 42 and meta["label"] == 2 and meta["batch_first_seed"] == 42 and meta["batch_n"] == 2
    last = json.loads(Image.open(out_dir / "seed_00000044.png").text["difflab"])  # the partial last batch
    assert (last["label"], last["batch_first_seed"], last["batch_n"], last["batch_size"]) == (4, 44, 1, 2)


def test_from_png_reproduces_the_image_bit_for_bit(digits_run, tmp_path, capsys, monkeypatch):
    out_dir = tmp_path / "pngs"
    run_cli(capsys, "sample", "--ckpt", digits_run, "--n", 5, "--seed", 7, "--class", "all", "--guidance", 1.5,
            "--sampler", "euler_ancestral", "--eta", 0.7, "--steps", 5, "--batch-size", 2, "--out-dir", out_dir,
            "--out", tmp_path / "grid.png")  # fmt: skip
    monkeypatch.chdir(tmp_path)  # the recorded checkpoint path is absolute
    source = out_dir / "seed_00000008.png"  # the second of the batch (7, 8), class 1
    code, out, err = run_cli(capsys, "sample", "--from-png", source, "--out", tmp_path / "again.png")
    assert code == 0, err
    original, again = (np.asarray(Image.open(p)) for p in (source, tmp_path / "again.png"))
    assert original.shape == (8, 8) and np.array_equal(original, again)
    other = np.asarray(Image.open(out_dir / "seed_00000009.png"))
    assert not np.array_equal(original, other)  # a different seed gives a different image
    # a grid of 5 drawn in batches of 2 with classes 0..4 comes back whole
    code, out, err = run_cli(capsys, "sample", "--from-png", tmp_path / "grid.png", "--out", tmp_path / "grid2.png")
    assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(tmp_path / "grid.png")), np.asarray(Image.open(tmp_path / "grid2.png")))


def test_npy_outputs_get_a_json_sidecar_and_info_reads_everything(digits_run, tmp_path, capsys):
    npy = tmp_path / "s.npy"
    assert run_cli(capsys, "sample", "--ckpt", digits_run, "--n", 2, "--steps", 3, "--out", npy)[0] == 0
    sidecar = json.loads((tmp_path / "s.npy.json").read_text())
    assert sidecar["shape"] == [2, 1, 8, 8] and sidecar["sampler"] == "ddim" and sidecar["steps"] == 3
    assert np.load(npy).shape == (2, 1, 8, 8)
    code, out, _ = run_cli(capsys, "info", digits_run)
    assert code == 0 and "ddpm" in out and "class_label (dropout 0.1)" in out and "step 30" in out
    code, out, _ = run_cli(capsys, "info", npy)
    assert code == 0 and "ddim" in out and "--from-png" in out
    assert_one_line_error(*run_cli(capsys, "info", tmp_path / "missing")[::2], "does not exist")


def test_eval_takes_guidance(tmp_path, capsys):
    """`difflab eval --class/--guidance` on a labelled toy model: the guided samples score differently from the
    unguided ones of the same seeds, and the report records the guidance settings."""
    run = tmp_path / "moons"
    run_cli(capsys, "train", "--data", "moons", "--process", "edm", "--conditional", "--steps", 60, "--out", run,
            "--no-progress")  # fmt: skip
    code, out, err = run_cli(capsys, "eval", "--ckpt", run, "--n", 200, "--steps", 5, "--sampler", "heun",
                             "--class", "1", "--guidance", 2, "--out", tmp_path / "eval")  # fmt: skip
    assert code == 0, err
    guided = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert guided["settings"]["guidance"] == 2.0 and guided["settings"]["label"] == "1"
    run_cli(capsys, "eval", "--ckpt", run, "--n", 200, "--steps", 5, "--sampler", "heun", "--class", "1",
            "--out", tmp_path / "plain")  # fmt: skip
    plain = json.loads((tmp_path / "plain" / "eval.json").read_text())
    assert guided["rows"][0]["fid"] != plain["rows"][0]["fid"]


def test_threads_flag_and_oversubscription_warning(tmp_path, capsys, monkeypatch):
    before = torch.get_num_threads()
    try:
        run_cli(capsys, "sample", "--ckpt", "missing-run", "--threads", "2", "--out", tmp_path / "x.png")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (9.0, 9.0, 9.0))
    assert "oversubscribed (load 9.0" in threads.oversubscription_warning()
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    assert threads.oversubscription_warning() is None
    assert 1 <= threads.physical_cores() <= len(threads.available_cpus())


def test_previews_tensorboard_and_a_short_time_budget(tmp_path, capsys):
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", "--data", "moons", "--steps", 20, "--preview-every", 10,
                             "--tensorboard", "--out", run, "--no-progress")  # fmt: skip
    assert code == 0, err
    assert sorted(p.name for p in (run / "previews").glob("*.png")) == ["step_00000010.png", "step_00000020.png"]
    with Image.open(run / "previews" / "step_00000020.png") as preview:  # a scatter of 1000 samples, not blank
        pixels = np.asarray(preview.convert("L"))
    assert pixels.min() < 128 < pixels.max()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    code, out, err = run_cli(capsys, "train", "--data", "moons", "--minutes", "0.0001", "--out", tmp_path / "short",
                             "--no-progress")  # fmt: skip
    assert code == 0 and "stopped by minutes" in out and "far short of the ~1000 this data needs" in out


def test_sampler_flags_and_their_help_come_from_the_samplers_signatures():
    """One flag per option of any sampler; its help is the registry's, whose defaults are the signatures'."""
    from difflab.cli.main import build_parser
    from difflab.sampling import SAMPLERS, all_sampler_options, format_default

    parser = build_parser("sample")
    sample = next(a for a in parser._actions if a.dest == "command").choices["sample"]
    actions = {a.dest: a for a in sample._actions}
    for name, option in all_sampler_options().items():
        assert actions[name].help == option.help and actions[name].default is None  # unset: the sampler's default
    for spec in SAMPLERS.values():
        for option in spec.option_specs:
            shared = all_sampler_options()[option.name]
            if shared.default is not None:
                assert f"default {format_default(option.default)}" in shared.help
    assert "0.2 sigma_min^2" in actions["step_size"].help
