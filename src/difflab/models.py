"""Build networks, denoisers, losses and sampling grids from a RunConfig, through typed registries."""

from __future__ import annotations

import torch
from torch import nn

from difflab.adapters import discrete_time_denoiser
from difflab.config import DataConfig, DiffusionConfig, ModelConfig, RunConfig
from difflab.errors import DifflabError
from difflab.losses import DenoisingLoss, DiscreteTimesteps, LogNormalSigma, UniformTime
from difflab.nets.mlp import MLP, MLPConfig
from difflab.nets.unet import UNet, unet_preset
from difflab.precond import PreconditionedDenoiser, make_prediction
from difflab.processes import PROCESSES, make_process, uniform_t_sigmas
from difflab.schedules import DiscreteSchedule, karras_sigmas, log_snr_sigmas
from difflab.sigmas import t_to_sigma

MODEL_PRESETS = ("tiny", "small", "base")
PROCESS_NAMES = ("ddpm", *PROCESSES)
GRID_NAMES = ("respaced", "karras", "uniform_t", "log_snr")
# prediction types each process supports; the first is the default
PROCESS_PREDICTIONS = {"ddpm": ("eps", "x0", "v"), "vp": ("eps", "x0", "v"), "subvp": ("eps",), "ve": ("eps",),
                       "edm": ("edm",)}  # fmt: skip


def model_config_for(data: DataConfig, preset: str = "tiny", dropout: float = 0.0) -> ModelConfig:
    """A U-Net preset for images, or the MLP (sized by preset) for low-dimensional points."""
    if data.kind == "images":
        return ModelConfig("unet", preset, unet=unet_preset(preset, data.resolution, data.channels, dropout))
    hidden = {"tiny": 128, "small": 256, "base": 512}
    if preset not in hidden:
        raise DifflabError(f"unknown model preset '{preset}': choose one of {', '.join(MODEL_PRESETS)}")
    return ModelConfig("mlp", preset, mlp=MLPConfig(data_dim=data.sample_shape[0], hidden=hidden[preset]))


def build_network(config: ModelConfig) -> nn.Module:
    """The raw network F described by `config`."""
    if config.kind == "unet" and config.unet is not None:
        return UNet(config.unet)
    if config.kind == "mlp" and config.mlp is not None:
        return MLP(config.mlp)
    raise DifflabError(f"model config names kind '{config.kind}' without its settings; use 'unet' or 'mlp'")


def check_diffusion(config: DiffusionConfig) -> None:
    if config.process not in PROCESS_PREDICTIONS:
        raise DifflabError(f"unknown process '{config.process}': choose one of {', '.join(PROCESS_NAMES)}")
    allowed = PROCESS_PREDICTIONS[config.process]
    if config.prediction not in allowed:
        raise DifflabError(
            f"process '{config.process}' trains with prediction {' or '.join(allowed)}, not '{config.prediction}'"
        )


def build_schedule(config: DiffusionConfig) -> DiscreteSchedule:
    return DiscreteSchedule.from_name(config.schedule, config.num_steps)


def build_process(config: DiffusionConfig):
    """The continuous process of a config (not for ddpm); ve and edm take the config's sigma range."""
    if config.process in ("ve", "edm"):
        return make_process(config.process, sigma_min=config.sigma_min, sigma_max=config.sigma_max)
    return make_process(config.process)


def build_denoiser(config: RunConfig, net: nn.Module | None = None) -> PreconditionedDenoiser:
    """The sigma-space denoiser D for this run: network + preconditioning + noise conditioning.

    c_noise: the (fractional) DDPM timestep for ddpm; 999 t(sigma) for vp/subvp (score_sde); ln(sigma/2) for ve
    and ln(sigma)/4 for edm (Karras et al. 2022, Table 1).
    """
    diffusion = config.diffusion
    check_diffusion(diffusion)
    net = net if net is not None else build_network(config.model)
    if diffusion.process == "ddpm":
        return discrete_time_denoiser(net, build_schedule(diffusion), make_prediction(diffusion.prediction))
    process = build_process(diffusion)
    if diffusion.process == "edm":
        return PreconditionedDenoiser(net, make_prediction("edm", sigma_data=diffusion.sigma_data), _quarter_log)
    if diffusion.process == "ve":
        return PreconditionedDenoiser(net, make_prediction("eps", input_scale=torch.ones_like), _log_half)
    kwargs = {} if diffusion.prediction == "v" else {"input_scale": process.signal_scale}
    return PreconditionedDenoiser(net, make_prediction(diffusion.prediction, **kwargs), _TimeLabel(process))


def _quarter_log(sigma: torch.Tensor) -> torch.Tensor:
    return sigma.log() / 4


def _log_half(sigma: torch.Tensor) -> torch.Tensor:
    return (sigma / 2).log()


class _TimeLabel:
    """c_noise = 999 t(sigma): score_sde's continuous-time label for DDPM-style networks."""

    def __init__(self, process):
        self.process = process

    def __call__(self, sigma: torch.Tensor) -> torch.Tensor:
        return (999 * self.process.t_of_sigma(sigma.double())).to(sigma.dtype)


def build_loss(config: DiffusionConfig, min_snr_gamma: float | None = None) -> DenoisingLoss:
    """The training objective of a process: its noise-level density and the F-space MSE."""
    check_diffusion(config)
    if config.process == "ddpm":
        return DenoisingLoss(DiscreteTimesteps(build_schedule(config)), min_snr_gamma)
    if config.process == "edm":
        return DenoisingLoss(LogNormalSigma(), min_snr_gamma)
    return DenoisingLoss(
        UniformTime(build_process(config), t_min=1e-5 if config.process != "ve" else 0.0), min_snr_gamma
    )


def sigma_range(config: DiffusionConfig) -> tuple[float, float]:
    """The (sigma_min, sigma_max) a model of this config was trained on."""
    if config.process == "ddpm":
        schedule = build_schedule(config)
        return schedule.sigma_min, schedule.sigma_max
    process = build_process(config)
    return process.sigma_min, process.sigma_max


def default_grid(config: DiffusionConfig) -> str:
    """The model's own respaced timesteps for ddpm; Karras et al.'s rho = 7 grid for continuous processes (the
    uniform-t grid of score_sde leaves one large final step that multistep solvers extrapolate badly)."""
    return "respaced" if config.process == "ddpm" else "karras"


def sampling_sigmas(config: DiffusionConfig, steps: int, grid: str | None = None) -> torch.Tensor:
    """A decreasing grid of `steps` noise levels ending in 0, (steps + 1,): respaced DDPM timesteps, Karras
    (rho = 7), uniform in the process's t, or uniform in log-SNR; default depends on the process."""
    grid = grid or default_grid(config)
    if grid not in GRID_NAMES:
        raise DifflabError(f"unknown --grid '{grid}': choose one of {', '.join(GRID_NAMES)}")
    sigma_min, sigma_max = sigma_range(config)
    if grid == "respaced":
        if config.process != "ddpm":
            raise DifflabError("--grid respaced needs a discrete (ddpm) model; use karras, uniform_t or log_snr")
        return build_schedule(config).respaced_sigmas(steps)
    if grid == "karras":
        return karras_sigmas(steps, sigma_min, sigma_max)
    if grid == "log_snr":
        return log_snr_sigmas(steps, sigma_min, sigma_max)
    if config.process == "ddpm":  # uniform in the DDPM time t in [0, T-1], fractional
        schedule = build_schedule(config)
        t = torch.linspace(schedule.num_steps - 1, 0, steps, dtype=torch.float64)
        return torch.cat([t_to_sigma(t, schedule.sigmas), torch.zeros(1, dtype=torch.float64)]).float()
    return uniform_t_sigmas(build_process(config), steps)
