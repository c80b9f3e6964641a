"""Consistency models (Song et al. 2023; Song & Dhariwal 2023): the parameterisation's boundary condition, the
training schedule and level distribution against their closed forms, the losses on exact Gaussian stand-ins, the
sampler, the sampler families, and trained toy models against thresholds an untrained one fails."""

import math

import pytest
import torch
from scipy import stats

import difflab
from difflab.consistency import (
    ConsistencyDistillationLoss,
    ConsistencyTrainingLoss,
    consistency_distance,
    heun_step,
    ict_discretisation,
    karras_levels,
    lognormal_mass,
    lognormal_pair_probabilities,
)
from difflab.errors import DifflabError
from difflab.eval.toy_metrics import sliced_wasserstein
from difflab.formulations import CDConfig, CTConfig, make_formulation
from difflab.oracles import GaussianDenoiser
from difflab.sampling.consistency import sample_consistency

MU, STD = 0.5, 0.3  # 1-D Gaussian data: its consistency function is the PF-ODE map in closed form


class ExactConsistency(torch.nn.Module):
    """f(x, sigma) = the exact PF-ODE map of N(MU, STD^2) data from sigma to sigma_min (a stand-in student)."""

    def __init__(self, sigma_min=0.002):
        super().__init__()
        self.sigma_min = sigma_min
        self.weight = torch.nn.Parameter(torch.ones(()))  # something for the target EMA to follow

    def forward(self, x, sigma, cond=None):
        scale = ((STD**2 + self.sigma_min**2) / (STD**2 + sigma**2)).sqrt().reshape(-1, *[1] * (x.ndim - 1))
        return MU + self.weight * scale * (x - MU)


def gaussian_teacher():
    return GaussianDenoiser(torch.tensor([MU]), torch.tensor([STD]))


def test_the_boundary_condition_is_exact_for_any_network():
    net = torch.nn.Linear(3, 3)
    f = make_formulation(CTConfig()).denoiser(lambda x, c_noise, cond: net(x) * 100)
    x = torch.randn(4, 3)
    assert torch.equal(f(x, torch.full((4,), 0.002)), x)
    assert not torch.allclose(f(x, torch.full((4,), 1.0)), x)


def test_ict_schedule_doubles_n_in_stages_from_s0_to_s1():
    # K = 800 steps, s0 = 10, s1 = 1280: log2(128) + 1 = 8 stages of K' = 100 steps each
    assert [ict_discretisation(k, 800, 10, 1280) for k in (0, 99, 100, 250, 699, 700, 799)] == [
        11, 11, 21, 41, 641, 1281, 1281]  # fmt: skip
    assert ict_discretisation(0, 3, 10, 1280) == 11 and ict_discretisation(2, 3, 10, 1280) == 41  # K' >= 1


def test_karras_levels_and_lognormal_pair_probabilities_match_their_closed_forms():
    levels = karras_levels(11, 0.002, 80.0)
    assert levels[0] == pytest.approx(0.002) and levels[-1] == pytest.approx(80.0)
    assert bool((levels[1:] > levels[:-1]).all())
    probs = lognormal_pair_probabilities(levels, -1.1, 2.0)
    cdf = stats.lognorm(s=2.0, scale=math.exp(-1.1)).cdf(levels.numpy())
    expected = (cdf[1:] - cdf[:-1]) / (cdf[-1] - cdf[0])
    assert probs.numpy() == pytest.approx(expected, rel=1e-9)
    mass = lognormal_mass(levels, -1.1, 2.0)  # unnormalised: the probability between adjacent levels
    assert mass.numpy() == pytest.approx(cdf[1:] - cdf[:-1], rel=1e-9)
    one_std = torch.tensor([math.exp(-1.1 - 2.0), math.exp(-1.1 + 2.0)], dtype=torch.float64)
    assert lognormal_mass(one_std, -1.1, 2.0).item() == pytest.approx(0.682689492, rel=1e-8)


def test_pseudo_huber_distance():
    a, b = torch.zeros(2, 4), torch.tensor([[3.0, 4.0, 0, 0], [0, 0, 0, 0]])
    assert consistency_distance(a, b, 1.0).tolist() == pytest.approx([math.sqrt(26) - 1, 0.0])
    assert consistency_distance(a, b, None).tolist() == pytest.approx([25 / 4, 0.0])


def test_heun_step_is_third_order_locally_on_the_gaussian():
    teacher = GaussianDenoiser(torch.tensor([MU], dtype=torch.float64), torch.tensor([STD], dtype=torch.float64))
    x, errors = torch.randn(64, 1, dtype=torch.float64) * 2, []
    for h in (0.1, 0.05, 0.025):
        sigma, sigma_next = (torch.full((64,), s, dtype=torch.float64) for s in (1.0, 1.0 - h))
        exact = teacher.pf_ode_solution(x, 1.0, 1.0 - h)
        errors.append((heun_step(teacher, x, sigma, sigma_next, None) - exact).abs().max().item())
    assert 6 < errors[0] / errors[1] < 10 and 6 < errors[1] / errors[2] < 10  # local error O(h^3)


def test_distillation_loss_vanishes_for_the_exact_consistency_function_and_not_for_the_denoiser():
    cd = make_formulation(CDConfig(levels=40))
    x0 = MU + STD * torch.randn(512, 1)
    exact = ConsistencyDistillationLoss(cd, ExactConsistency(), gaussian_teacher())
    exact.begin_step(0, 10)
    small = exact(exact.student, x0, torch.Generator().manual_seed(0)).mean()
    wrong = ConsistencyDistillationLoss(cd, gaussian_teacher_module(), gaussian_teacher())
    wrong.begin_step(0, 10)
    large = wrong(wrong.student, x0, torch.Generator().manual_seed(0)).mean()
    assert small < large / 1000  # measured: 4e-8 against 2e-4 (Heun's local error is O(h^3))


def gaussian_teacher_module():
    teacher = gaussian_teacher()

    class Denoiser(torch.nn.Module):  # the posterior mean D: not consistent (it depends on sigma along a trajectory)
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(()))

        def forward(self, x, sigma, cond=None):
            return self.weight * teacher(x, sigma)

    return Denoiser()


def test_distillation_target_starts_as_the_student_and_follows_it_as_an_ema():
    cd = make_formulation(CDConfig(target_ema=0.9))
    loss = ConsistencyDistillationLoss(cd, ExactConsistency(), gaussian_teacher())
    with torch.no_grad():
        loss.student.weight.fill_(3.0)
    loss.begin_step(0, 10)  # the first step copies the student's (initial) weights
    assert loss.target.weight.item() == 3.0
    with torch.no_grad():
        loss.student.weight.fill_(2.0)
    loss.end_step(loss.student)
    assert loss.target.weight.item() == pytest.approx(0.9 * 3 + 0.1 * 2)


def test_consistency_training_loss_by_hand():
    """f = identity: f(x0 + s' z) - f(x0 + s z) = (s' - s) z, so the loss is (sqrt((s' - s)^2 |z|^2 + c^2) - c)/(s' - s)
    with the pair (s, s') and z the loss draws from its generator, in that order."""
    loss = ConsistencyTrainingLoss(make_formulation(CTConfig()))
    loss.begin_step(150, 800)  # stage 1 of 8: N = 21
    assert loss.levels == 21
    x0 = torch.randn(64, 2)
    got = loss(lambda x, sigma, cond: x, x0, torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    levels = karras_levels(21, 0.002, 80.0)
    i = torch.multinomial(lognormal_pair_probabilities(levels, -1.1, 2.0).float(), 64, replacement=True, generator=gen)
    z = torch.randn(64, 2, generator=gen)
    h, c = (levels[i + 1] - levels[i]).float(), 0.00054 * math.sqrt(2)
    expected = ((h**2 * z.pow(2).sum(1) + c**2).sqrt() - c) / h
    torch.testing.assert_close(got, expected)
    with pytest.raises(DifflabError, match="needs --steps"):
        loss.begin_step(0, None)


def test_one_step_and_multistep_consistency_sampling_of_the_exact_function_give_the_data():
    f = ExactConsistency()
    z = torch.randn(20_000, 1, generator=torch.Generator().manual_seed(0))
    grid = make_formulation(CTConfig()).sigmas(1)
    one = sample_consistency(f, 80.0 * z, grid)
    gen = torch.Generator().manual_seed(1)
    three = sample_consistency(
        f, 80.0 * z, torch.tensor([80.0, 2.0, 0.5, 0.0]), noise=lambda x: torch.randn(x.shape, generator=gen)
    )
    for x in (one, three):
        assert x.mean().item() == pytest.approx(MU, abs=0.01) and x.std().item() == pytest.approx(STD, abs=0.01)
    assert not torch.allclose(one, three)


def test_sampler_families_are_kept_apart(moons_ddpm_run):
    ct = make_formulation(CTConfig())
    with pytest.raises(DifflabError, match="sampler 'ddim' is for diffusion models; a ct model samples with "
                                           "consistency"):  # fmt: skip
        ct.sampler("ddim")
    pipe = difflab.load(moons_ddpm_run)
    with pytest.raises(DifflabError, match="sampler 'consistency' is for consistency models; a ddpm model"):
        pipe.sample(2, sampler="consistency")
    assert ct.sampler("consistency").name == "consistency"
    assert pipe.sampling_defaults() == {"sampler": "ddim", "steps": 50, "grid": "respaced"}


def moons_quality(pipe, **kwargs):
    data = difflab.load_dataset("moons").data
    return sliced_wasserstein(pipe.sample(2000, seed=0, **kwargs), data[:2000])


def test_consistency_training_on_moons_samples_in_one_step(tmp_path):
    """Measured (600 steps, seed 0): one step SW2 0.07, untrained 0.8 (2000 samples; real-vs-real 0.03)."""
    data = difflab.load_dataset("moons")
    run = difflab.train(difflab.run_config(data, process="ct", steps=600), tmp_path / "ct", progress=False)
    pipe = difflab.load(run)
    assert pipe.sampling_defaults() == {"sampler": "consistency", "steps": 1, "grid": "trailing"}
    stats_ = {}
    assert moons_quality(pipe, stats=stats_) < 0.15 and stats_["nfe"] == 1
    untrained = difflab.load(run / "checkpoints" / "step_00000600", use_ema=False)
    untrained.denoiser.net.apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None)
    assert moons_quality(untrained) > 0.3


def test_consistency_training_resumes_exactly(tmp_path):
    """N(k) is a function of the step and the budget: 3 steps + resume to 6 equal 6 straight (s0 = 2, s1 = 64: K' = 1
    for K = 3 and 6 alike, so N doubles every step in both)."""
    from conftest import assert_exact_resume

    data = difflab.load_dataset("moons")
    make = lambda steps: difflab.run_config(data, process="ct", steps=steps, checkpoint_every=3, s0=2, s1=64)  # noqa: E731
    assert_exact_resume(make, data, tmp_path, first_weight(make(1)))


def first_weight(config) -> str:
    from difflab.nets import build_network

    return next(iter(build_network(config.model).state_dict()))


def test_multistep_consistency_sampling_at_chosen_levels_through_the_cli(tmp_path, capsys):
    from conftest import assert_one_line_error, run_cli

    run = difflab.train(difflab.run_config(difflab.load_dataset("moons"), process="ct", steps=2), tmp_path / "ct",
                        progress=False)  # fmt: skip
    pipe = difflab.load(run)
    assert pipe.sigmas(1, "80,0.8").tolist() == pytest.approx([80.0, 0.8, 0.0])
    stats = {}
    chosen = pipe.sample(4, grid=[80.0, 0.8], stats=stats)
    assert stats["nfe"] == 2 and not torch.allclose(chosen, pipe.sample(4))
    code, out, _ = run_cli(capsys, "sample", "--ckpt", run, "--grid", "80,2,0.5", "--n", 4, "--out", tmp_path / "a.npy")
    assert code == 0 and "(3 network evaluations per sample)" in out
    for bad in ("80,0.8,0.8", "0.8,80", "80,x"):
        code, _, err = run_cli(capsys, "sample", "--ckpt", run, "--grid", bad, "--out", tmp_path / "b.npy")
        assert_one_line_error(code, err, "noise levels" if bad != "80,x" else "numbers separated by commas")
