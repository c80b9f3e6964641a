"""The sampler registry: options read from the samplers' signatures, their union for a CLI, aliases of other tools'
sampler and grid names, and the kernel check."""

import inspect
import math
import typing

import pytest
import torch

import difflab.sampling as sampling
from difflab.errors import DifflabError
from difflab.kernels import GaussianKernel, PoissonKernel
from difflab.oracles import GaussianDenoiser
from difflab.sampling import (
    GRID_NAMES,
    OPTION_HELP,
    SAMPLERS,
    GeneratorNoise,
    SamplerOption,
    SamplerSpec,
    all_sampler_options,
    get_sampler,
    resolve_grid,
    resolve_sampler,
    sampler_aliases,
    sampler_for_kernel,
)
from difflab.schedules import karras_sigmas, log_snr_sigmas

PASSED_BY_THE_CALLER = {"cond", "noise", "callback", "info"}  # info: rk45's evaluation count, an output


def _signature_options(fn):
    """(name, default, annotation type) of fn's user options, read independently of the registry."""
    hints = typing.get_type_hints(inspect.unwrap(fn))
    out = []
    for p in inspect.signature(fn).parameters.values():
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in PASSED_BY_THE_CALLER:
            kinds = [a for a in typing.get_args(hints[p.name]) if a is not type(None)] or [hints[p.name]]
            out.append((p.name, p.default, kinds[0]))
    return out


# ---- options from the signature ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_option_comes_from_the_signature_with_its_default_type_and_help(name):
    spec = SAMPLERS[name]
    expected = _signature_options(spec.fn)
    assert [(o.name, o.default, o.type) for o in spec.option_specs] == expected
    assert spec.options == tuple(n for n, _, _ in expected)  # the old tuple of names still works
    for option in spec.option_specs:
        assert isinstance(option, SamplerOption)
        assert option.type in (bool, int, float, str)
        assert option.default is None or isinstance(option.default, option.type), option
        assert option.help and option.help == OPTION_HELP[option.name], option.name
        assert "\n" not in option.help and len(option.help) <= 110, option.help
        if option.default is None:  # the help says what None means
            assert "default" in option.help, option.help


def test_the_options_users_know_and_the_internal_parameters_left_out():
    assert SAMPLERS["heun"].options == ("s_churn", "s_tmin", "s_tmax", "s_noise")
    assert SAMPLERS["rk45"].options == ("rtol", "atol", "max_nfe")  # not `info`
    assert SAMPLERS["pc"].options == ("snr", "corrector_steps", "norm_scope")
    assert SAMPLERS["ald"].options == ("step_size", "n_steps_each", "denoise_last")
    assert SAMPLERS["dpmpp_2m"].options == () and SAMPLERS["euler_maruyama"].options == ()
    assert SAMPLERS["dpmpp_3m"].options == () and SAMPLERS["unipc"].options == ("order",)
    assert all_sampler_options()["order"].help.endswith("[default depends on the sampler: unipc 2, lms 4]")
    step_size = SAMPLERS["ald"].option_specs[0]
    assert (step_size.type, step_size.default) == (float, None) and "0.2 sigma_min^2" in step_size.help
    assert SAMPLERS["heun"].option_specs[2].default == math.inf
    assert not set(OPTION_HELP) - {o.name for s in SAMPLERS.values() for o in s.option_specs}  # no stale help


def _toy(denoiser, x, sigmas, *, k: int = 3, scale: float | None = None, flag: bool = False, mode: str = "a",
         info: dict | None = None, cond=None, noise=None, callback=None):  # fmt: skip
    return x


def test_a_new_sampler_gets_its_options_from_its_signature_and_costs_use_its_defaults():
    spec = SamplerSpec("toy", _toy, "toy sampler", lambda steps, o: o["k"] * steps, lambda o: o["scale"] is None)
    assert [(o.name, o.type, o.default) for o in spec.option_specs] == [
        ("k", int, 3), ("scale", float, None), ("flag", bool, False), ("mode", str, "a")
    ]  # fmt: skip
    assert spec.nfe(2) == 6 and spec.nfe(2, {"k": 5}) == 10
    assert spec.deterministic({}) and not spec.deterministic({"scale": 0.5})
    assert spec.with_defaults({"mode": "b"}) == {"k": 3, "scale": None, "flag": False, "mode": "b"}


def test_options_without_a_default_or_of_another_type_are_refused_when_registered():
    def no_default(denoiser, x, sigmas, *, k: int, cond=None, noise=None, callback=None):
        return x

    def a_list(denoiser, x, sigmas, *, ks: list[int] = (), cond=None, noise=None, callback=None):  # noqa: B006
        return x

    with pytest.raises(TypeError, match="'k' needs a default"):
        SamplerSpec("bad", no_default, "")
    with pytest.raises(TypeError, match="'ks' must be annotated as one of bool, int, float, str"):
        SamplerSpec("bad", a_list, "")


@pytest.mark.parametrize(
    "name, options, steps, evals",
    [("ald", {}, 4, 4 * 5 + 1), ("ald", {"denoise_last": False, "n_steps_each": 2}, 4, 4 * 2),
     ("pc", {}, 3, 3 * 2), ("heun", {}, 3, 5)],
)  # fmt: skip
def test_costs_fill_in_the_signature_defaults_and_match_the_evaluations(name, options, steps, evals):
    spec, oracle = SAMPLERS[name], GaussianDenoiser(torch.zeros(2), torch.full((2,), 0.5))
    x = 80.0 * torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
    spec.fn(oracle, x, karras_sigmas(steps, 0.01, 80.0), noise=GeneratorNoise(torch.Generator().manual_seed(1)),
            **options)  # fmt: skip
    assert oracle.calls == evals == spec.nfe(steps, options)


def test_determinism_reads_the_signature_defaults():
    assert SAMPLERS["ddim"].deterministic() and not SAMPLERS["ddim"].deterministic({"eta": 0.5})
    assert not SAMPLERS["euler_ancestral"].deterministic() and SAMPLERS["euler_ancestral"].deterministic({"eta": 0})
    assert not SAMPLERS["dpmpp_2m_sde"].deterministic() and SAMPLERS["dpmpp_2m_sde"].deterministic({"eta": 0.0})
    assert SAMPLERS["heun"].deterministic() and not SAMPLERS["heun"].deterministic({"s_churn": 40})
    assert not SAMPLERS["ddpm"].deterministic() and SAMPLERS["rk45"].deterministic()


# ---- the union of all options, and describe() ------------------------------------------------------------------


def test_all_sampler_options_is_the_union_with_one_type_per_name():
    union = all_sampler_options()
    per_sampler = {}
    for spec in SAMPLERS.values():
        for o in spec.option_specs:
            per_sampler.setdefault(o.name, []).append((spec.name, o))
    assert list(union) == list(per_sampler)
    for name, uses in per_sampler.items():
        assert len({o.type for _, o in uses}) == 1, name  # one type for one name across samplers
        assert union[name].type == uses[0][1].type
        assert union[name].help.startswith(OPTION_HELP[name])
    s_noise = union["s_noise"]  # same default for heun and dpmpp_2m_sde
    assert s_noise.default == 1.0 and s_noise.help.endswith("[heun, dpmpp_2m_sde; default 1]")
    assert union["rtol"].default == 1e-5 and "default 1e-05" in union["rtol"].help
    assert union["step_size"].default is None and union["step_size"].help.endswith("[ald]")
    assert union["log_sigma"].help.endswith("[euler; default off]")


def test_an_option_whose_default_differs_between_samplers_has_no_union_default():
    eta = all_sampler_options()["eta"]
    assert eta.default is None and eta.type is float
    assert eta.help.endswith("[default depends on the sampler: ddim 0, euler_ancestral 1, dpmpp_2m_sde 1]")
    defaults = {
        s: dict((o.name, o.default) for o in SAMPLERS[s].option_specs)["eta"] for s in ("ddim", "euler_ancestral")
    }
    assert defaults == {"ddim": 0.0, "euler_ancestral": 1.0}  # each spec keeps its own


def test_two_types_for_one_option_name_are_refused(monkeypatch):
    def ints(denoiser, x, sigmas, *, eta: int = 0, cond=None, noise=None, callback=None):
        return x

    monkeypatch.setitem(SAMPLERS, "toy", SamplerSpec("toy", ints, "eta as an int"))
    with pytest.raises(TypeError, match="option 'eta' has different types"):
        all_sampler_options()


def test_describe_shows_the_summary_then_each_option_with_its_real_default():
    lines = SAMPLERS["ald"].describe().splitlines()
    assert lines[0].split(None, 1) == ["ald", SAMPLERS["ald"].summary]
    assert len(lines) == 4
    assert lines[1].split()[:2] == ["--step-size", "auto"] and "0.2 sigma_min^2" in lines[1]
    assert lines[2].split()[:2] == ["--n-steps-each", "5"] and lines[3].split()[:2] == ["--denoise-last", "on"]
    assert SAMPLERS["ddim"].describe().splitlines()[1].split()[:2] == ["--eta", "0"]
    assert SAMPLERS["euler_ancestral"].describe().splitlines()[1].split()[:2] == ["--eta", "1"]
    assert SAMPLERS["rk45"].describe().splitlines()[1].split()[:2] == ["--rtol", "1e-05"]
    assert SAMPLERS["dpmpp_2m"].describe() == f"{'dpmpp_2m':<16} {SAMPLERS['dpmpp_2m'].summary}"


# ---- aliases -----------------------------------------------------------------------------------------------


ALIASES = [
    # AUTOMATIC1111 labels
    ("Euler", "euler", None), ("Euler a", "euler_ancestral", None), ("Heun", "heun", None), ("LMS", "lms", None),
    ("LMS Karras", "lms", "karras"), ("DPM++ 2M", "dpmpp_2m", None), ("DPM++ 2M Karras", "dpmpp_2m", "karras"),
    ("DPM++ 2M SDE", "dpmpp_2m_sde", None), ("DPM++ 2M SDE Karras", "dpmpp_2m_sde", "karras"),
    ("DPM++ 2M SDE Exponential", "dpmpp_2m_sde", "log_snr"), ("DDIM", "ddim", None), ("UniPC", "unipc", None),
    ("k_euler_a", "euler_ancestral", None), ("k_dpmpp_2m_ka", "dpmpp_2m", "karras"),
    # diffusers
    ("DDPMScheduler", "ddpm", None), ("DDIMScheduler", "ddim", None), ("EulerDiscreteScheduler", "euler", None),
    ("EulerAncestralDiscreteScheduler", "euler_ancestral", None), ("HeunDiscreteScheduler", "heun", None),
    ("LMSDiscreteScheduler", "lms", None), ("DPMSolverMultistepScheduler", "dpmpp_2m", None),
    ("UniPCMultistepScheduler", "unipc", None),
    # k-diffusion
    ("sample_euler", "euler", None), ("sample_euler_ancestral", "euler_ancestral", None), ("sample_heun", "heun", None),
    ("sample_lms", "lms", None), ("sample_dpmpp_2m", "dpmpp_2m", None), ("sample_dpmpp_2m_sde", "dpmpp_2m_sde", None),
    # other spellings of the same names
    ("euler A", "euler_ancestral", None), ("dpm++ 2m karras", "dpmpp_2m", "karras"),
    ("  DPM++  2M   SDE  karras ", "dpmpp_2m_sde", "karras"), ("EULERDISCRETESCHEDULER", "euler", None),
    ("Sample_Euler", "euler", None), ("DDPM", "ddpm", None), ("Heun", "heun", None), ("ddim", "ddim", None),
]  # fmt: skip


@pytest.mark.parametrize("alias, canonical, grid", ALIASES)
def test_aliases_resolve_case_insensitively_to_the_sampler_and_the_grid_they_imply(alias, canonical, grid):
    spec, implied = resolve_sampler(alias)
    assert (spec, implied) == (SAMPLERS[canonical], grid)
    assert get_sampler(alias) is SAMPLERS[canonical]  # get_sampler takes aliases too, without the grid


def test_every_registered_name_resolves_to_itself_without_a_grid():
    for name, spec in SAMPLERS.items():
        assert resolve_sampler(name) == (spec, None)
        assert resolve_sampler(name.upper()) == (spec, None)


def test_the_alias_table_points_at_registered_samplers_and_grids():
    aliases = sampler_aliases()
    listed = {"Euler", "Euler a", "Heun", "LMS", "LMS Karras", "DPM++ 2M", "DPM++ 2M Karras", "DPM++ 2M SDE",
              "DPM++ 2M SDE Karras", "DDIM", "DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler",
              "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler",
              "DPMSolverMultistepScheduler", "sample_euler", "sample_dpmpp_2m"}  # fmt: skip
    assert listed <= set(aliases)  # `difflab samplers` lists them as users spell them
    for alias, canonical, grid in ALIASES:
        if alias in aliases:
            assert aliases[alias] == (canonical, grid), alias
    for alias, (canonical, grid) in aliases.items():
        assert canonical in SAMPLERS and (grid is None or grid in GRID_NAMES), alias
        key = " ".join(alias.split()).casefold()
        if key in SAMPLERS:  # an alias that is also a registered name means that sampler, with no grid
            assert (canonical, grid) == (key, None), alias
    keys = [" ".join(a.split()).casefold() for a in aliases]
    assert len(keys) == len(set(keys))  # no two aliases collide once case is ignored
    aliases["Euler"] = ("heun", None)  # a copy: the registry does not change
    assert resolve_sampler("Euler")[0] is SAMPLERS["euler"]


@pytest.mark.parametrize("name", ["plms", "Euler Karras", "DPM++ SDE", "DPM++ 3M SDE", "k_dpmpp_3m_sde", ""])
def test_unknown_names_are_one_line_errors_listing_the_registered_names(name):
    with pytest.raises(DifflabError) as info:
        get_sampler(name)
    message = str(info.value)
    assert message.startswith(f"unknown sampler '{name}': choose one of {', '.join(SAMPLERS)}")
    assert "`difflab samplers`" in message and "\n" not in message
    with pytest.raises(DifflabError, match="unknown sampler"):
        resolve_sampler(name)


# ---- grids -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, grid",
    [("respaced", "respaced"), ("karras", "karras"), ("uniform_t", "uniform_t"), ("log_snr", "log_snr"),
     ("Karras", "karras"), ("KARRAS", "karras"), ("exponential", "log_snr"), ("Exponential", "log_snr"),
     ("uniform", "uniform_t"), ("Uniform", "uniform_t"), ("Log_SNR", "log_snr")],
)  # fmt: skip
def test_grid_names_and_aliases(name, grid):
    assert resolve_grid(name) == grid


def test_grid_names_are_the_canonical_six_and_importable_from_the_package():
    assert GRID_NAMES == ("respaced", "karras", "uniform_t", "log_snr", "trailing", "tuned")
    assert sampling.GRID_ALIASES == {"exponential": "log_snr", "uniform": "uniform_t"}


def test_exponential_is_k_diffusions_grid_uniform_in_log_sigma():
    assert resolve_grid("exponential") == "log_snr"
    n, sigma_min, sigma_max = 12, 0.02, 80.0
    k_diffusion = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()
    ours = log_snr_sigmas(n, sigma_min, sigma_max)
    torch.testing.assert_close(ours[:-1], k_diffusion.float())
    assert float(ours[-1]) == 0


@pytest.mark.parametrize("name", ["linear", "karras-7", "simple", ""])
def test_unknown_grids_are_difflab_errors_listing_the_choices(name):
    with pytest.raises(DifflabError) as info:
        resolve_grid(name)
    assert str(info.value) == (
        f"unknown grid '{name}': choose one of respaced, karras, uniform_t, log_snr, trailing, tuned, or an alias: "
        "exponential (= log_snr), uniform (= uniform_t)"
    )


def test_a_sampler_with_a_grid_of_its_own_gets_it_when_none_is_named():
    from difflab.formulations import make_config, make_formulation

    assert {n for n, s in SAMPLERS.items() if s.grid} == {"dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m", "unipc"}
    for process in ("ddpm", "edm"):
        f = make_formulation(make_config(process))
        own = f.sigmas(10, sampler="dpmpp_2m")
        torch.testing.assert_close(own, f.sigmas(10, "log_snr"), rtol=0, atol=0)
        torch.testing.assert_close(f.sigmas(10, sampler="DPM++ 2M"), own, rtol=0, atol=0)  # aliases too
        for sampler in ("ddim", "heun", None):  # the formulation's default grid
            torch.testing.assert_close(f.sigmas(10, sampler=sampler), f.sigmas(10, f.default_grid), rtol=0, atol=0)
        torch.testing.assert_close(f.sigmas(10, "karras", sampler="unipc"), f.sigmas(10, "karras"), rtol=0, atol=0)
    assert f.default_grid_for("unipc") == "log_snr" and f.default_grid_for("euler") == f.default_grid == "karras"


# ---- the NFE budget ----------------------------------------------------------------------------------------------


def test_steps_for_nfe_never_exceeds_the_budget_and_refuses_one_it_cannot_meet():
    ald = SAMPLERS["ald"]  # n_steps_each 5 per level + 1 final denoising: 6 for one step
    with pytest.raises(DifflabError) as info:
        ald.steps_for_nfe(5)
    assert str(info.value) == "sampler 'ald' needs 6 network evaluations for one step, more than the budget of 5"
    assert ald.steps_for_nfe(6) == 1 and ald.steps_for_nfe(10) == 1 and ald.steps_for_nfe(11) == 2
    assert ald.steps_for_nfe(5, {"n_steps_each": 2}) == 2  # 2 + 2 + 1
    with pytest.raises(DifflabError, match="'heun' needs 1 network evaluation for one step, more than the budget of 0"):
        SAMPLERS["heun"].steps_for_nfe(0)
    for spec in SAMPLERS.values():
        if spec.cost is not None:
            for budget in (1, 2, 3, 7, 20):
                if spec.nfe(1) <= budget:
                    assert spec.nfe(spec.steps_for_nfe(budget)) <= budget < spec.nfe(spec.steps_for_nfe(budget) + 1)


# ---- the kernel check takes aliases and asks the kernel whether it is Gaussian ------------------------------------


@pytest.mark.parametrize("kernel", [PoissonKernel(8), PoissonKernel(1, max_radius=3.0)])
def test_samplers_that_add_noise_are_refused_for_a_poisson_kernel(kernel):
    with pytest.raises(DifflabError, match="sampler 'Euler a' adds Gaussian noise, which does not reverse a poisson"):
        sampler_for_kernel("Euler a", {}, kernel)
    assert sampler_for_kernel("Euler a", {"eta": 0.0}, kernel) is SAMPLERS["euler_ancestral"]
    assert sampler_for_kernel("DPM++ 2M Karras", {}, kernel) is SAMPLERS["dpmpp_2m"]
    assert sampler_for_kernel("ddpm", {}, GaussianKernel()) is SAMPLERS["ddpm"]
