"""Build networks, denoisers, losses and sampling grids from a RunConfig, through typed registries."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from difflab.adapters import discrete_time_denoiser
from difflab.config import DataConfig, DiffusionConfig, ModelConfig, RunConfig
from difflab.errors import DifflabError
from difflab.kernels import GAUSSIAN, Kernel, PoissonKernel
from difflab.losses import DenoisingLoss, DiscreteTimesteps, LogNormalSigma, UniformTime
from difflab.nets.mlp import MLP, MLPConfig
from difflab.nets.unet import UNet, unet_preset
from difflab.pfgm import PoissonFieldDenoiser, PoissonFieldLoss
from difflab.precond import PreconditionedDenoiser, make_prediction
from difflab.processes import PROCESSES, make_process, uniform_t_sigmas
from difflab.schedules import DiscreteSchedule, karras_sigmas, log_snr_sigmas
from difflab.sigmas import t_to_sigma

MODEL_PRESETS = ("tiny", "small", "base")
PROCESS_NAMES = ("ddpm", *PROCESSES, "pfgmpp", "pfgm")
GRID_NAMES = ("respaced", "karras", "uniform_t", "log_snr")
# prediction types each process supports; the first is the default
PROCESS_PREDICTIONS = {"ddpm": ("eps", "x0", "v"), "vp": ("eps", "x0", "v"), "subvp": ("eps",), "ve": ("eps",),
                       "edm": ("edm",), "pfgmpp": ("edm",), "pfgm": ("field",)}  # fmt: skip
PFGMPP_BETA_CLIP = 1e-3  # the PFGM++ training code clips B ~ Beta(N/2, D/2) into [1e-3, 1 - 1e-3]


def model_config_for(
    data: DataConfig, preset: str = "tiny", dropout: float = 0.0, field: bool = False, num_classes: int | None = None
) -> ModelConfig:
    """A U-Net preset for images, or the MLP (sized by preset) for low-dimensional points. `field`: one more output
    (an extra channel for the U-Net) for the z component of PFGM's Poisson field; `num_classes`: a
    class-conditional network with a null label."""
    if data.kind == "images":
        unet = replace(unet_preset(preset, data.resolution, data.channels, dropout), num_classes=num_classes)
        return ModelConfig("unet", preset, unet=replace(unet, out_channels=data.channels + 1) if field else unet)
    hidden = {"tiny": 128, "small": 256, "base": 512}
    if preset not in hidden:
        raise DifflabError(f"unknown model preset '{preset}': choose one of {', '.join(MODEL_PRESETS)}")
    dim = data.sample_shape[0]
    mlp = MLPConfig(data_dim=dim, hidden=hidden[preset], out_dim=dim + int(field), num_classes=num_classes)
    return ModelConfig("mlp", preset, mlp=mlp)


def config_num_classes(config: RunConfig) -> int | None:
    """The number of classes of a class-conditional model, None for an unconditional one."""
    settings = config.model.unet if config.model.kind == "unet" else config.model.mlp
    return getattr(settings, "num_classes", None)


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
    if config.process == "pfgmpp" and config.aug_dim is None:
        raise DifflabError("process 'pfgmpp' needs --aug-dim D, the number of extra dimensions (e.g. 128)")
    if config.process != "pfgmpp" and config.aug_dim is not None:
        raise DifflabError(f"--aug-dim is for --process pfgmpp, not '{config.process}'")
    if (config.process == "pfgm") != (config.pfgm is not None):
        raise DifflabError("PFGM hyper-parameters belong to process 'pfgm' (and it needs them); see pfgm_config_for")
    build_kernel(config)  # validates D


def build_kernel(config: DiffusionConfig) -> Kernel:
    """The perturbation kernel that is the model's prior at sigma_max: Poisson (D = aug_dim) for pfgmpp, else
    Gaussian."""
    if config.process == "pfgmpp":
        return PoissonKernel(config.aug_dim)
    if config.process == "pfgm":  # the hemisphere prior at r = z_max, radius clipped (Xu et al. 2022, Sec. 3.3)
        return PoissonKernel(1, max_radius=config.pfgm.upper_norm)
    return GAUSSIAN


def build_schedule(config: DiffusionConfig) -> DiscreteSchedule:
    return DiscreteSchedule.from_name(config.schedule, config.num_steps)


def build_process(config: DiffusionConfig):
    """The continuous process of a config (not for ddpm or pfgm); ve and edm take the config's sigma range. PFGM++ runs
    on EDM's sigma(t) = t with r = sigma sqrt(D) (Xu et al. 2023, Sec. 4)."""
    if config.process in ("ve", "edm", "pfgmpp"):
        name = "edm" if config.process == "pfgmpp" else config.process
        return make_process(name, sigma_min=config.sigma_min, sigma_max=config.sigma_max)
    return make_process(config.process)


def build_denoiser(config: RunConfig, net: nn.Module | None = None) -> PreconditionedDenoiser | PoissonFieldDenoiser:
    """The sigma-space denoiser D for this run: network + preconditioning + noise conditioning.

    c_noise: the (fractional) DDPM timestep for ddpm; 999 t(sigma) for vp/subvp (score_sde); ln(sigma/2) for ve
    and ln(sigma)/4 for edm (Karras et al. 2022, Table 1) and pfgmpp, which keeps EDM's denoiser unchanged. A pfgm
    field network becomes a denoiser with sigma = z (`PoissonFieldDenoiser`).
    """
    diffusion = config.diffusion
    check_diffusion(diffusion)
    net = net if net is not None else build_network(config.model)
    if diffusion.process == "ddpm":
        return discrete_time_denoiser(net, build_schedule(diffusion), make_prediction(diffusion.prediction))
    if diffusion.process == "pfgm":
        return PoissonFieldDenoiser(net, diffusion.pfgm.gamma, diffusion.pfgm.z_exp)
    process = build_process(diffusion)
    if diffusion.process in ("edm", "pfgmpp"):
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


def build_loss(config: DiffusionConfig, min_snr_gamma: float | None = None) -> DenoisingLoss | PoissonFieldLoss:
    """The training objective of a process: its noise-level density and the F-space MSE; PFGM's field regression."""
    check_diffusion(config)
    if config.process == "pfgm":
        if min_snr_gamma is not None:
            raise DifflabError("--min-snr-gamma weights a denoising loss; process 'pfgm' regresses a field")
        return PoissonFieldLoss(config.pfgm)
    if config.process == "ddpm":
        return DenoisingLoss(DiscreteTimesteps(build_schedule(config)), min_snr_gamma)
    if config.process == "edm":
        return DenoisingLoss(LogNormalSigma(), min_snr_gamma)
    if config.process == "pfgmpp":  # EDM's sigma density and loss; only the kernel changes (Xu et al. 2023, Alg. 1)
        return DenoisingLoss(LogNormalSigma(), min_snr_gamma, PoissonKernel(config.aug_dim, PFGMPP_BETA_CLIP))
    return DenoisingLoss(
        UniformTime(build_process(config), t_min=1e-5 if config.process != "ve" else 0.0), min_snr_gamma
    )


def sigma_range(config: DiffusionConfig) -> tuple[float, float]:
    """The (sigma_min, sigma_max) a model of this config was trained on."""
    if config.process == "ddpm":
        schedule = build_schedule(config)
        return schedule.sigma_min, schedule.sigma_max
    if config.process == "pfgm":
        return config.pfgm.z_min, config.pfgm.z_max
    process = build_process(config)
    return process.sigma_min, process.sigma_max


def default_grid(config: DiffusionConfig) -> str:
    """The model's own respaced timesteps for ddpm; Karras et al.'s rho = 7 grid for continuous processes (the
    uniform-t grid of score_sde leaves one large final step that multistep solvers extrapolate badly); uniform in
    log z for pfgm (its authors' Euler grid)."""
    return {"ddpm": "respaced", "pfgm": "log_snr"}.get(config.process, "karras")


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
    if config.process == "pfgm":
        raise DifflabError("--grid uniform_t needs a diffusion process; for pfgm use log_snr (uniform in log z)")
    return uniform_t_sigmas(build_process(config), steps)
