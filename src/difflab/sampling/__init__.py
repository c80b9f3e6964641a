"""Samplers by name: a typed registry that the CLI and configs use. A sampler is a function
(denoiser, x, sigmas, *, cond, noise, callback, **options) -> x that owns its loop; its options (names, defaults,
types) are the keyword parameters of that function, read from its signature, and their help texts live in
OPTION_HELP. Names from other tools (A1111, diffusers, k-diffusion) resolve through `resolve_sampler`.

The registry imports no sampler module (and so not torch): a spec names its function as "module:function" and
reads the options from the function's signature in the module's source (`ast`), so `difflab samplers` and the CLI's
help start fast; `spec.fn` imports the function when a sampler runs, and the sampler functions themselves are
importable from here as before (loaded on first use). The option parsing lives in `signature.py`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from difflab.errors import DifflabError
from difflab.sampling.aliases import (
    GRID_ALIASES,
    GRID_NAMES,
    SAMPLER_ALIASES,
    lookup_sampler_alias,
    normalize_name,
    resolve_grid,
)
from difflab.sampling.signature import (
    OPTION_HELP,
    SamplerOption,
    Target,
    _module_and_function,
    format_default,
    options_from_signature,
)

# where the lazily imported names live
_LAZY = {
    "sample_ddim": "ancestral", "sample_ddpm": "ancestral", "sample_ald": "langevin", "sample_pc": "langevin",
    "GeneratorNoise": "noise", "PerSampleNoise": "noise", "sample_dpmpp_2m": "ode", "sample_euler": "ode",
    "sample_heun": "ode", "sample_lms": "ode", "sample_rk45": "ode", "repaint_sigmas": "repaint",
    "sample_repaint": "repaint", "sample_consistency": "consistency", "sample_dpmpp_2m_sde": "sde",
    "sample_euler_ancestral": "sde",
    "sample_euler_maruyama": "sde", "sample_dpmpp_3m": "multistep", "sample_unipc": "multistep",
}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"difflab.sampling.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'difflab.sampling' has no attribute '{name}'")


Cost = Callable[[int, dict[str, Any]], int]  # (steps, options with defaults) -> NFE on a grid ending in 0
Condition = Callable[[dict[str, Any]], bool]  # options with defaults -> bool


def _per_step(k: int) -> Cost:
    return lambda steps, options: k * steps


def _is_zero(name: str) -> Condition:
    return lambda options: options[name] == 0


def _always(value: bool) -> Condition:
    return lambda options: value


@dataclass(frozen=True)
class SamplerSpec:
    """A registered sampler: `target` "module:function" names its function (imported by `fn` on first use). Its
    options come from that function's signature (`option_specs`); `cost` and `deterministic_if` receive the options
    with the signature's defaults filled in."""

    name: str
    target: Target
    summary: str
    cost: Cost | None = field(default=_per_step(1))  # None: adaptive (the sampler reports its own count)
    # whether it integrates the PF-ODE without drawing noise, given its options; only these suit a kernel other
    # than the Gaussian (PFGM/PFGM++), whose reverse SDE is not the Gaussian one
    deterministic_if: Condition = field(default=_always(True))
    # whether sample i of a batch equals its seed alone (up to the rounding of batched matmuls), given its options;
    # where it is not, `batch_note` says why and how to get it, and `difflab samplers` shows it
    batch_independent_if: Condition = field(default=_always(True))
    batch_note: str = ""
    family: str = "diffusion"  # what it calls: a denoiser ("diffusion") or a consistency function ("consistency")
    grid: str | None = None  # the grid it gets when none is named (None: the model's; `Formulation.default_grid_for`)
    option_specs: tuple[SamplerOption, ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "option_specs", options_from_signature(self.target))

    @property
    def fn(self) -> Callable:
        """The sampler function (its module is imported on first use)."""
        if callable(self.target):
            return self.target
        module, function = _module_and_function(self.target)
        return getattr(importlib.import_module(module), function)

    @property
    def options(self) -> tuple[str, ...]:
        """The names of the keyword options a caller may pass besides cond/noise/callback."""
        return tuple(o.name for o in self.option_specs)

    def with_defaults(self, options: dict[str, Any] | None = None) -> dict[str, Any]:
        """`options` completed with the signature's defaults of the options not given."""
        return {o.name: o.default for o in self.option_specs} | dict(options or {})

    def deterministic(self, options: dict[str, Any] | None = None) -> bool:
        """Whether the sampler with these options draws no noise (so it suits a non-Gaussian kernel)."""
        return self.deterministic_if(self.with_defaults(options))

    def batch_independent(self, options: dict[str, Any] | None = None) -> bool:
        """Whether sample i of a batch equals its seed drawn alone, with these options (see `batch_note`)."""
        return self.batch_independent_if(self.with_defaults(options))

    def nfe(self, steps: int, options: dict[str, Any] | None = None) -> int:
        """Network evaluations used by `steps` steps on a grid that ends in sigma = 0."""
        if self.cost is None:
            raise DifflabError(f"sampler '{self.name}' is adaptive: its NFE follows from rtol/atol, not from steps")
        return self.cost(steps, self.with_defaults(options))

    def steps_for_nfe(self, nfe: int, options: dict[str, Any] | None = None) -> int:
        """The most steps whose cost fits in `nfe` network evaluations; a DifflabError if not even one step fits."""
        if (least := self.nfe(1, options)) > nfe:
            raise DifflabError(f"sampler '{self.name}' needs {least} network evaluation{'s' * (least != 1)} for one "
                               f"step, more than the budget of {nfe}")  # fmt: skip
        steps = 1
        while self.nfe(steps + 1, options) <= nfe:
            steps += 1
        return steps

    def describe(self) -> str:
        """The summary line, then one line per option: flag, default, help (for `difflab samplers`)."""
        lines = [f"{self.name:<16} {self.summary}"]
        if self.batch_note:
            lines.append(f"{'':<16} batch: {self.batch_note}")
        lines += [f"    {o.flag:<18} {format_default(o.default):<7} {o.help}" for o in self.option_specs]
        return "\n".join(lines)


SAMPLERS: dict[str, SamplerSpec] = {
    s.name: s
    for s in (
        SamplerSpec("ddpm", "ancestral:sample_ddpm",
                    "DDPM ancestral sampling (Ho et al. 2020, Alg. 2)",
                    deterministic_if=_always(False)),
        SamplerSpec("ddim", "ancestral:sample_ddim",
                    "DDIM (Song et al. 2021, Eq. 12); eta 0 deterministic, 1 = DDPM",
                    deterministic_if=_is_zero("eta")),
        SamplerSpec("euler", "ode:sample_euler",
                    "Euler on the probability-flow ODE (Karras et al. 2022, Alg. 1)"),
        SamplerSpec("heun", "ode:sample_heun",
                    "Heun 2nd order (Karras et al. 2022, Alg. 2); s_churn > 0 adds noise",
                    lambda steps, o: 2 * steps - 1, _is_zero("s_churn")),
        SamplerSpec("dpmpp_2m", "ode:sample_dpmpp_2m",
                    "DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2), 2nd-order multistep", grid="log_snr"),
        SamplerSpec("dpmpp_3m", "multistep:sample_dpmpp_3m",
                    "DPM-Solver++(3M) (Lu et al. 2022b), 3rd-order multistep", grid="log_snr"),
        SamplerSpec("unipc", "multistep:sample_unipc",
                    "UniPC (Zhao et al. 2023): UniP predictor + UniC corrector (bh2), no extra evaluations",
                    grid="log_snr"),
        SamplerSpec("lms", "ode:sample_lms",
                    "linear multistep (Adams-Bashforth) on the PF-ODE"),
        SamplerSpec("rk45", "ode:sample_rk45",
                    "adaptive Dormand-Prince RK45 on the PF-ODE, a step size per sample; --steps sets only the range",
                    None),
        SamplerSpec("euler_ancestral", "sde:sample_euler_ancestral",
                    "Euler ancestral (k-diffusion); same map as ddim(eta)",
                    deterministic_if=_is_zero("eta")),
        SamplerSpec("euler_maruyama", "sde:sample_euler_maruyama",
                    "Euler-Maruyama, reverse SDE (Song et al. 2021, Eq. 6)",
                    deterministic_if=_always(False)),
        SamplerSpec("dpmpp_2m_sde", "sde:sample_dpmpp_2m_sde",
                    "DPM-Solver++(2M) SDE (Lu et al. 2022b), midpoint",
                    deterministic_if=_is_zero("eta"), grid="log_snr"),
        SamplerSpec("pc", "langevin:sample_pc",
                    "predictor-corrector (Song et al. 2021, Alg. 2): Langevin + reverse diffusion",
                    lambda steps, o: (o["corrector_steps"] + 1) * steps, _always(False),
                    batch_independent_if=lambda o: o["norm_scope"] != "batch" or o["corrector_steps"] == 0,
                    batch_note="--norm-scope batch (score_sde's code) makes a sample depend on its batch; the "
                    "default sigma and sample do not"),
        SamplerSpec("ald", "langevin:sample_ald",
                    "annealed Langevin dynamics (Song & Ermon 2019, Alg. 1), final denoising",
                    lambda steps, o: o["n_steps_each"] * steps + int(bool(o["denoise_last"])), _always(False)),
        SamplerSpec("consistency", "consistency:sample_consistency",
                    "consistency models only (Song et al. 2023, Alg. 1): one step, or multistep with fresh noise",
                    deterministic_if=lambda o: False, family="consistency"),
    )
}  # fmt: skip


def all_sampler_options() -> dict[str, SamplerOption]:
    """Every option of every sampler, once per name (first-seen order), for a CLI that adds one flag per option.

    The help ends with the samplers that take it and the default, "[heun, dpmpp_2m_sde; default 1]", or, where
    their defaults differ, "[default depends on the sampler: ddim 0, euler_ancestral 1, dpmpp_2m_sde 1]" with
    `default` None (each spec's `option_specs` keeps its own). A TypeError if two samplers type one name differently.
    """
    uses: dict[str, list[tuple[str, SamplerOption]]] = {}
    for spec in SAMPLERS.values():
        for option in spec.option_specs:
            uses.setdefault(option.name, []).append((spec.name, option))
    union = {}
    for name, pairs in uses.items():
        kinds = {o.type for _, o in pairs}
        if len(kinds) > 1:
            raise TypeError(f"option '{name}' has different types across samplers: {kinds}")
        samplers = ", ".join(s for s, _ in pairs)
        first = pairs[0][1].default
        if all(o.default == first for _, o in pairs):  # a None default is explained by the help itself
            default, where = first, samplers if first is None else f"{samplers}; default {format_default(first)}"
        else:
            default = None
            where = "default depends on the sampler: " + ", ".join(f"{s} {format_default(o.default)}" for s, o in pairs)
        union[name] = SamplerOption(name, kinds.pop(), default, f"{OPTION_HELP.get(name, '')} [{where}]")
    return union


def resolve_sampler(name: str) -> tuple[SamplerSpec, str | None]:
    """The sampler called `name` (a registered name or an alias of another tool, case-insensitive) and the grid the
    alias implies ("DPM++ 2M Karras" -> karras; None: the model's default); a one-line DifflabError if unknown."""
    key = normalize_name(name)
    if key in SAMPLERS:
        return SAMPLERS[key], None
    alias = lookup_sampler_alias(key)
    if alias is None:
        raise DifflabError(
            f"unknown sampler '{name}': choose one of {', '.join(SAMPLERS)} or a name from A1111, diffusers or "
            "k-diffusion (see `difflab samplers`)"
        )
    canonical, grid = alias
    return SAMPLERS[canonical], grid


def get_sampler(name: str) -> SamplerSpec:
    """The sampler called `name` or an alias of it (the alias's grid is dropped: see `resolve_sampler`), or a
    DifflabError listing the registered names."""
    return resolve_sampler(name)[0]


def sampler_aliases() -> dict[str, tuple[str, str | None]]:
    """Every alias of another tool -> (registered sampler, implied grid or None), for `difflab samplers`."""
    return dict(SAMPLER_ALIASES)


def sampler_for_kernel(name: str, options: dict[str, Any], kernel: Any) -> SamplerSpec:
    """The sampler called `name` (or an alias), refused when it adds Gaussian noise to a model whose kernel is not
    Gaussian (PFGM/PFGM++: the Gaussian reverse SDE does not reverse a Poisson kernel); kernel: a
    `difflab.kernels.Kernel`."""
    spec = get_sampler(name)
    if not kernel.is_gaussian and not spec.deterministic(options):
        raise DifflabError(
            f"sampler '{name}' adds Gaussian noise, which does not reverse a {kernel.name}-kernel model; use an "
            "ODE sampler: euler, heun, dpmpp_2m, dpmpp_3m, unipc, lms, rk45 or ddim with eta 0"
        )
    return spec


__all__ = [
    "GRID_ALIASES",
    "GRID_NAMES",
    "OPTION_HELP",
    "SAMPLERS",
    "GeneratorNoise",
    "PerSampleNoise",
    "SamplerOption",
    "SamplerSpec",
    "all_sampler_options",
    "get_sampler",
    "repaint_sigmas",
    "resolve_grid",
    "resolve_sampler",
    "sample_ald",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_3m",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_euler_maruyama",
    "sample_heun",
    "sample_lms",
    "sample_pc",
    "sample_repaint",
    "sample_rk45",
    "sample_unipc",
    "sampler_aliases",
    "sampler_for_kernel",
]
