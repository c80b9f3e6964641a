import math

import pytest
import torch

from difflab.errors import DifflabError
from difflab.schedules import DiscreteSchedule
from difflab.sigmas import alpha_bar_from_sigma, sigma_to_t, t_to_sigma


def test_linear_schedule_matches_ho_et_al():
    s = DiscreteSchedule.from_name("linear", 1000)
    assert s.betas[0].item() == pytest.approx(1e-4) and s.betas[-1].item() == pytest.approx(0.02)
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    torch.testing.assert_close(s.sigmas, ((1 - abar) / abar).sqrt())
    torch.testing.assert_close(alpha_bar_from_sigma(s.sigmas), abar)


def test_cosine_schedule_follows_the_closed_form_and_is_clipped():
    T, s_off = 1000, 0.008
    s = DiscreteSchedule.from_name("cosine", T)
    f = lambda t: math.cos((t / T + s_off) / (1 + s_off) * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 10, 500, 900):
        assert s.alpha_bars[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert s.betas.max().item() == pytest.approx(0.999)


def test_sigmoid_schedule_is_monotone_between_its_ends():
    b = DiscreteSchedule.from_name("sigmoid", 1000).betas
    assert bool((b[1:] > b[:-1]).all()) and 1e-4 < b[0] < 2e-4 and 0.0199 < b[-1] < 0.02


def test_sigma_t_conversions_are_inverse_and_exact_on_the_table():
    s = DiscreteSchedule.from_name("cosine", 1000)
    k = torch.arange(0, 1000, 37)
    torch.testing.assert_close(sigma_to_t(s.sigmas[k].float(), s.sigmas), k.float(), atol=2e-3, rtol=0)
    t = torch.tensor([0.0, 0.5, 10.25, 998.9])
    torch.testing.assert_close(sigma_to_t(t_to_sigma(t, s.sigmas), s.sigmas), t, atol=1e-3, rtol=0)
    # halfway in t is the geometric mean in sigma
    mid = t_to_sigma(torch.tensor([10.5], dtype=torch.float64), s.sigmas)
    assert mid.item() == pytest.approx(math.sqrt(s.sigmas[10].item() * s.sigmas[11].item()))


def test_forward_process_statistics_match_the_closed_form():
    s = DiscreteSchedule.from_name("linear", 1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.tensor([0.7, -0.3])
    for t in (0, 250, 999):
        noise = torch.randn(200_000, 2, generator=g)
        xt = s.q_sample(x0.expand(200_000, 2), torch.full((200_000,), t), noise)
        abar = s.alpha_bars[t].item()
        torch.testing.assert_close(xt.mean(0), math.sqrt(abar) * x0, atol=4 * math.sqrt((1 - abar) / 2e5), rtol=0)
        torch.testing.assert_close(xt.var(0), torch.full((2,), 1 - abar), rtol=0.02, atol=1e-6)


def test_respaced_grid_is_decreasing_and_ends_at_zero():
    s = DiscreteSchedule.from_name("linear", 1000)
    grid = s.respaced_sigmas(10)
    assert len(grid) == 11 and grid[-1] == 0 and bool((grid[1:] < grid[:-1]).all())
    assert grid[0].item() == pytest.approx(s.sigma_max, rel=1e-6)
    assert grid[-2].item() == pytest.approx(s.sigma_min, rel=1e-6)


def test_bad_schedule_inputs_raise_clear_errors():
    with pytest.raises(DifflabError, match="choose one of linear, cosine, sigmoid"):
        DiscreteSchedule.from_name("quadratic")
    with pytest.raises(DifflabError, match="--steps must be between 1 and 1000"):
        DiscreteSchedule.from_name("linear").respaced_sigmas(0)


def test_trailing_ddpm_grid_is_diffusers_trailing_spacing_and_nests():
    from difflab.formulations import DDPMConfig, make_formulation

    ddpm = make_formulation(DDPMConfig())
    table = ddpm.discrete_schedule.sigmas.float()
    four = ddpm.sigmas(4, "trailing")
    assert torch.allclose(four[:-1], table[[999, 749, 499, 249]]) and four[-1] == 0  # diffusers: 999 749 499 249
    eight = ddpm.sigmas(8, "trailing")
    assert torch.allclose(eight[::2], four)  # N steps are every other point of 2N (progressive distillation)
    assert torch.allclose(ddpm.sigmas(1000, "trailing")[:-1], table.flip(0))


def test_trailing_karras_grid_nests_and_one_step_goes_from_sigma_max_to_zero():
    from difflab.formulations import EDMConfig, make_formulation

    edm = make_formulation(EDMConfig())
    assert edm.sigmas(1, "trailing").tolist() == [80.0, 0.0]
    for n in (1, 2, 4, 16):
        assert torch.allclose(edm.sigmas(2 * n, "trailing")[::2], edm.sigmas(n, "trailing"))
    grid = edm.sigmas(2, "trailing")
    assert grid[1] == pytest.approx((80 ** (1 / 7) + 0.5 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7, rel=1e-5)
