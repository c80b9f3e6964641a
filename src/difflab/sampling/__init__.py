"""Samplers by name: a typed registry that the CLI and configs use. A sampler is a function
(denoiser, x, sigmas, *, cond, noise, callback, **options) -> x that owns its loop."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from difflab.errors import DifflabError
from difflab.sampling.ancestral import sample_ddim, sample_ddpm
from difflab.sampling.langevin import sample_ald, sample_pc
from difflab.sampling.noise import GeneratorNoise, PerSampleNoise
from difflab.sampling.ode import sample_dpmpp_2m, sample_euler, sample_heun, sample_lms, sample_rk45
from difflab.sampling.sde import sample_dpmpp_2m_sde, sample_euler_ancestral, sample_euler_maruyama

Cost = Callable[[int, dict[str, Any]], int]  # (steps, options) -> network evaluations on a grid ending in 0


def _per_step(k: int) -> Cost:
    return lambda steps, options: k * steps


def _zero_option(name: str, default: float) -> Callable[[dict[str, Any]], bool]:
    return lambda options: options.get(name, default) == 0


def _always(value: bool) -> Callable[[dict[str, Any]], bool]:
    return lambda options: value


@dataclass(frozen=True)
class SamplerSpec:
    name: str
    fn: Callable
    summary: str
    options: tuple[str, ...] = ()  # keyword options the CLI may pass besides cond/noise/callback
    cost: Cost | None = field(default=_per_step(1))  # None: adaptive (the sampler reports its own count)
    # whether it integrates the PF-ODE without drawing noise, given its options; only these suit a kernel other
    # than the Gaussian (PFGM/PFGM++), whose reverse SDE is not the Gaussian one
    deterministic: Callable[[dict[str, Any]], bool] = field(default=_always(True))

    def nfe(self, steps: int, options: dict[str, Any] | None = None) -> int:
        """Network evaluations used by `steps` steps on a grid that ends in sigma = 0."""
        if self.cost is None:
            raise DifflabError(f"sampler '{self.name}' is adaptive: its NFE follows from rtol/atol, not from steps")
        return self.cost(steps, options or {})

    def steps_for_nfe(self, nfe: int, options: dict[str, Any] | None = None) -> int:
        """The most steps whose cost fits in `nfe` network evaluations (at least 1)."""
        steps = 1
        while self.nfe(steps + 1, options) <= nfe:
            steps += 1
        return steps


SAMPLERS: dict[str, SamplerSpec] = {
    s.name: s
    for s in (
        SamplerSpec("ddpm", sample_ddpm, "DDPM ancestral sampling (Ho et al. 2020, Alg. 2)", ("variance",),
                    deterministic=_always(False)),
        SamplerSpec("ddim", sample_ddim, "DDIM (Song et al. 2021, Eq. 12); eta 0 deterministic, 1 = DDPM", ("eta",),
                    deterministic=_zero_option("eta", 0.0)),
        SamplerSpec("euler", sample_euler, "Euler on the probability-flow ODE (Karras et al. 2022, Alg. 1); "
                    "log_sigma: steps in log sigma (PFGM's log z)", ("log_sigma",)),
        SamplerSpec("heun", sample_heun, "Heun 2nd order (Karras et al. 2022, Alg. 2); s_churn > 0 adds noise",
                    ("s_churn", "s_tmin", "s_tmax", "s_noise"), lambda steps, o: 2 * steps - 1,
                    _zero_option("s_churn", 0.0)),
        SamplerSpec("dpmpp_2m", sample_dpmpp_2m, "DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2), 2nd-order multistep"),
        SamplerSpec("lms", sample_lms, "linear multistep on the PF-ODE (order 4 by default)", ("order",)),
        SamplerSpec("rk45", sample_rk45, "adaptive Dormand-Prince RK45 on the PF-ODE; --steps sets only the range",
                    ("rtol", "atol"), None),
        SamplerSpec("euler_ancestral", sample_euler_ancestral, "Euler ancestral (k-diffusion); same map as ddim(eta)",
                    ("eta",), deterministic=_zero_option("eta", 1.0)),
        SamplerSpec("euler_maruyama", sample_euler_maruyama, "Euler-Maruyama, reverse SDE (Song et al. 2021, Eq. 6)",
                    deterministic=_always(False)),
        SamplerSpec("dpmpp_2m_sde", sample_dpmpp_2m_sde, "DPM-Solver++(2M) SDE (Lu et al. 2022b), midpoint",
                    ("eta", "s_noise"), deterministic=_zero_option("eta", 1.0)),
        SamplerSpec("pc", sample_pc, "predictor-corrector (Song et al. 2021, Alg. 2): Langevin + reverse diffusion",
                    ("snr", "corrector_steps"), lambda steps, o: (o.get("corrector_steps", 1) + 1) * steps,
                    _always(False)),
        SamplerSpec("ald", sample_ald, "annealed Langevin dynamics (Song & Ermon 2019, Alg. 1), final denoising",
                    ("step_size", "n_steps_each"), lambda steps, o: o.get("n_steps_each", 5) * steps + 1,
                    _always(False)),
    )
}  # fmt: skip


def sampler_for_kernel(name: str, options: dict[str, Any], kernel_name: str) -> SamplerSpec:
    """The sampler called `name`, refused when it adds Gaussian noise to a model whose kernel is not Gaussian
    (PFGM/PFGM++: the Gaussian reverse SDE does not reverse a Poisson kernel)."""
    spec = get_sampler(name)
    if kernel_name != "gaussian" and not spec.deterministic(options):
        raise DifflabError(
            f"sampler '{name}' adds Gaussian noise, which does not reverse a {kernel_name}-kernel model; use an "
            "ODE sampler: euler, heun, dpmpp_2m, lms, rk45 or ddim with eta 0"
        )
    return spec


def get_sampler(name: str) -> SamplerSpec:
    """The sampler called `name`, or a DifflabError listing the known ones."""
    if name not in SAMPLERS:
        raise DifflabError(f"unknown sampler '{name}': choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


__all__ = ["SAMPLERS", "SamplerSpec", "get_sampler", "sampler_for_kernel", "PerSampleNoise", "GeneratorNoise"]
