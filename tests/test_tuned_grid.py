"""Grids tuned on a model's own PF-ODE (`difflab.tuned_grid`, `difflab tune-grid`, `--grid tuned`): the search against
a brute-force optimum on Gaussian data, its gain on the exact mixture denoiser on seeds it never saw, storage with the
checkpoint, and the refusals."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, run_cli

import difflab
from difflab.errors import DifflabError
from difflab.oracles import GaussianDenoiser, GaussianMixtureDenoiser
from difflab.sampling import SAMPLERS
from difflab.schedules import karras_sigmas, log_snr_sigmas
from difflab.tuned_grid import GRIDS_FILE, rms_distance, tune_levels


def ring_mixture() -> GaussianMixtureDenoiser:
    """8 Gaussians of std 0.08 on the unit circle (the samplers benchmark's 2-D mixture): a stiff PF-ODE near sigma
    0.1, where grids that do not place levels there lose accuracy."""
    angles = torch.arange(8, dtype=torch.float64) * 2 * math.pi / 8
    means = torch.stack([angles.cos(), angles.sin()], dim=1)
    return GaussianMixtureDenoiser(means, torch.full((8,), 0.08, dtype=torch.float64), torch.ones(8).double())


def solve(oracle, sampler: str, sigmas: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return SAMPLERS[sampler].fn(oracle, noise * sigmas[0], sigmas)


def test_the_search_finds_the_best_middle_level_of_a_two_step_euler_grid():
    """Gaussian data, Euler with levels (80, s, 0): the endpoint error against the exact PF-ODE solution is a function
    of s alone; coordinate descent must land where a brute-force scan of s puts its minimum."""
    oracle = GaussianDenoiser(torch.tensor([0.3, -0.2], dtype=torch.float64), torch.tensor([0.5, 1.5]).double())
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = oracle.pf_ode_solution(noise * 80.0, 80.0, 0.0)

    def error(s: float) -> float:
        return rms_distance(solve(oracle, "euler", torch.tensor([80.0, s, 0.0]).double(), noise), exact)

    scan = np.exp(np.linspace(math.log(0.01), math.log(79.0), 4001))
    best = float(scan[int(np.argmin([error(s) for s in scan]))])
    start = torch.tensor([80.0, 20.0, 0.0], dtype=torch.float64)  # far from the optimum (measured: s = 0.97)
    levels, tuned, start_error, _ = tune_levels(lambda s: solve(oracle, "euler", s, noise), start, exact, 0.01,
                                                min_delta=1e-3)  # fmt: skip
    assert abs(math.log(float(levels[1])) - math.log(best)) < 0.01, (float(levels[1]), best)
    assert tuned == pytest.approx(error(best), rel=1e-3) and start_error > 1.2 * tuned


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "unipc", "lms"])
def test_tuned_levels_beat_the_default_grid_on_seeds_they_never_saw(sampler):
    """10 steps on the ring mixture, tuned on 128 starts, scored on 1000 others against an accurate solve (dpmpp_2m,
    1000 steps on log-SNR), RMS per coordinate. Measured: dpmpp_2m 0.057 -> 0.011, unipc 0.040 -> 0.006, lms 0.040
    -> 0.010 (Euler at 50 steps on Karras: 0.012). The levels stay a valid grid."""
    oracle = ring_mixture()
    g = torch.Generator().manual_seed(0)
    tuning, held_out = (torch.randn(k, 2, generator=g, dtype=torch.float64) for k in (128, 1000))
    fine = log_snr_sigmas(1000, 0.002, 80.0).double()
    start = (log_snr_sigmas if SAMPLERS[sampler].grid == "log_snr" else karras_sigmas)(10, 0.002, 80.0).double()
    levels, tuned, start_error, evaluations = tune_levels(
        lambda s: solve(oracle, sampler, s, tuning), start, solve(oracle, "dpmpp_2m", fine, tuning), 0.002
    )
    assert tuned <= start_error and evaluations <= 400
    truth = solve(oracle, "dpmpp_2m", fine, held_out)
    before, after = (rms_distance(solve(oracle, sampler, s, held_out), truth) for s in (start, levels))
    assert after < 0.35 * before, (before, after)
    assert len(levels) == 11 and levels[0] == 80.0 and levels[-1] == 0
    assert bool((levels[:-2] > levels[1:-1]).all()) and float(levels[-2]) >= 0.002 * (1 - 1e-6)


def test_a_one_step_grid_has_nothing_to_tune():
    with pytest.raises(DifflabError, match="one step"):
        tune_levels(lambda s: s, torch.tensor([80.0, 0.0]), torch.zeros(1), 0.002)


@pytest.fixture
def moons_copy(moons_ddpm_run, tmp_path):
    """The shared moons DDPM run, copied: tuning writes into the checkpoint folder."""
    return shutil.copytree(moons_ddpm_run, tmp_path / "moons")


def test_tune_grid_stores_levels_that_grid_tuned_samples_with(moons_copy):
    """On a trained model: the grid is stored in the checkpoint folder, `grid="tuned"` samples with exactly those
    levels, and they are closer to the accurate solve than the default grid on seeds not tuned on (measured at 4 steps:
    0.153 -> 0.055 on the 64 tuning seeds, 0.140 -> 0.052 on 64 others; at 10 steps 0.017 -> 0.0054 on 512 others)."""
    pipe = difflab.load(moons_copy)
    tuned = difflab.tune_grid(pipe, "dpmpp_2m", 4, n=64, check_n=64, max_evaluations=80)
    assert (pipe.checkpoint / GRIDS_FILE).is_file()
    assert tuned.error <= tuned.start_error and tuned.check_error < 0.5 * tuned.check_start_error
    again = difflab.load(moons_copy)
    levels = again.sigmas(4, "tuned", "dpmpp_2m")
    assert levels.tolist() == pytest.approx(tuned.sigmas)
    assert torch.equal(again.sigmas(4, " Tuned ", "DPM++ 2M"), levels)  # any spelling of the name, a sampler alias
    by_name = again.sample(8, sampler="dpmpp_2m", steps=4, grid="tuned")
    by_levels = again.sample(8, sampler="dpmpp_2m", grid=tuned.sigmas[:-1])
    assert torch.equal(by_name, by_levels)
    with pytest.raises(DifflabError, match="no grid tuned for dpmpp_2m at 5 steps.*difflab tune-grid"):
        again.sigmas(5, "tuned", "dpmpp_2m")
    raw = difflab.load(moons_copy, use_ema=False)  # other weights: the levels were not tuned for them
    with pytest.raises(DifflabError, match=r"on these weights.*4 steps \(other weights\).*--ckpt \S*model.safetensors"):
        raw.sigmas(4, "tuned", "dpmpp_2m")
    with pytest.raises(DifflabError, match="default options; drop order"):  # its levels are looked up without them
        difflab.tune_grid(again, "unipc", 4, order=3)


def test_the_cli_tunes_then_samples_with_grid_tuned(moons_copy, capsys, tmp_path):
    code, out, err = run_cli(capsys, "tune-grid", "--ckpt", moons_copy, "--steps", 3, "--n", 32, "--check-n", 16,
                             "--max-evaluations", 30)  # fmt: skip
    assert code == 0, err
    pipe = difflab.load(moons_copy)
    stored = json.loads((pipe.checkpoint / GRIDS_FILE).read_text())[f"dpmpp_2m@3:{pipe.weights_hash()}"]
    levels = ", ".join(f"{s:.4g}" for s in stored["sigmas"][:-1])
    assert f"dpmpp_2m at 3 steps: levels {levels}, then 0" in out and len(stored["sigmas"]) == 4
    code, out, err = run_cli(capsys, "info", moons_copy)
    assert code == 0, err
    assert (f"tuned grids   dpmpp_2m at 3 steps (weights {pipe.weights_hash()}): error {stored['start_error']:.3g} -> "
            f"{stored['error']:.3g} from the {stored['start_grid']} grid, held-out "
            f"{stored['check_start_error']:.3g} -> {stored['check_error']:.3g}") in out  # fmt: skip
    code, out, err = run_cli(capsys, "sample", "--ckpt", moons_copy, "--sampler", "dpmpp_2m", "--steps", 3, "--grid",
                             "tuned", "--n", 16, "--out", tmp_path / "x.npy")  # fmt: skip
    assert code == 0, err
    assert np.load(tmp_path / "x.npy").shape == (16, 2)
    recorded = json.loads((tmp_path / "x.npy.json").read_text())["grid"]  # the levels, so --from-png outlives a retune
    assert [float(v) for v in recorded.split(",")] == difflab.load(moons_copy).sigmas(3, "tuned", "dpmpp_2m")[
        :-1
    ].tolist()
    code, _, err = run_cli(capsys, "sample", "--ckpt", moons_copy, "--sampler", "dpmpp_2m", "--steps", 7, "--grid",
                           "tuned", "--n", 4, "--out", tmp_path / "y.npy")  # fmt: skip
    assert_one_line_error(code, err, "no grid tuned for dpmpp_2m at 7 steps", "stored: dpmpp_2m at 3 steps",
                          "difflab tune-grid")  # fmt: skip
    assert not (tmp_path / "y.npy").exists()


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--sampler", "ddpm"], "draws fresh noise"),
        (["--sampler", "rk45"], "chooses its own steps"),
        (["--steps", "1"], "at least 2"),
        (["--sampler", "nosuch"], "nosuch"),
        (["--reference-steps", "5", "--steps", "10"], "--reference-steps"),
    ],
)
def test_the_cli_refuses_what_cannot_be_tuned(moons_copy, capsys, argv, fragment):
    code, _, err = run_cli(capsys, "tune-grid", "--ckpt", moons_copy, *argv)
    assert_one_line_error(code, err, fragment)
    assert not list(moons_copy.rglob(GRIDS_FILE))


def test_a_malformed_grids_file_is_a_one_line_error(moons_copy, capsys, tmp_path):
    checkpoint = difflab.load(moons_copy).checkpoint
    (checkpoint / GRIDS_FILE).write_text("[1, 2")
    code, _, err = run_cli(capsys, "sample", "--ckpt", moons_copy, "--sampler", "dpmpp_2m", "--steps", 3, "--grid",
                           "tuned", "--out", tmp_path / "x.npy")  # fmt: skip
    assert_one_line_error(code, err, GRIDS_FILE, "not a tuned-grid file")
    code, _, err = run_cli(capsys, "tune-grid", "--ckpt", moons_copy, "--steps", 3, "--max-evaluations", 100000)
    assert_one_line_error(code, err, GRIDS_FILE, "not a tuned-grid file")  # before the solves, not after them


def test_a_formulation_alone_has_no_tuned_grid():
    """The levels live with a checkpoint: a formulation without one refuses `tuned` rather than picking some grid."""
    from difflab.formulations import make_config, make_formulation

    with pytest.raises(DifflabError, match="tune-grid"):
        make_formulation(make_config("edm")).sigmas(10, "tuned")


def test_a_start_that_diverges_is_left_for_any_finite_grid():
    """A stand-in solver that diverges (NaN) while the middle level is above 40 and otherwise returns that level: from a
    diverging start the search still walks to the level that matches the reference (1.0)."""

    def solve(levels: torch.Tensor) -> torch.Tensor:
        middle = levels[1:2].double()
        return torch.full_like(middle, math.nan) if middle.item() > 40 else middle

    levels, error, start_error, _ = tune_levels(solve, torch.tensor([80.0, 50.0, 0.0]).double(),
                                                torch.ones(1).double(), 0.01, min_delta=1e-3)  # fmt: skip
    assert math.isnan(start_error) and error < 0.01 and abs(math.log(float(levels[1]))) < 0.01


def test_two_tunings_storing_at_once_keep_both_grids(tmp_path, monkeypatch):
    """store reads grids.json, adds its grid and writes it back: without a lock the slower writer drops the other."""
    import threading
    import time

    from difflab import tuned_grid

    read = tuned_grid.read_grids

    def slow_read(checkpoint):
        grids = read(checkpoint)
        time.sleep(0.3)  # both threads would read the empty file before either writes
        return grids

    monkeypatch.setattr(tuned_grid, "read_grids", slow_read)
    fields = dict(weights_hash="abc", start_grid="karras", error=0.1, start_error=0.2, check_error=None,
                  check_start_error=None, evaluations=1, n=1, check_n=0, seed=0, reference="dpmpp_2m 200",
                  conditions={})  # fmt: skip
    grids = [tuned_grid.TunedGrid(sampler=s, steps=3, sigmas=[80.0, 1.0, 0.1, 0.0], **fields) for s in ("euler", "lms")]
    threads = [threading.Thread(target=tuned_grid.store, args=(tmp_path, g)) for g in grids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(read(tmp_path)) == ["euler@3:abc", "lms@3:abc"]
