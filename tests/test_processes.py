"""Continuous-time processes, EDM preconditioning, and training/sampling every process end to end."""

import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad

from difflab.cli.main import main
from difflab.eval.quality import toy_quality
from difflab.formulations.edm import EDMConfig
from difflab.generate import generate
from difflab.pipeline import load
from difflab.precond import EDMPrediction, PreconditionedDenoiser, make_prediction, network_target
from difflab.processes import VESDE, VPSDE, EDMProcess, SubVPSDE, uniform_t_sigmas
from difflab.sampling import SAMPLERS

T = torch.tensor([1e-3, 0.1, 0.5, 1.0], dtype=torch.float64)


def test_vp_marginal_is_the_integral_of_beta():
    vp = VPSDE()
    mean, std = vp.marginal(T)
    for t, m, s in zip(T.tolist(), mean.tolist(), std.tolist(), strict=True):
        integral, _ = quad(lambda u: vp.beta_min + u * (vp.beta_max - vp.beta_min), 0, t)
        assert m == pytest.approx(math.exp(-0.5 * integral), rel=1e-12)
        assert s == pytest.approx(math.sqrt(1 - math.exp(-integral)), rel=1e-12)


def test_subvp_std_has_no_square_root_and_sigma_is_std_over_mean():
    sub, vp = SubVPSDE(), VPSDE()
    mean, std = sub.marginal(T)
    torch.testing.assert_close(mean, vp.marginal(T)[0])
    torch.testing.assert_close(std, 1 - mean**2)
    for proc in (vp, sub, VESDE(), EDMProcess()):
        m, s = proc.marginal(T)
        torch.testing.assert_close(proc.sigma(T), s / m)
        torch.testing.assert_close(proc.t_of_sigma(proc.sigma(T)), T)
        torch.testing.assert_close(proc.signal_scale(proc.sigma(T)), m)


def test_priors_in_sigma_space():
    vp, sub = VPSDE(), SubVPSDE()
    assert vp.prior_std**2 == pytest.approx(1 + vp.sigma_max**2, rel=1e-9)  # N(0, I) at t = 1, divided by mean(1)
    assert sub.prior_std == pytest.approx(vp.prior_std, rel=1e-12)  # same mean; sub-VP's std(1) is ~1 too
    assert VESDE(0.01, 50.0).prior_std == 50.0 and EDMProcess().prior_std == 80.0


def test_ve_is_geometric_and_edm_is_identity():
    ve = VESDE(0.01, 50.0)
    torch.testing.assert_close(ve.sigma(T), 0.01 * 5000.0**T)
    assert (ve.sigma_min, ve.sigma_max) == (0.01, 50.0)
    assert (EDMProcess().sigma_min, EDMProcess().sigma_max) == (0.002, 80.0)
    grid = uniform_t_sigmas(VPSDE(), 5)
    assert len(grid) == 6 and grid[-1] == 0 and grid[0].item() == pytest.approx(VPSDE().sigma_max, rel=1e-5)


def test_edm_preconditioning_matches_karras_table_1():
    sigma = torch.tensor([0.002, 0.5, 80.0], dtype=torch.float64)
    sc = make_prediction("edm", sigma_data=0.5).scalings(sigma)
    torch.testing.assert_close(sc.c_skip, 0.25 / (sigma**2 + 0.25))
    torch.testing.assert_close(sc.c_out, sigma * 0.5 / (sigma**2 + 0.25).sqrt())
    torch.testing.assert_close(sc.c_in, 1 / (sigma**2 + 0.25).sqrt())
    # the F-space target makes D exact, and has unit variance for data of std sigma_data (EDM's design goal)
    g = torch.Generator().manual_seed(0)
    x0 = 0.5 * torch.randn(20000, 1, generator=g, dtype=torch.float64)
    for s in (0.002, 0.5, 80.0):
        sig = torch.full((20000,), s, dtype=torch.float64)
        x = x0 + s * torch.randn(20000, 1, generator=g, dtype=torch.float64)
        target = network_target(make_prediction("edm").scalings(sig), x, x0)
        assert target.std().item() == pytest.approx(1.0, rel=0.03)

        class Perfect(torch.nn.Module):
            def forward(self, x_in, c_noise, cond=None, t=target):
                return t

        d = PreconditionedDenoiser(Perfect(), make_prediction("edm"), lambda s: s.log() / 4)
        torch.testing.assert_close(d(x, sig), x0)


@pytest.fixture
def runs(moons_ddpm_run, edm_run):
    """Tiny MLPs trained on moons as a discrete DDPM (the session's, v-prediction, 2000 steps: tests/conftest.py) and
    with EDM."""
    return {"ddpm": moons_ddpm_run, "edm": edm_run}


@pytest.mark.slow
def test_edm_training_with_heun_reaches_the_floor_in_20_steps(edm_run, tmp_path):
    model = load(edm_run)
    assert model.config.process == "edm" and model.formulation.name == "edm"
    assert model.config.formulation == EDMConfig() and isinstance(model.denoiser.prediction, EDMPrediction)
    samples = generate(model.denoiser, (2,), model.sigmas(20), list(range(1000)), sampler="heun")
    q = toy_quality(samples, "moons")
    assert q["swd"] < q["swd_floor"] + 0.04, q
    untrained_dir = tmp_path / "untrained"
    assert main(["train", "--data", "moons", "--process", "edm", "--out", str(untrained_dir), "--steps", "1",
                 "--lr", "1e-12", "--no-progress"]) == 0  # fmt: skip
    untrained = load(untrained_dir)
    bad = generate(untrained.denoiser, (2,), untrained.sigmas(20), list(range(1000)), sampler="heun")
    assert toy_quality(bad, "moons")["swd"] > q["swd_floor"] + 0.04


@pytest.mark.slow
@pytest.mark.parametrize("process", ["ddpm", "edm"])
def test_every_sampler_runs_on_every_model(runs, process):
    """300 samples a sampler (500 took 45 s for both models), 20 steps, 50 for the stochastic samplers that need more
    (euler_maruyama, pc, ald: 100 steps took twice as long, ald's 5 Langevin steps a level 4 s a model), rk45 at
    rtol = atol = 1e-3 (its default 1e-5 took 456 evaluations, 2.9 s, on the ddpm model; 84 at 1e-3). Measured: the
    worst sampler scores SW2 0.211 (dpmpp_2m_sde, ddpm; the 4000-step eps-prediction run scored 0.22, and 0.23 with
    500 samples) and 0.088 (ddpm and euler_ancestral, edm; 0.095, 0.093 for edm runs trained with seeds 1, 2; 0.073
    with 500 samples); ald at 50 steps 0.097 (ddpm) and 0.085 (edm), at 100 steps 0.058 and 0.047."""
    model = load(runs[process])
    for name in (name for name, spec in SAMPLERS.items() if spec.family == "diffusion"):  # (consistency: ct, cd)
        steps = 50 if name in ("euler_maruyama", "pc", "ald") else 20
        options = {"rtol": 1e-3, "atol": 1e-3} if name == "rk45" else {}
        stats = {}
        samples = generate(model.denoiser, (2,), model.sigmas(steps), list(range(300)), sampler=name, options=options,
                           stats=stats)  # fmt: skip
        assert torch.isfinite(samples).all(), (process, name)
        spec = SAMPLERS[name]
        assert stats["nfe"] > 0 and (spec.cost is None or stats["nfe"] == spec.nfe(steps, options)), (name, stats)
        # untrained models score SW2 > 170 (ddpm) and 0.22-0.41 (edm, whose output starts near c_skip x)
        assert toy_quality(samples, "moons")["swd"] < {"ddpm": 0.3, "edm": 0.12}[process], (process, name)


@pytest.mark.parametrize(
    ("process", "prediction", "fragment"),
    [
        ("edm", "v", "process 'edm' does not take --prediction"),  # EDM's preconditioning is its only prediction
        ("ddpm", "edm", "formulation 'ddpm' trains with prediction eps or x0 or v, not 'edm'"),
    ],
)
def test_process_and_prediction_must_match(process, prediction, fragment, tmp_path, capsys):
    code = main(["train", "--data", "moons", "--process", process, "--prediction", prediction, "--out", str(tmp_path),
                 "--steps", "1"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1
    assert not np.any([p.name == "checkpoints" for p in tmp_path.iterdir()])


@pytest.mark.slow
@pytest.mark.parametrize("process", ["vp", "subvp", "ve"])
def test_score_sde_processes_train_and_sample(process, tmp_path):
    """score_sde-style continuous training (t ~ U, eps target) on moons, sampled with the reverse SDE. 500 steps of
    batch 512 at lr 2e-3 after a 50-step warm-up (the samples of 1000 steps of the default batch 256 at lr 1e-3, in
    two thirds of the time: one step of the tiny MLP costs little more at 512), measured SW2 (seeds 0, 1): vp 0.044,
    0.042; subvp 0.041, 0.042; ve 0.021, 0.024. The 1000 default steps scored (seeds 0, 1, 2) vp 0.040, 0.044,
    0.039; subvp 0.038, 0.040, 0.038; ve 0.024, 0.024, 0.025; too short: 500 steps of batch 256 at lr 2e-3 vp 0.056,
    0.058, 600 after a 50-step warm-up vp 0.051, ve 0.032 and 0.167 (seed 1)."""
    argv = ["train", "--data", "moons", "--process", process, "--steps", "500", "--batch-size", "512", "--lr", "2e-3",
            "--warmup", "50", "--no-progress"]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path)]) == 0
    model = load(tmp_path)
    samples = generate(model.denoiser, (2,), model.sigmas(100), list(range(1000)), sampler="euler_maruyama")
    q = toy_quality(samples, "moons")
    assert q["swd"] < 0.06, (process, q)  # untrained models of these processes score SW2 > 70
