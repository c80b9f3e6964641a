"""A diffusers scheduler config as difflab's DDPM formulation, and a diffusers scheduler's timesteps as a difflab grid.

diffusers keeps the noise schedule in the scheduler (`scheduler/scheduler_config.json`): `num_train_timesteps` T,
`beta_start`, `beta_end`, `beta_schedule` and `prediction_type`. Its table is computed in float32
(`betas` -> `alphas_cumprod = cumprod(1 - betas)`); we rebuild the same float32 table (so sigma(t) is the model's own
at every integer t) and hold it as difflab's float64 `DiscreteSchedule`. The sampling part of a scheduler config
(clip_sample, thresholding, variance_type for DDPM) is a sampler choice, not part of the model, and is not carried
over: difflab's samplers never clip x0_hat.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from difflab.errors import DifflabError
from difflab.formulations.ddpm import DDPM, DDPMConfig
from difflab.schedules import DiscreteSchedule

# diffusers' beta_schedule -> difflab's schedule name (same closed form; cosine = Nichol & Dhariwal's "squaredcos")
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine",
                  "sigmoid": "sigmoid"}  # fmt: skip
# diffusers' prediction_type -> difflab's prediction
PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


@dataclass(frozen=True)
class SchedulerSpec:
    """What difflab takes from a diffusers scheduler config: the training process and the default sampling grid."""

    beta_schedule: str  # diffusers' name
    timesteps: int  # T
    beta_start: float
    beta_end: float
    prediction: str  # difflab's: eps, v, x0
    timestep_spacing: str = "leading"
    steps_offset: int = 0

    @classmethod
    def from_config(cls, config: dict[str, Any], where: str = "scheduler_config.json") -> SchedulerSpec:
        """The spec of a scheduler config (a dict, as json.load gives it); what difflab cannot run is refused in one
        line naming the key."""
        schedule = config.get("beta_schedule", "linear")
        if schedule not in BETA_SCHEDULES:
            raise DifflabError(f"{where}: beta_schedule '{schedule}' is not supported; difflab reads "
                               f"{', '.join(BETA_SCHEDULES)}")  # fmt: skip
        if config.get("trained_betas") is not None:
            raise DifflabError(f"{where}: trained_betas (an explicit beta table) is not supported")
        if config.get("rescale_betas_zero_snr"):
            raise DifflabError(f"{where}: rescale_betas_zero_snr gives sigma_max = infinity at t = T-1, which a "
                               "sigma-space denoiser cannot take")  # fmt: skip
        if config.get("timestep_type", "discrete") != "discrete":
            raise DifflabError(f"{where}: timestep_type '{config['timestep_type']}' is not supported (discrete only)")
        prediction = config.get("prediction_type", "epsilon")
        if prediction not in PREDICTION_TYPES:
            raise DifflabError(f"{where}: prediction_type '{prediction}' is not supported; difflab reads "
                               f"{', '.join(PREDICTION_TYPES)}")  # fmt: skip
        spacing = config.get("timestep_spacing", "leading")
        if spacing not in TIMESTEP_SPACINGS:
            raise DifflabError(f"{where}: timestep_spacing '{spacing}' is not one of {', '.join(TIMESTEP_SPACINGS)}")
        timesteps = config.get("num_train_timesteps", 1000)
        if isinstance(timesteps, bool) or not isinstance(timesteps, int) or not 2 <= timesteps <= 100_000:
            raise DifflabError(f"{where}: num_train_timesteps must be an integer in 2 .. 100000, got {timesteps!r}")
        beta_start, beta_end = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
        if not 0 < beta_start <= beta_end < 1:
            raise DifflabError(f"{where}: need 0 < beta_start <= beta_end < 1, got {beta_start} and {beta_end}")
        return cls(schedule, timesteps, beta_start, beta_end, PREDICTION_TYPES[prediction], spacing,
                   int(config.get("steps_offset", 0) or 0))  # fmt: skip

    def float32_alpha_bars(self) -> torch.Tensor:
        """diffusers' alphas_cumprod: the betas and their cumulative product in float32, as its schedulers compute
        them (`betas_for_alpha_bar` in Python floats for squaredcos_cap_v2)."""
        T, start, end = self.timesteps, self.beta_start, self.beta_end
        if self.beta_schedule == "linear":
            betas = torch.linspace(start, end, T, dtype=torch.float32)
        elif self.beta_schedule == "scaled_linear":
            betas = torch.linspace(start**0.5, end**0.5, T, dtype=torch.float32) ** 2
        elif self.beta_schedule == "sigmoid":
            betas = torch.sigmoid(torch.linspace(-6, 6, T)) * (end - start) + start
        else:  # squaredcos_cap_v2

            def abar(t: float) -> float:
                return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

            betas = torch.tensor([min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)],
                                 dtype=torch.float32)  # fmt: skip
        return torch.cumprod(1.0 - betas, dim=0)

    def discrete_schedule(self) -> DiscreteSchedule:
        """difflab's float64 table holding diffusers' float32 alphas_cumprod (betas recovered from their ratios)."""
        abar = self.float32_alpha_bars().double()
        betas = 1 - abar / torch.cat([abar.new_ones(1), abar[:-1]])
        return DiscreteSchedule(f"diffusers:{self.beta_schedule}", betas)

    def ddpm_config(self) -> DDPMConfig:
        """difflab's DDPMConfig for this schedule. Its named schedule is exact only when beta_start/beta_end are
        difflab's defaults for that name (`matches_difflab_schedule`); the loaded formulation always holds the
        folder's own table."""
        return DDPMConfig(BETA_SCHEDULES[self.beta_schedule], self.timesteps, self.prediction)

    def matches_difflab_schedule(self, rtol: float = 1e-5) -> bool:
        """True when difflab's named schedule (with its default betas) equals this one to float32 precision."""
        named = DiscreteSchedule.from_name(BETA_SCHEDULES[self.beta_schedule], self.timesteps)
        return bool(torch.allclose(named.alpha_bars, self.float32_alpha_bars().double(), rtol=rtol, atol=0))

    def timesteps_for(self, steps: int) -> list[int]:
        """The integer training timesteps a diffusers DDIM / DDPM / PNDM scheduler of this config visits in `steps`
        steps (its `timestep_spacing` and `steps_offset`), decreasing (diffusers' `set_timesteps`)."""
        T = self.timesteps
        if not 1 <= steps <= T:
            raise DifflabError(f"--steps must be between 1 and {T}, got {steps}")
        if self.timestep_spacing == "linspace":
            ts = torch.linspace(0, T - 1, steps, dtype=torch.float64).round().flip(0)
        elif self.timestep_spacing == "leading":
            ts = (torch.arange(steps, dtype=torch.float64) * (T // steps)).round().flip(0) + self.steps_offset
        else:  # trailing
            ts = torch.arange(T, 0, -T / steps, dtype=torch.float64).round() - 1
        return [int(t) for t in ts]


class DiffusersDDPM(DDPM):
    """difflab's DDPM formulation on a diffusers folder's own schedule: the float32 table of its scheduler config and,
    as the default ("respaced") grid, the timesteps its scheduler visits (timestep_spacing, steps_offset) then 0."""

    def __init__(self, spec: SchedulerSpec):
        super().__init__(spec.ddpm_config())
        self.spec = spec
        self.discrete_schedule = spec.discrete_schedule()

    def respaced_sigmas(self, steps: int) -> torch.Tensor:
        ts = torch.tensor(self.spec.timesteps_for(steps))
        sigmas = self.discrete_schedule.sigmas[ts.clamp(0, self.spec.timesteps - 1)]
        return torch.cat([sigmas, sigmas.new_zeros(1)]).float()

    def __repr__(self) -> str:
        s = self.spec
        return (f"DiffusersDDPM({s.beta_schedule} {s.beta_start:g}..{s.beta_end:g}, T={s.timesteps}, "
                f"prediction={s.prediction}, spacing={s.timestep_spacing})")  # fmt: skip


def scheduler_sigmas(scheduler: Any, schedule: DiscreteSchedule) -> torch.Tensor:
    """The difflab grid (float32, decreasing) a diffusers scheduler walks after `set_timesteps`, to run a difflab
    sampler at equal timesteps: an Euler-type scheduler's own `sigmas` (its final 0 included); for DDIM, sigma at each
    of its timesteps, then its final level (0 when set_alpha_to_one, else sigma at t = 0, where diffusers stops).

    diffusers' DDIM steps from t to t - T // steps whatever its timestep_spacing; when that is not the next timestep
    it evaluates (linspace or trailing spacing with steps not dividing T) its sampler is not one path of the ODE and
    no difflab grid reproduces it: refused in one line."""
    if getattr(scheduler, "sigmas", None) is not None and hasattr(scheduler, "init_noise_sigma"):
        sigmas = torch.as_tensor(scheduler.sigmas, dtype=torch.float32)
        if len(sigmas) == len(scheduler.timesteps) + 1:
            return sigmas
    ts = [int(t) for t in scheduler.timesteps]
    jump = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    if any(b != a - jump for a, b in zip(ts, ts[1:], strict=False)):
        raise DifflabError(f"this scheduler's DDIM steps from t to t - {jump} but evaluates next at other timesteps "
                           f"({ts[:3]}...); use steps dividing {scheduler.config.num_train_timesteps} or leading "
                           "spacing")  # fmt: skip
    final = float(getattr(scheduler, "final_alpha_cumprod", 1.0))  # DDPMScheduler: always 1 (sigma 0)
    last = 0.0 if final >= 1 else math.sqrt((1 - final) / final)
    sigmas = schedule.sigmas[torch.tensor(ts)]
    return torch.cat([sigmas, sigmas.new_tensor([last])]).float()
