import pytest
import torch

from difflab.adapters import discrete_time_denoiser
from difflab.errors import DifflabError
from difflab.losses import DenoisingLoss, DiscreteTimesteps
from difflab.precond import PreconditionedDenoiser, make_prediction, network_target
from difflab.schedules import DiscreteSchedule
from difflab.sigmas import vp_input_scale


def _vp_quantities(x0, noise, sigma):
    """Independent VP-side definitions: x_t, eps, v (Salimans & Ho 2022)."""
    abar = 1 / (1 + sigma[:, None] ** 2)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    v = abar.sqrt() * noise - (1 - abar).sqrt() * x0
    return x_t, v


@pytest.mark.parametrize("name", ["eps", "x0", "v"])
def test_targets_match_their_definitions_and_reconstruct_x0(name):
    g = torch.Generator().manual_seed(0)
    x0, noise = (
        torch.randn(16, 3, generator=g, dtype=torch.float64),
        torch.randn(16, 3, generator=g, dtype=torch.float64),
    )
    sigma = torch.logspace(-2, 2, 16, dtype=torch.float64)
    x = x0 + sigma[:, None] * noise
    pred = make_prediction(name)
    sc = pred.scalings(sigma)
    target = network_target(sc, x, x0)
    x_t, v = _vp_quantities(x0, noise, sigma)
    expected = {"eps": noise, "x0": x0, "v": v}[name]
    torch.testing.assert_close(target, expected)
    torch.testing.assert_close(sc.c_in[:, None] * x, x_t)  # the network sees the VP state

    class Oracle(torch.nn.Module):
        def forward(self, x_in, c_noise, cond=None):
            return target

    denoiser = PreconditionedDenoiser(Oracle(), pred, lambda s: s)
    torch.testing.assert_close(denoiser(x, sigma), x0)


def test_unknown_prediction_is_a_clear_error():
    with pytest.raises(DifflabError, match="choose one of eps, x0, v"):
        make_prediction("score")


def test_discrete_adapter_feeds_the_training_timestep_and_vp_input():
    schedule = DiscreteSchedule.from_name("linear", 1000)
    seen = {}

    class Spy(torch.nn.Module):
        def forward(self, x_in, c_noise, cond=None):
            seen["x_in"], seen["t"] = x_in, c_noise
            return torch.zeros_like(x_in)

    d = discrete_time_denoiser(Spy(), schedule, make_prediction("eps"))
    t = torch.tensor([0, 17, 999])
    sigma = schedule.sigma_at(t)
    x = torch.ones(3, 2)
    d(x, sigma)
    torch.testing.assert_close(seen["t"], t.float(), atol=1e-3, rtol=0)
    torch.testing.assert_close(seen["x_in"], vp_input_scale(sigma)[:, None] * x)


def test_loss_is_zero_for_the_oracle_and_min_snr_weights_follow_the_formula():
    schedule = DiscreteSchedule.from_name("linear", 100)
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))

    class Capture(torch.nn.Module):
        """Outputs a constant; records the scalings so the weights can be checked."""

        def forward(self, x_in, c_noise, cond=None):
            return torch.ones_like(x_in)

    d = discrete_time_denoiser(Capture(), schedule, make_prediction("eps"))
    plain = DenoisingLoss(DiscreteTimesteps(schedule))(d, x0, torch.Generator().manual_seed(3))
    weighted = DenoisingLoss(DiscreteTimesteps(schedule), min_snr_gamma=5.0)(d, x0, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, 100, (64,), generator=g)
    snr = 1 / schedule.sigma_at(t) ** 2
    torch.testing.assert_close(weighted, plain * snr.clamp(max=5.0) / snr)
    assert not torch.allclose(weighted, plain)


def test_loss_vanishes_when_the_network_outputs_its_target():
    schedule = DiscreteSchedule.from_name("cosine", 50)
    x0 = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
    for name in ("eps", "x0", "v"):
        pred = make_prediction(name)

        class Perfect(torch.nn.Module):
            def forward(self, x_in, c_noise, cond=None, pred=pred):
                sigma = schedule.sigmas[c_noise.round().long()].float()
                x = x_in / vp_input_scale(sigma)[:, None]
                return network_target(pred.scalings(sigma), x, x0)

        d = discrete_time_denoiser(Perfect(), schedule, pred)
        loss = DenoisingLoss(DiscreteTimesteps(schedule))(d, x0, torch.Generator().manual_seed(1))
        assert loss.max().item() < 1e-6, name
