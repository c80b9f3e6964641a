"""Runs users can trust (issue 11), sampling: sample i of a batch equals its seed alone for every registered sampler
(or the registry says it does not), rk45 controls each sample's step on its own and stops at --max-nfe, batches are
drawn lazily, and sizes and seeds are checked before any work."""

import pytest
import torch
from conftest import GaussianDenoiser, assert_one_line_error, run_cli

from difflab.errors import DifflabError
from difflab.generate import SAMPLING_LIMITS, check_sampling_request, generate, generate_batches
from difflab.sampling import SAMPLERS
from difflab.sampling.ode import sample_rk45
from difflab.schedules import karras_sigmas

MU = torch.tensor([0.5, -1.0, 0.2])
STD = torch.tensor([0.3, 0.8, 1.5])
SIGMAS = karras_sigmas(8, 0.002, 80.0)
SEEDS = list(range(100, 106))
# options under which a sampler couples its batch (none does by default)
COUPLED = {"pc": {"norm_scope": "batch"}}


def _draw(name, options, batch_size):
    return generate(GaussianDenoiser(MU, STD), (3,), SIGMAS, SEEDS, sampler=name, options=options,
                    batch_size=batch_size)  # fmt: skip


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_sample_i_of_a_batch_equals_its_seed_alone_or_the_sampler_says_it_cannot(name):
    spec = SAMPLERS[name]
    assert spec.batch_independent(), name  # with its defaults, every sampler keeps sample i = seed S + i alone
    alone = _draw(name, {}, 1)
    torch.testing.assert_close(_draw(name, {}, len(SEEDS)), alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(_draw(name, {}, 4), alone, rtol=0, atol=1e-5)  # 4 + a partial batch of 2
    if name in COUPLED:  # the options it declares coupling for really do couple: the declaration is true
        assert not spec.batch_independent(COUPLED[name]) and spec.batch_note
        coupled = COUPLED[name]
        assert not torch.allclose(_draw(name, coupled, len(SEEDS)), _draw(name, coupled, 1), atol=1e-3)


def test_pc_declares_when_it_couples_the_batch():
    pc = SAMPLERS["pc"]
    assert pc.batch_independent() and pc.batch_independent({"norm_scope": "sample"})
    assert not pc.batch_independent({"norm_scope": "batch"})
    assert pc.batch_independent({"norm_scope": "batch", "corrector_steps": 0})  # the predictor alone: per-sample
    assert all(SAMPLERS[name].batch_independent(COUPLED.get(name)) for name in SAMPLERS if name != "pc")


def test_samplers_command_shows_the_batch_note_and_max_nfe(capsys):
    code, out, _ = run_cli(capsys, "samplers")
    assert code == 0
    pc = out[out.index("\npc ") :].splitlines()
    assert pc[2].split(None, 1) == ["batch:", SAMPLERS["pc"].batch_note]
    assert "--max-nfe" in out[out.index("\nrk45 ") :].split("\n\n")[0]


def test_rk45_steps_each_sample_on_its_own():
    """A sample far in the prior's tail needs other steps; with a step shared by the batch (RMS over all of it) the
    other samples would change with it. Per-sample control: each row is bit for bit the row solved alone."""
    den = GaussianDenoiser(MU.double(), STD.double())
    x = 80 * torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x[3] *= 50
    sigmas = SIGMAS.double()
    batch = sample_rk45(den, x, sigmas, rtol=1e-3, atol=1e-3)
    for i in range(len(x)):
        assert torch.equal(batch[i : i + 1], sample_rk45(den, x[i : i + 1], sigmas, rtol=1e-3, atol=1e-3)), i
    exact = den.pf_ode_solution(x, 80.0, 0.002)
    error = (sample_rk45(den, x, sigmas[:-1]) - exact).abs()
    assert (error < 1e-4 * (1 + exact.abs())).all()  # still accurate at the default tolerances (relative 1e-5)


def _nan_in_row_1(x, sigma, cond=None):
    out = GaussianDenoiser(MU, STD)(x, sigma)
    out[1] = float("nan")
    return out


def test_rk45_stops_at_max_nfe_in_one_line_when_a_sample_diverges():
    x = 80 * torch.randn(3, 3, generator=torch.Generator().manual_seed(1))
    info = {}
    with pytest.raises(DifflabError, match=r"rk45 stopped after \d+ network evaluations \(--max-nfe 300\)") as err:
        sample_rk45(_nan_in_row_1, x, SIGMAS, max_nfe=300, info=info)
    assert "\n" not in str(err.value) and "raise --max-nfe or loosen" in str(err.value)
    healthy = {}
    sample_rk45(GaussianDenoiser(MU, STD), x, SIGMAS, info=healthy)
    assert healthy["nfe"] < SAMPLERS["rk45"].with_defaults()["max_nfe"] / 10  # the default cap leaves ample room
    with pytest.raises(DifflabError, match="--max-nfe must be an integer >= 8"):
        sample_rk45(GaussianDenoiser(MU, STD), x, SIGMAS, max_nfe=3)


def test_generate_batches_draws_a_batch_only_when_asked():
    """Ten million seeds cost nothing until a batch is asked for: the seeds stay a range, one batch is drawn."""
    den = GaussianDenoiser(MU, STD)
    stats = {}
    batches = generate_batches(den, (3,), SIGMAS, range(10**7), sampler="euler", batch_size=4, stats=stats)
    assert den.calls == 0
    seeds, first = next(batches)
    assert list(seeds) == [0, 1, 2, 3] and first.shape == (4, 3)
    assert den.calls == len(SIGMAS) - 1 and stats == {"nfe": len(SIGMAS) - 1, "batch_nfe": len(SIGMAS) - 1}
    torch.testing.assert_close(first, generate(den, (3,), SIGMAS, range(4), sampler="euler"), rtol=0, atol=0)


@pytest.mark.parametrize(
    "n,steps,batch_size,seed,fragment",
    [
        (0, 10, 4, 0, "--n must be an integer in 1..10000000, got 0"),
        (SAMPLING_LIMITS["n"] + 1, 10, 4, 0, "--n must be an integer in 1..10000000"),
        (4, 0, 4, 0, "--steps must be an integer in 1..10000, got 0"),
        (4, 10**6, 4, 0, "--steps must be an integer in 1..10000"),
        (4, 10, 10**6, 0, "--batch-size must be an integer in 1..65536"),
        (4, 10, 4, -1, "seeds must lie in 0..2**63 - 1"),
        (2, 10, 4, 2**63 - 1, "gives seeds 9223372036854775807..9223372036854775808"),
    ],
)
def test_sizes_and_seeds_are_refused_in_one_line(n, steps, batch_size, seed, fragment):
    with pytest.raises(DifflabError) as err:
        check_sampling_request(n, steps, batch_size, seed)
    assert fragment in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "flags,fragment",
    [
        (["--n", "1000000000"], "--n must be an integer in 1..10000000"),
        (["--steps", "0"], "--steps must be"),
        (["--batch-size", "0"], "--batch-size must be"),
        (["--seed", "-3"], "seeds must lie in 0..2**63 - 1"),
        (["--seed", str(2**63 - 2), "--n", "5"], "pick a --seed in 0..9223372036854775803"),
    ],
)
def test_the_cli_refuses_sizes_and_seeds_before_loading_anything(tmp_path, capsys, flags, fragment):
    missing = tmp_path / "no-such-run"  # loading it would fail with another message
    code, _, err = run_cli(capsys, "sample", "--ckpt", missing, "--out", tmp_path / "x.png", *flags)
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "x.png").exists()
