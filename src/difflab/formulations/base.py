"""What every formulation shares (Karras et al. 2022, Sec. 2 and Table 1, taken one step further): a formulation turns
a raw network F into a sigma-space denoiser, owns its training loss and prior kernel, its sigma range, its default
sampling grid, and says which samplers it admits. Subclasses override only what differs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from difflab.errors import DifflabError
from difflab.kernels import GAUSSIAN, Kernel
from difflab.schedules import (
    DiscreteSchedule,
    custom_sigmas,
    is_custom_grid,
    karras_sigmas,
    log_snr_sigmas,
    trailing_karras_sigmas,
)


@dataclass(frozen=True)
class DataInfo:
    """What a formulation may derive its settings from: the sample shape and the RMS data norm (PFGM)."""

    sample_shape: tuple[int, ...]
    data_norm: float | None = None
    batch_size: int = 128


def check_sigma_range(sigma_min: float, sigma_max: float) -> None:
    """A noise-level range must satisfy 0 < sigma_min < sigma_max (finite)."""
    if not (0 < sigma_min < sigma_max < math.inf):
        raise DifflabError(f"need 0 < --sigma-min < --sigma-max, got {sigma_min} and {sigma_max}")


def check_log_normal(p_mean: float, p_std: float) -> None:
    """Training levels ln(sigma) ~ N(p_mean, p_std^2) need a finite mean and a positive, finite spread."""
    if not math.isfinite(p_mean):
        raise DifflabError(f"--p-mean must be a finite number, got {p_mean}")
    if not 0 < p_std < math.inf:
        raise DifflabError(f"--p-std must be a positive finite number, got {p_std}")


class Formulation:
    """A process (ddpm, vp, subvp, ve, edm, pfgmpp, pfgm) as an object. `config` is its frozen settings dataclass
    (`Config`), saved in config.json under "formulation"."""

    name: ClassVar[str]
    Config: ClassVar[type]
    kernel: Kernel = GAUSSIAN  # the training perturbation and, at sigma_max, the prior
    extra_outputs: ClassVar[int] = 0  # network outputs beyond the data's channels (PFGM's z component: 1)
    default_grid: ClassVar[str] = "karras"
    default_sampler: ClassVar[str] = "ddim"
    default_steps: ClassVar[int] = 50
    sampler_family: ClassVar[str] = "diffusion"  # the samplers it admits: a SamplerSpec's `family`
    nll_refusal: ClassVar[str | None] = None  # why the PF-ODE likelihood does not apply, if it does not
    discrete_schedule: DiscreteSchedule | None = None  # a discrete-time model's schedule (the DDPM bound needs it)

    def __init__(self, config: Any):
        if not isinstance(config, self.Config):
            raise TypeError(f"formulation '{self.name}' takes a {self.Config.__name__}, not {type(config).__name__}")
        self.config = config

    @classmethod
    def make_config(cls, data: DataInfo | None = None, **settings: Any) -> Any:
        """The config from user settings (None = the paper's default); `data` for formulations that derive
        hyper-parameters from the data."""
        return cls.Config(**{k: v for k, v in settings.items() if v is not None})

    def sampling_defaults(self) -> dict[str, Any]:
        """The sampler, step count and grid a model of this formulation samples with when none are asked for."""
        return {"sampler": self.default_sampler, "steps": self.default_steps,
                "grid": self.default_grid_for(self.default_sampler)}  # fmt: skip

    def extra_outputs_for(self, sample_shape: tuple[int, ...]) -> int:
        """Network outputs beyond the data's channels for samples of this shape (iDDPM's learned variance: C)."""
        return self.extra_outputs

    def default_batch_size(self, usual: int) -> int:
        """The training batch for a data kind whose usual batch is `usual`."""
        return usual

    def denoiser(self, net: nn.Module) -> nn.Module:
        """The sigma-space denoiser D(x, sigma, cond) of network F (an nn.Module holding it as `.net`)."""
        raise NotImplementedError

    def loss(self, min_snr_gamma: float | None = None):
        """The training objective: loss(denoiser, x0, generator, cond) -> per-sample losses (B,)."""
        raise NotImplementedError

    def sigma_range(self) -> tuple[float, float]:
        """The (sigma_min, sigma_max) a model is trained on and sampled over."""
        raise NotImplementedError

    # ---- sampling grids ---------------------------------------------------------------------------------
    def uniform_t_sigmas(self, steps: int) -> torch.Tensor:
        raise DifflabError(f"--grid uniform_t needs a diffusion process; for {self.name} use karras or log_snr")

    def respaced_sigmas(self, steps: int) -> torch.Tensor:
        raise DifflabError("--grid respaced needs a discrete (ddpm) model; use karras, uniform_t or log_snr")

    def trailing_sigmas(self, steps: int) -> torch.Tensor:
        """N steps that nest in 2N: the Karras ramp at u = i/N, i < N, then 0 (DDPM: diffusers' trailing timesteps)."""
        return trailing_karras_sigmas(steps, *self.sigma_range())

    def default_grid_for(self, sampler: str | None = None) -> str:
        """The grid used when none is named: the sampler's own where it has one (`SamplerSpec.grid`: log_snr for the
        lambda-multistep solvers dpmpp_2m, dpmpp_2m_sde, dpmpp_3m, unipc, which take equal steps in log sigma best),
        else the formulation's `default_grid`. Measured on the exact 64-D Gaussian-mixture denoiser at 10 NFE
        (benchmarks/samplers.py, Frechet distance; exact samples 0.168): dpmpp_2m 0.22 on log-SNR against 0.74 on
        EDM's Karras grid and 0.20 against 0.82 on DDPM's respaced grid; unipc 0.24 against 0.90 and 0.22 against
        0.76; at 50 NFE all within 1 %."""
        if sampler is None:
            return self.default_grid
        from difflab.sampling import get_sampler

        return get_sampler(sampler).grid or self.default_grid

    def sigmas(self, steps: int, grid: str | None = None, sampler: str | None = None) -> torch.Tensor:
        """A decreasing grid of `steps` noise levels ending in 0, (steps + 1,): Karras (rho = 7), uniform in
        log-SNR (= k-diffusion's exponential), uniform in the process's t, the respaced DDPM timesteps, or the
        trailing grid (N nested in 2N); or levels the user lists ("80,0.8": `steps` is then their number).
        grid None: `default_grid_for(sampler)`."""
        from difflab.sampling import resolve_grid  # the grid names and their aliases live with the samplers

        if is_custom_grid(grid):  # noise levels the user chose: they set the number of steps
            return custom_sigmas(grid)
        grid = resolve_grid(grid) if grid else self.default_grid_for(sampler)
        if steps < 1:
            raise DifflabError(f"--steps must be at least 1, got {steps}")
        if grid == "respaced":
            return self.respaced_sigmas(steps)
        if grid == "uniform_t":
            return self.uniform_t_sigmas(steps)
        if grid == "trailing":
            return self.trailing_sigmas(steps)
        if grid == "tuned":
            raise DifflabError("--grid tuned reads levels stored with a checkpoint (difflab tune-grid); this model "
                               "came from none")  # fmt: skip
        sigma_min, sigma_max = self.sigma_range()
        return (karras_sigmas if grid == "karras" else log_snr_sigmas)(steps, sigma_min, sigma_max)

    def sampler(self, name: str, options: dict[str, Any] | None = None):
        """The sampler called `name` (or an alias), refused when it adds Gaussian noise to a model whose kernel is
        not Gaussian (PFGM/PFGM++: the Gaussian reverse SDE does not reverse a Poisson kernel)."""
        from difflab.sampling import sampler_for_kernel

        spec = sampler_for_kernel(name, dict(options or {}), self.kernel)
        self.check_sampler(spec)
        return spec

    def check_sampler(self, spec) -> None:
        """Refuse a sampler of another family: a consistency model's samplers call a consistency function, every
        other sampler a denoiser (the two are not interchangeable)."""
        if spec.family != self.sampler_family:
            from difflab.sampling import SAMPLERS

            mine = ", ".join(s.name for s in SAMPLERS.values() if s.family == self.sampler_family)
            raise DifflabError(f"sampler '{spec.name}' is for {spec.family} models; a {self.name} model samples with "
                               f"{mine}")  # fmt: skip

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"
