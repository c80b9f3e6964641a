import inspect

import pytest
import torch
from conftest import GaussianDenoiser

from difflab.adapters import discrete_time_denoiser
from difflab.errors import DifflabError
from difflab.nets.mlp import MLP, MLPConfig
from difflab.precond import make_prediction
from difflab.sampling import SAMPLERS, GeneratorNoise, PerSampleNoise, get_sampler
from difflab.sampling.ancestral import sample_ddim, sample_ddpm
from difflab.schedules import DiscreteSchedule, karras_sigmas

MU = torch.tensor([0.5, -1.0])
STD = torch.tensor([0.3, 0.8])
N = 20_000


def _start(schedule, steps, n=N, seed=0):
    sigmas = schedule.respaced_sigmas(steps)
    noise = PerSampleNoise(range(seed, seed + n))
    return sigmas, noise, noise.initial((2,), float(sigmas[0]))


@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
def test_ddim_eta0_is_the_exact_pf_ode_map_for_gaussian_data(schedule_name):
    """For Gaussian data the PF-ODE maps x_T to mu + std / sqrt(std^2 + sigma_max^2) (x_T - mu)."""
    schedule = DiscreteSchedule.from_name(schedule_name)
    sigmas, _, x = _start(schedule, 1000, n=500)
    x64 = x.double()
    out = sample_ddim(GaussianDenoiser(MU.double(), STD.double()), x64, sigmas.double())
    s_max = sigmas[0].double()
    expected = MU + STD / (STD**2 + s_max**2).sqrt() * (x64 - MU)
    err_1000 = (out - expected).abs().max().item()
    assert err_1000 < 0.01
    # DDIM is first order: a 4x coarser grid has about 4x the error
    out_250 = sample_ddim(GaussianDenoiser(MU.double(), STD.double()), x64, schedule.respaced_sigmas(250).double())
    assert 3.0 < (out_250 - expected).abs().max().item() / err_1000 < 5.0


def test_ddim_eta0_is_deterministic_and_draws_no_noise():
    schedule = DiscreteSchedule.from_name("linear")
    sigmas, _, x = _start(schedule, 20, n=8)

    def no_noise(like):
        raise AssertionError("eta=0 must not draw noise")

    a = sample_ddim(GaussianDenoiser(MU, STD), x, sigmas, noise=no_noise)
    b = sample_ddim(GaussianDenoiser(MU, STD), x.clone(), sigmas, noise=no_noise)
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "sampler,kwargs",
    [(sample_ddpm, {"variance": "small"}), (sample_ddpm, {"variance": "large"}), (sample_ddim, {"eta": 1.0})],
)
def test_stochastic_samplers_reach_the_true_gaussian(sampler, kwargs):
    schedule = DiscreteSchedule.from_name("linear")
    sigmas = schedule.respaced_sigmas(1000)
    g = torch.Generator().manual_seed(0)
    x = sigmas[0] * torch.randn(N, 2, generator=g)
    out = sampler(GaussianDenoiser(MU, STD), x, sigmas, noise=GeneratorNoise(g), **kwargs)
    se_mean = STD / N**0.5
    torch.testing.assert_close(out.mean(0), MU, atol=float(4 * se_mean.max()), rtol=0)
    torch.testing.assert_close(out.std(0), STD, rtol=0.03, atol=0)


@pytest.mark.parametrize("variance", ["small", "large"])
@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
def test_ddpm_step_has_the_posterior_mean_and_the_chosen_variance(schedule_name, variance):
    """One DDPM step from t to t-1 (repo indices k, k-1), in VP coordinates x_t = sqrt(abar_t) x (Ho et al. 2020,
    Eq. 6-7 and Sec. 3.2): mean c1 x0_hat + c2 x_t, added variance beta_t ('large') or beta-tilde_t =
    beta_t (1 - abar_{t-1}) / (1 - abar_t) ('small'). Expected values come from the schedule's float64 tables."""
    schedule = DiscreteSchedule.from_name(schedule_name)
    betas, abars = schedule.betas, schedule.alpha_bars
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=g, dtype=torch.float64)
    x0_hat = torch.randn(64, 3, generator=g, dtype=torch.float64)  # what the denoiser returns, whatever x is
    z = torch.randn(64, 3, generator=g, dtype=torch.float64)  # the step's noise, fixed

    def denoiser(x, sigma, cond=None):
        return x0_hat

    for k in (1, 2, 10, 300, 700, 999):
        beta, abar, abar_prev = betas[k], abars[k], abars[k - 1]
        sigmas = torch.stack([schedule.sigmas[k], schedule.sigmas[k - 1]])  # sigma = sqrt((1 - abar) / abar)
        step = [sample_ddpm(denoiser, x, sigmas, variance=variance, noise=fn) for fn in (torch.zeros_like, lambda _: z)]
        mean_vp, noisy_vp = (abar_prev.sqrt() * out for out in step)  # back to VP coordinates at t - 1
        c1 = abar_prev.sqrt() * beta / (1 - abar)
        c2 = (1 - beta).sqrt() * (1 - abar_prev) / (1 - abar)
        torch.testing.assert_close(mean_vp, c1 * x0_hat + c2 * abar.sqrt() * x, rtol=1e-9, atol=1e-12)
        expected_var = beta if variance == "large" else beta * (1 - abar_prev) / (1 - abar)
        std = (noisy_vp - mean_vp) / z
        torch.testing.assert_close(std, expected_var.sqrt().expand_as(std), rtol=1e-8, atol=0)


def test_image_i_of_a_batch_equals_its_seed_alone():
    torch.manual_seed(0)
    net = MLP(MLPConfig(data_dim=2, hidden=32, num_blocks=1)).eval()
    schedule = DiscreteSchedule.from_name("linear")
    denoiser = discrete_time_denoiser(net, schedule, make_prediction("eps"))
    sigmas = schedule.respaced_sigmas(8)
    seeds = [7, 8, 9, 10]
    for fn, kw in ((sample_ddpm, {}), (sample_ddim, {"eta": 0.5})):
        batch_noise = PerSampleNoise(seeds)
        batch = fn(denoiser, batch_noise.initial((2,), float(sigmas[0])), sigmas, noise=batch_noise, **kw)
        alone_noise = PerSampleNoise([9])
        alone = fn(denoiser, alone_noise.initial((2,), float(sigmas[0])), sigmas, noise=alone_noise, **kw)
        torch.testing.assert_close(batch[2:3], alone, rtol=1e-5, atol=1e-6)


def test_callback_sees_every_step_with_x0_hat():
    schedule = DiscreteSchedule.from_name("linear")
    sigmas, noise, x = _start(schedule, 5, n=3)
    seen = []
    sample_ddpm(GaussianDenoiser(MU, STD), x, sigmas, noise=noise, callback=seen.append)
    assert [s.i for s in seen] == list(range(5))
    assert [s.sigma for s in seen] == pytest.approx(sigmas[:-1].tolist())
    last = seen[-1]
    assert last.sigma_next == 0 and torch.equal(last.x, last.denoised)  # the final step returns x0_hat


def test_registry_and_bad_inputs():
    assert get_sampler("ddim").fn is sample_ddim
    with pytest.raises(DifflabError, match="unknown sampler 'plms': choose one of ddpm, ddim"):
        get_sampler("plms")
    with pytest.raises(DifflabError, match="strictly decreasing"):
        sample_ddim(GaussianDenoiser(MU, STD), torch.zeros(1, 2), torch.tensor([1.0, 2.0]))
    with pytest.raises(DifflabError, match="variance"):
        sample_ddpm(GaussianDenoiser(MU, STD), torch.zeros(1, 2), torch.tensor([1.0, 0.0]), variance="huge")


@pytest.mark.parametrize("name", [n for n, spec in SAMPLERS.items() if spec.cost is not None])
def test_registry_cost_matches_the_evaluations_each_sampler_makes(name):
    spec = SAMPLERS[name]
    options = {"pc": {"corrector_steps": 2}, "ald": {"n_steps_each": 3}}.get(name, {})
    params = inspect.signature(spec.fn).parameters
    assert all(params[o].kind is inspect.Parameter.KEYWORD_ONLY for o in spec.options)
    for steps in (1, 4, 7):
        oracle = GaussianDenoiser(MU, STD)
        grid = karras_sigmas(steps, 0.01, 80.0)
        spec.fn(
            oracle, 80.0 * torch.randn(3, 2), grid, noise=GeneratorNoise(torch.Generator().manual_seed(0)), **options
        )
        assert oracle.calls == spec.nfe(steps, options), (name, steps)
    assert (
        spec.nfe(spec.steps_for_nfe(20, options), options)
        <= 20
        < spec.nfe(spec.steps_for_nfe(20, options) + 1, options)
    )
