"""Values that make no sense are refused up front in one line (exit code 2), never replaced by defaults."""

from __future__ import annotations

import pytest
from conftest import assert_one_line_error, run_cli

import difflab
from difflab.errors import DifflabError
from difflab.formulations import make_config
from difflab.guidance import Guidance


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--lr", "0"], "--lr must be a positive number, got 0"),
        (["--batch-size", "0"], "--batch-size must be a positive number, got 0"),
        (["--steps", "0"], "--steps must be a positive number, got 0"),
        (["--lr", "nan"], "--lr must be a positive number, got nan"),
        (["--ema-decay", "2"], "--ema-decay must lie in [0, 1), got 2.0"),
        (["--lr-schedule", "step"], "unknown --lr-schedule 'step'; choose one of constant, cosine, linear"),
        (["--min-snr-gamma", "-1"], "--min-snr-gamma must be a positive number, got -1.0"),
        (["--process", "edm", "--sigma-min", "10", "--sigma-max", "1"], "need 0 < --sigma-min < --sigma-max"),
        (["--process", "ve", "--sigma-min", "0"], "need 0 < --sigma-min < --sigma-max"),
        (["--process", "edm", "--p-std", "0"], "--p-std must be a positive finite number, got 0.0"),
        (["--process", "edm", "--p-mean", "nan"], "--p-mean must be a finite number, got nan"),
        (["--process", "ct", "--p-std", "-1"], "--p-std must be a positive finite number, got -1.0"),
        (["--process", "ct", "--p-mean", "20", "--p-std", "1"], "--p-mean 20.0 / --p-std 1.0 put almost no training"),
        (["--process", "ddpm", "--p-mean", "0.4"], "process 'ddpm' does not take --p-mean"),
        (["--conditional", "--label-dropout", "1.5"], "(--label-dropout for class labels) must lie in [0, 1), got 1.5"),
    ],
)
def test_nonsense_training_values_are_one_line_errors_before_any_work(flags, fragment, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--data", "moons", "--out", out, "--no-progress", *flags)
    assert_one_line_error(code, err, fragment)
    assert not out.exists()


def test_nonsense_sampling_values_are_refused(tmp_path):
    with pytest.raises(DifflabError, match="--guidance must be a finite number, got nan"):
        Guidance(scale=float("nan"))
    with pytest.raises(DifflabError, match="sigma_data must be positive, got 0.0"):
        make_config("edm", sigma_data=0.0)
    data = difflab.load_dataset("moons")
    with pytest.raises(DifflabError, match="--batch-size must be a positive number"):
        difflab.run_config(data, batch_size=-4)
    # explicit values are used as given, not swapped for the defaults
    assert difflab.run_config(data, lr=3e-5, batch_size=7).train.batch_size == 7


def test_an_output_it_cannot_write_is_refused_before_loading_or_sampling(tmp_path, capsys):
    """The suffix is checked first: with a missing checkpoint, the error is still about --out."""
    code, _, err = run_cli(capsys, "sample", "--ckpt", tmp_path / "missing", "--out", tmp_path / "x.jpg")
    assert_one_line_error(code, err, "must end in .png", ".npy")
