"""Improved DDPM (Nichol & Dhariwal 2021): the learned variance (Eq. 15), the bound's terms, the hybrid loss (Eq. 16),
importance sampling of t (Sec. 3.3), learned-variance sampling on respaced grids, and their settings and CLI flags."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import assert_exact_resume, assert_one_line_error, run_cli
from torch import nn
from torch.distributions import Normal, kl_divergence

import difflab
from difflab.adapters import LearnedVarianceDenoiser, discrete_time_denoiser
from difflab.errors import DifflabError
from difflab.eval.likelihood import ddpm_vlb_bits_per_dim
from difflab.formulations import DDPMConfig, make_formulation
from difflab.generate import CountedDenoiser
from difflab.guidance.wrappers import ClassifierFreeGuidance, Inpainting
from difflab.iddpm import (
    ImportanceTimesteps,
    decoder_nll,
    gaussian_kl,
    learned_log_variance,
    schedule_step,
    step_log_variances,
    vlb_terms,
)
from difflab.losses import HybridLoss
from difflab.nets import build_network
from difflab.oracles import GaussianDenoiser
from difflab.precond import make_prediction
from difflab.sampling import sample_ddim, sample_ddpm
from difflab.schedules import DiscreteSchedule
from difflab.training.checkpoint import latest_checkpoint, list_checkpoints, load_tensors

F64 = torch.float64
LINEAR = DiscreteSchedule.from_name("linear", 1000)


def _vp_tables(schedule: DiscreteSchedule, t: int, t_prev: int | None):
    """beta, beta-tilde and abar's of the VP step t -> t_prev of visited timesteps (t_prev None: to the data), from
    the float64 tables: beta = 1 - abar_t / abar_prev (improved-diffusion's respaced betas)."""
    abar = schedule.alpha_bars[t]
    abar_prev = schedule.alpha_bars[t_prev] if t_prev is not None else torch.tensor(1.0, dtype=F64)
    beta = 1 - abar / abar_prev
    return beta, beta * (1 - abar_prev) / (1 - abar), abar, abar_prev


# ---- the learned variance and the bound's terms, against closed forms ---------------------------------------------
@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_interpolation_ends_are_beta_tilde_and_beta_on_full_and_respaced_grids(name):
    """v = 0 gives beta-tilde, v = 1 beta (Eq. 15), as variances of x_{t-1} in VP coordinates: the sigma-space value
    divided by 1 + sigma'^2 (x' = x_{t-1} / sqrt(abar')); on a respaced grid the betas of the visited timesteps."""
    schedule = DiscreteSchedule.from_name(name, 1000)
    for ts in ([999, 998], [700, 699], [2, 1], [999, 899], [500, 250], [300, 0]):
        t, t_prev = ts
        beta, beta_tilde, _, _ = _vp_tables(schedule, t, t_prev)
        sigma, sigma_next = schedule.sigmas[t], schedule.sigmas[t_prev]
        bounds = step_log_variances(sigma, sigma_next)
        for v, expected in ((0.0, beta_tilde), (1.0, beta)):
            log_var = learned_log_variance(torch.full((1, 3), v, dtype=F64), *(b.reshape(1) for b in bounds))
            vp = log_var.exp() / (1 + sigma_next**2)
            torch.testing.assert_close(vp, expected.expand(1, 3), rtol=1e-9, atol=0)
        half = learned_log_variance(torch.full((1, 1), 0.5, dtype=F64), *(b.reshape(1) for b in bounds))
        torch.testing.assert_close(half.exp() / (1 + sigma_next**2), (beta * beta_tilde).sqrt().reshape(1, 1))
    # the schedule's own steps: index k -> k - 1 has the table's beta_k; k = 0 the decoder (beta_0, beta-tilde_1)
    k = torch.tensor([0, 1, 500, 999])
    sigma, sigma_next, log_beta, log_beta_tilde = schedule_step(schedule, k)
    assert sigma_next[0] == 0
    torch.testing.assert_close((log_beta.exp() / (1 + sigma_next**2)), schedule.betas[k], rtol=1e-9, atol=0)
    floor = _vp_tables(schedule, 1, 0)[1]
    torch.testing.assert_close(log_beta_tilde[0].exp(), floor, rtol=1e-12, atol=0)


def test_gaussian_kl_and_decoders_match_torch_distributions():
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(2, 50, generator=g, dtype=F64)
    lv1, lv2 = torch.randn(2, 50, generator=g, dtype=F64) * 3
    expected = kl_divergence(Normal(m1, (0.5 * lv1).exp()), Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(gaussian_kl(m1 - m2, lv1, lv2), expected, rtol=1e-10, atol=1e-12)
    # continuous decoder: the Gaussian density; discretised: the mass of the bin, edge bins open
    x0 = torch.tensor([0, 1, 150, 254, 255], dtype=F64) / 255 * 2 - 1  # on the 256-level grid, edges included
    mean, log_var = x0 + 0.03 * torch.randn(5, generator=g, dtype=F64), torch.full((5,), math.log(0.02**2), dtype=F64)
    normal = Normal(mean, (0.5 * log_var).exp())
    torch.testing.assert_close(decoder_nll(x0, mean, log_var, 0), -normal.log_prob(x0), rtol=1e-12, atol=0)
    half = 1 / 255
    upper = torch.where(x0 > 1 - half, torch.ones_like(x0), normal.cdf(x0 + half))
    lower = torch.where(x0 < -1 + half, torch.zeros_like(x0), normal.cdf(x0 - half))
    torch.testing.assert_close(decoder_nll(x0, mean, log_var, 256), -(upper - lower).log(), rtol=1e-9, atol=1e-12)


def test_kl_term_with_a_learned_variance_equals_the_vp_closed_form():
    """L_{t-1} from `vlb_terms` (sigma space, mean gap only) against KL(q || p) written independently in VP
    coordinates with the table's c1, c2 (Ho et al. 2020, Eq. 7) and Sigma = exp(v log beta + (1 - v) log beta-tilde)."""
    g = torch.Generator().manual_seed(1)
    B = 6
    k = torch.tensor([1, 5, 100, 400, 800, 999])
    x0, x0_hat, noise = torch.randn(3, B, 4, generator=g, dtype=F64)
    v = torch.rand(B, 4, generator=g, dtype=F64) * 1.4 - 0.2  # v outside [0, 1] too: it is not clamped
    sigma, sigma_next, log_beta, log_beta_tilde = schedule_step(LINEAR, k)
    log_var = learned_log_variance(v, log_beta, log_beta_tilde)
    ours = vlb_terms(x0, x0_hat, log_var, sigma, sigma_next, log_beta_tilde, 256)
    betas, abars = LINEAR.betas[k, None], LINEAR.alpha_bars[k, None]
    abars_prev = LINEAR.alpha_bars[k - 1, None]
    x_t = abars.sqrt() * x0 + (1 - abars).sqrt() * noise
    c1, c2 = abars_prev.sqrt() * betas / (1 - abars), (1 - betas).sqrt() * (1 - abars_prev) / (1 - abars)
    beta_tilde = betas * (1 - abars_prev) / (1 - abars)
    model_var = (v * betas.log() + (1 - v) * beta_tilde.log()).exp()
    q = Normal(c1 * x0 + c2 * x_t, beta_tilde.sqrt().expand(B, 4))
    p = Normal(c1 * x0_hat + c2 * x_t, model_var.sqrt())
    torch.testing.assert_close(ours, kl_divergence(q, p).sum(1), rtol=1e-7, atol=1e-10)


class _GaussianReverse:
    """The exact reverse process of Gaussian data N(mu, std^2) on `schedule` as a learned-variance denoiser: x0_hat =
    E[x0 | x] and v chosen so that Sigma is the true Var(x' | x) = beta-tilde + (1 - sigma'^2/sigma^2)^2 P, P =
    Var(x0 | x) = std^2 sigma^2 / (std^2 + sigma^2) (P itself at the decoder), between the code's own bounds (which
    test_interpolation_ends_... checks against the tables)."""

    learns_variance = True

    def __init__(self, mu, std, schedule):
        self.mean, self.std, self.schedule = GaussianDenoiser(mu, std), std.double(), schedule

    def __call__(self, x, sigma, cond=None):
        return self.mean(x, sigma)

    def denoise_with_variance(self, x, sigma, cond=None):
        k = (self.schedule.sigmas.log()[None] - sigma.double().log()[:, None]).abs().argmin(1)
        s, s_next, log_beta, log_beta_tilde = (a[:, None] for a in schedule_step(self.schedule, k))
        posterior = self.std**2 * s**2 / (self.std**2 + s**2)
        true_var = torch.where(s_next > 0, log_beta_tilde.exp() + (1 - s_next**2 / s**2) ** 2 * posterior, posterior)
        v = (true_var.log() - log_beta_tilde) / (log_beta - log_beta_tilde)
        return self.mean(x, sigma), v.to(x.dtype).expand_as(x)


def test_bound_with_the_exact_reverse_variance_is_the_data_nll():
    """With the exact reverse conditionals (mean and variance) the bound telescopes to -log q(x0) (+ the prior's
    mismatch, ~1e-9 here): on Gaussian data the learned-variance bound, with the continuous decoder, equals the data's
    own NLL per sample on average; the fixed (beta-tilde) variance of the same means is 0.1 bits/dim worse."""
    mu, std = torch.tensor([0.3, -0.2], dtype=F64), torch.tensor([0.5, 0.8], dtype=F64)
    g = torch.Generator().manual_seed(3)
    x0 = mu + std * torch.randn(300, 2, generator=g, dtype=F64)
    nll = -Normal(mu, std).log_prob(x0).sum(1) / (2 * math.log(2))
    schedule = DiscreteSchedule.from_name("cosine", 200)
    exact = _GaussianReverse(mu, std, schedule)
    learned = ddpm_vlb_bits_per_dim(exact, schedule, x0, n_bins=None, generator=torch.Generator().manual_seed(4))
    gap = learned["bits_per_dim"] - nll
    assert abs(float(gap.mean())) < 4 * float(gap.std()) / math.sqrt(len(gap)) + 1e-3, float(gap.mean())
    fixed = ddpm_vlb_bits_per_dim(exact.mean, schedule, x0, n_bins=None, generator=torch.Generator().manual_seed(4))
    assert float((fixed["bits_per_dim"] - nll).mean()) > 0.1


# ---- importance sampling of t --------------------------------------------------------------------------------------
def _filled(T: int = 12, seed: int = 0) -> ImportanceTimesteps:
    sampler = ImportanceTimesteps(T)
    g = torch.Generator().manual_seed(seed)
    for _ in range(11):  # one round more than the history holds: the oldest value of each t is dropped
        t = torch.arange(T)
        sampler.record(t, (t + 1.0) ** 1.5 * (1 + 0.3 * torch.rand(T, generator=g)))
        sampler.commit()
    return sampler


def test_importance_weights_keep_the_estimate_unbiased():
    """E_p[L_t / (T p_t)] = (1/T) sum_t L_t: exactly for any values, and statistically for the sampler's own draws,
    which without the weight are biased by 3x the tolerance."""
    sampler = _filled()
    p = sampler.probabilities()
    rms = sampler.losses.pow(2).mean(1).sqrt()
    torch.testing.assert_close(p, 0.999 * rms / rms.sum() + 0.001 / 12, rtol=1e-12, atol=0)
    values = torch.rand(12, generator=torch.Generator().manual_seed(1), dtype=F64) * torch.arange(1, 13)
    torch.testing.assert_close((p * values / (12 * p)).sum(), values.mean(), rtol=1e-12, atol=0)
    t, w = sampler.sample(200_000, torch.Generator().manual_seed(2), torch.device("cpu"))
    estimate = values[t] * w
    tolerance = 4 * float(estimate.std()) / math.sqrt(len(t))
    assert abs(float(estimate.mean() - values.mean())) < tolerance
    assert abs(float(values[t].mean() - values.mean())) > 3 * tolerance  # the unweighted mean is biased
    counts = torch.bincount(t, minlength=12) / len(t)
    torch.testing.assert_close(counts, p.float(), atol=0.005, rtol=0)


def test_importance_sampler_is_uniform_until_every_t_has_its_history():
    sampler = ImportanceTimesteps(5)
    for _ in range(9):
        sampler.record(torch.arange(5), torch.arange(5.0) + 1)
        sampler.commit()
    sampler.record(torch.arange(4), torch.ones(4))  # t = 4 still has 9 values
    sampler.commit()
    assert not sampler.ready() and torch.equal(sampler.probabilities(), torch.full((5,), 0.2, dtype=F64))
    t, w = sampler.sample(7, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert torch.equal(w, torch.ones(7, dtype=F64))
    sampler.record(torch.tensor([4]), torch.tensor([100.0]))
    sampler.record(torch.tensor([4]), torch.tensor([5.0]))  # a kept step replaces what a skipped one recorded
    sampler.commit()
    assert sampler.ready() and sampler.losses[4].max() == 5.0 and sampler.probabilities()[4] > 0.2


# ---- the hybrid loss ------------------------------------------------------------------------------------------------
class _TwoConstants(nn.Module):
    """F = (a, b) everywhere: a the prediction, b the variance output, for gradient bookkeeping."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Parameter(torch.tensor(0.3)), nn.Parameter(torch.tensor(-0.4))

    def forward(self, x, c_noise, cond=None):
        return torch.cat([self.a.expand_as(x), self.b.expand_as(x)], dim=1)


@pytest.mark.parametrize("importance", [False, True])
def test_hybrid_loss_bound_trains_only_the_variance(importance):
    """Sec. 3.1: L_vlb's gradient reaches the variance output only (the mean is detached in it), although the bound's
    value depends on the mean; L_simple's reaches the mean only. Per sample: L_simple + lambda T w L_t."""
    schedule = DiscreteSchedule.from_name("linear", 50)
    net = _TwoConstants()
    denoiser = discrete_time_denoiser(net, schedule, make_prediction("eps"), learn_sigma=True)
    sampler = ImportanceTimesteps(50) if importance else None
    loss = HybridLoss(schedule, None, 256, sampler)
    x0 = torch.round(torch.rand(16, 3, generator=torch.Generator().manual_seed(0)) * 255) / 255 * 2 - 1

    def terms(a: float | None = None):
        if a is not None:
            net.a.data.fill_(a)
        return loss.terms(denoiser, x0, torch.Generator().manual_seed(1))

    parts = terms()
    grad_vlb = torch.autograd.grad(parts["vlb"].sum(), [net.a, net.b], allow_unused=True, materialize_grads=True)
    grad_simple = torch.autograd.grad(parts["simple"].sum(), [net.a, net.b], allow_unused=True, materialize_grads=True)
    assert grad_vlb[0] == 0 and grad_vlb[1] != 0 and grad_simple[0] != 0 and grad_simple[1] == 0
    assert not torch.allclose(terms(0.9)["vlb"], terms(0.3)["vlb"])  # the mean enters the bound's value
    total = loss(denoiser, x0, torch.Generator().manual_seed(1))
    torch.testing.assert_close(total, parts["simple"] + 0.001 * 50 * (parts["weight"] * parts["vlb"]).float())
    assert importance == (sampler is not None and sampler._pending is not None)  # committed by end_step


def test_ddpm_formulation_settings_and_refusals():
    plain, learned = (make_formulation(DDPMConfig(**kw)) for kw in ({}, {"learn_sigma": True, "hybrid_loss": True}))
    assert plain.extra_outputs_for((3, 8, 8)) == 0 and learned.extra_outputs_for((3, 8, 8)) == 3
    assert isinstance(learned.denoiser(nn.Identity()), LearnedVarianceDenoiser)
    loss = make_formulation(DDPMConfig(learn_sigma=True, hybrid_loss=True, importance_t=True, timesteps=30)).loss()
    assert isinstance(loss, HybridLoss) and loss.state_tensors()["vlb_history"].shape == (30, 10)
    for kw, message in (({"hybrid_loss": True}, "add --learn-sigma"), ({"learn_sigma": True}, "add --hybrid-loss"),
                        ({"learn_sigma": True, "importance_t": True}, "add --hybrid-loss"),
                        ({"learn_sigma": True, "hybrid_loss": True, "decoder_levels": 1}, "levels")):  # fmt: skip
        with pytest.raises(DifflabError, match=message):
            DDPMConfig(**kw)


@pytest.mark.parametrize("model", ["tiny", "dit-tiny"])
def test_image_backbones_output_one_variance_per_pixel(model):
    """--learn-sigma doubles the U-Net's and DiT's output channels (the MLP's outputs: test_cli_flags_...); their
    zero-initialised heads start at v = 1/2, the geometric mean of beta and beta-tilde; the hybrid loss trains them."""
    data = difflab.load_dataset("digits")
    config = difflab.run_config(data, model=model, learn_sigma=True, hybrid_loss=True, steps=1)
    assert config.formulation.decoder_levels == 256 and config.model.settings.out_channels == 2
    formulation = make_formulation(config.formulation)
    denoiser = formulation.denoiser(build_network(config.model))
    x, sigma = torch.randn(3, 1, 8, 8), torch.full((3,), 2.0)
    mean, v = denoiser.denoise_with_variance(x, sigma)
    assert mean.shape == v.shape == x.shape and torch.equal(denoiser(x, sigma), mean)
    torch.testing.assert_close(v, torch.full_like(v, 0.5), rtol=0, atol=0)
    loss = formulation.loss()(denoiser, data.data[:4], torch.Generator().manual_seed(0))
    loss.mean().backward()
    assert loss.shape == (4,) and bool(torch.isfinite(loss).all())


# ---- sampling ------------------------------------------------------------------------------------------------------
class _Fixed:
    """A learned-variance denoiser returning fixed (x0_hat, v) whatever its input; counts its calls."""

    learns_variance = True

    def __init__(self, x0_hat, v):
        self.x0_hat, self.v, self.calls = x0_hat, v, 0

    def __call__(self, x, sigma, cond=None):
        return self.denoise_with_variance(x, sigma, cond)[0]

    def denoise_with_variance(self, x, sigma, cond=None):
        self.calls += 1
        return self.x0_hat, self.v


def test_ddpm_step_with_a_learned_variance_on_a_respaced_grid_matches_the_hand_computed_step():
    """One step between visited timesteps t_i -> t_{i-1} of a 10-step respaced grid (T = 1000), in VP coordinates:
    beta = 1 - abar_t / abar_prev, beta-tilde = beta (1 - abar_prev)/(1 - abar_t), mean c1 x0_hat + c2 x_t,
    x_{t-1} = mean + exp((v log beta + (1 - v) log beta-tilde) / 2) z (improved-diffusion's respace.py)."""
    g = torch.Generator().manual_seed(0)
    x, x0_hat, z = torch.randn(3, 8, 3, generator=g, dtype=F64)
    v = torch.rand(8, 3, generator=g, dtype=F64)
    ts = torch.linspace(999, 0, 10, dtype=F64).round().long()
    sigmas = torch.cat([LINEAR.sigmas[ts], torch.zeros(1, dtype=F64)])  # respaced_sigmas(10), before its float32 cast
    torch.testing.assert_close(sigmas.float(), LINEAR.respaced_sigmas(10))
    for i in (0, 4, 8):
        t, t_prev = int(ts[i]), int(ts[i + 1])
        beta, beta_tilde, abar, abar_prev = _vp_tables(LINEAR, t, t_prev)
        x_t = abar.sqrt() * x
        c1, c2 = abar_prev.sqrt() * beta / (1 - abar), (1 - beta).sqrt() * (1 - abar_prev) / (1 - abar)
        std = ((v * beta.log() + (1 - v) * beta_tilde.log()) / 2).exp()
        expected = c1 * x0_hat + c2 * x_t + std * z
        out = sample_ddpm(_Fixed(x0_hat, v), x, sigmas[i : i + 2], noise=lambda like: z)
        torch.testing.assert_close(abar_prev.sqrt() * out, expected, rtol=1e-9, atol=1e-12)
    # v = 0 and v = 1 are the fixed small and large variances; the last step adds no noise
    for v_end, variance in ((0.0, "small"), (1.0, "large")):
        fixed = _Fixed(x0_hat, torch.full_like(v, v_end))
        ours = sample_ddpm(fixed, x, sigmas[3:6], noise=lambda like: z)
        theirs = sample_ddpm(fixed.__call__, x, sigmas[3:6], variance=variance, noise=lambda like: z)
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)
    last = sample_ddpm(_Fixed(x0_hat, v), x, sigmas[-2:], noise=lambda like: z)
    torch.testing.assert_close(last, x0_hat)


def test_variance_choice_and_guidance_wrappers():
    """ddpm uses a model's learned variance by default (or when asked) and refuses it for a model without one; ddim
    uses the mean alone; classifier-free guidance guides the mean and passes the conditional branch's v (GLIDE);
    inpainting sets v = 0 (beta-tilde, the exact posterior) in the known region."""
    g = torch.Generator().manual_seed(0)
    x, x0_hat, z = torch.randn(3, 4, 2, generator=g)
    v = torch.rand(4, 2, generator=g)
    sigmas = LINEAR.respaced_sigmas(5)[1:3]
    model = _Fixed(x0_hat, v)
    default, learned, small = (sample_ddpm(model, x, sigmas, noise=lambda like: z, **kw)
                               for kw in ({}, {"variance": "learned"}, {"variance": "small"}))  # fmt: skip
    assert torch.equal(default, learned) and not torch.allclose(default, small)
    with pytest.raises(DifflabError, match="--variance learned needs a model trained with --learn-sigma"):
        sample_ddpm(GaussianDenoiser(torch.zeros(2), torch.ones(2)), x, sigmas, variance="learned")
    torch.testing.assert_close(sample_ddim(model, x, sigmas, eta=1.0, noise=lambda like: z), small)
    counted = CountedDenoiser(model)  # generate's NFE counter: passes the variance on and counts the call
    assert torch.equal(sample_ddpm(counted, x, sigmas, noise=lambda like: z), default) and counted.calls == 1

    class Hiding:  # a wrapper that does not pass the variance on: refused unless a fixed variance is asked for
        def __init__(self, denoiser):
            self.denoiser = denoiser

        def __call__(self, x, sigma, cond=None):
            return self.denoiser(x, sigma, cond)

    with pytest.raises(DifflabError, match="Hiding does not pass on the model's learned variance"):
        sample_ddpm(Hiding(model), x, sigmas)
    assert torch.equal(sample_ddpm(Hiding(model), x, sigmas, variance="small", noise=lambda like: z), small)

    class Labelled:
        learns_variance = True

        def denoise_with_variance(self, x, sigma, cond):
            label = cond["class_label"].to(x.dtype)[:, None]
            return x * 0 + label, x * 0 + 0.1 + label  # the null label -1 gives mean -1, v -0.9

    cond = {"class_label": torch.tensor([0, 1, 2, 3])}
    mean, var = ClassifierFreeGuidance(Labelled(), 3.0).denoise_with_variance(x, torch.ones(4), cond)
    labels = cond["class_label"][:, None].float()
    torch.testing.assert_close(mean, (-1 + 3 * (labels + 1)).expand(4, 2))
    torch.testing.assert_close(var, (0.1 + labels).expand(4, 2))
    mask = torch.tensor([[1.0, 0.0]])
    inpaint = Inpainting(model, torch.full((1, 2), 0.5), mask)
    assert inpaint.learns_variance
    mean, var = inpaint.denoise_with_variance(x, torch.ones(4))
    assert torch.equal(mean[:, 0], torch.full((4,), 0.5)) and torch.equal(var[:, 0], torch.zeros(4))
    assert torch.equal(var[:, 1], v[:, 1])


# ---- training: resume, the CLI, a trained toy --------------------------------------------------------------------
def test_importance_history_is_restored_on_resume(tmp_path):
    """6 steps straight equal 3 + resume + 3 bit for bit with --importance-t over T = 4 steps: the history is full
    after the first step, so the second half draws the bound's t from it; it is saved in every checkpoint."""
    data = difflab.load_dataset("moons")
    make = lambda steps: difflab.run_config(data, timesteps=4, learn_sigma=True, hybrid_loss=True,  # noqa: E731
                                            importance_t=True, steps=steps, batch_size=64, warmup=2,
                                            checkpoint_every=3)  # fmt: skip
    assert_exact_resume(make, data, tmp_path, "out.2.weight")
    half, end = (load_tensors(c / "task_state.safetensors") for c in list_checkpoints(tmp_path / "split"))
    straight = load_tensors(latest_checkpoint(tmp_path / "straight") / "task_state.safetensors")
    assert all(torch.equal(end[k], straight[k]) for k in end) and int(end["vlb_counts"].sum()) == 6 * 64
    assert bool((half["vlb_counts"] >= 10).all()) and not torch.equal(half["vlb_history"], end["vlb_history"])


def test_cli_flags_train_sample_and_refuse(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--data", "moons", "--learn-sigma", "--hybrid-loss", "--importance-t",
                           "--timesteps", 20, "--steps", 3, "--batch-size", 16, "--out", out,
                           "--no-progress")  # fmt: skip
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["formulation"]["decoder_levels"] == 0  # points: the continuous decoder
    assert {k: config["formulation"][k] for k in ("learn_sigma", "hybrid_loss", "importance_t")} == dict.fromkeys(
        ("learn_sigma", "hybrid_loss", "importance_t"), True)  # fmt: skip
    assert config["model"]["settings"]["out_dim"] == 4  # (x, y) and their variances
    assert (latest_checkpoint(out) / "task_state.safetensors").exists()
    for sampler in (("ddpm",), ("ddpm", "--variance", "learned"), ("ddim",)):
        code, _, err = run_cli(capsys, "sample", "--ckpt", out, "--sampler", *sampler, "--steps", 4, "--n", 5,
                               "--out", tmp_path / "s.npy")  # fmt: skip
        assert code == 0 and np.isfinite(np.load(tmp_path / "s.npy")).all(), err
    for flags, message in (
        (("--process", "ve", "--learn-sigma"), "process 've' does not take --learn-sigma"),
        (("--learn-sigma",), "add --hybrid-loss"),
        (("--hybrid-loss",), "add --learn-sigma"),
        (("--learn-sigma", "--importance-t"), "--importance-t samples the t of the hybrid loss"),
    ):
        code, _, err = run_cli(capsys, "train", "--data", "moons", *flags, "--steps", 1, "--out", tmp_path / "x",
                               "--no-progress")  # fmt: skip
        assert_one_line_error(code, err, message)
    plain = tmp_path / "plain"
    assert run_cli(capsys, "train", "--data", "moons", "--timesteps", 20, "--steps", 1, "--out", plain,
                   "--no-progress")[0] == 0  # fmt: skip
    code, _, err = run_cli(capsys, "sample", "--ckpt", plain, "--sampler", "ddpm", "--variance", "learned",
                           "--n", 2, "--steps", 4, "--out", tmp_path / "p.npy")  # fmt: skip
    assert_one_line_error(code, err, "--variance learned needs a model trained with --learn-sigma")


def test_a_trained_toy_learns_a_variance_that_tightens_its_bound(tmp_path):
    """A tiny MLP, T = 100, 300 steps of the hybrid loss on moons: its bound (continuous decoder) with the learned
    variance against the same means with the fixed beta-tilde variance (a fixed-variance model's bound: one trained
    alike scored the same to 0.001) and with v = 1/2 everywhere (an untrained variance output). Measured (seeds 0, 1):
    0.62, 0.62 bits/dim against 2.64, 2.65 and 1.03, 1.03."""
    data = difflab.load_dataset("moons")
    config = difflab.run_config(data, timesteps=100, learn_sigma=True, hybrid_loss=True, steps=300, batch_size=128,
                                checkpoint_every=1000)  # fmt: skip
    pipe = difflab.load(difflab.train(config, tmp_path / "run", data=data, progress=False))
    test = difflab.load_dataset("moons", split="test").data[:400]
    schedule = pipe.formulation.discrete_schedule

    class HalfV:
        learns_variance = True

        def denoise_with_variance(self, x, sigma, cond=None):
            mean, v = pipe.denoiser.denoise_with_variance(x, sigma, cond)
            return mean, torch.full_like(v, 0.5)

    def bound(denoiser) -> float:
        out = ddpm_vlb_bits_per_dim(denoiser, schedule, test, n_bins=None, generator=torch.Generator().manual_seed(0))
        return float(out["bits_per_dim"].mean())

    learned = bound(pipe.denoiser)
    assert learned < bound(lambda x, sigma, cond=None: pipe.denoiser(x, sigma, cond)) - 1.0
    assert learned < bound(HalfV()) - 0.2
