"""Build networks and denoisers from a RunConfig, through typed registries."""

from __future__ import annotations

from torch import nn

from difflab.adapters import discrete_time_denoiser
from difflab.config import DataConfig, DiffusionConfig, ModelConfig, RunConfig
from difflab.errors import DifflabError
from difflab.nets.mlp import MLP, MLPConfig
from difflab.nets.unet import UNet, unet_preset
from difflab.precond import PreconditionedDenoiser, make_prediction
from difflab.schedules import DiscreteSchedule

MODEL_PRESETS = ("tiny", "small", "base")


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


def build_schedule(config: DiffusionConfig) -> DiscreteSchedule:
    return DiscreteSchedule.from_name(config.schedule, config.num_steps)


def build_denoiser(config: RunConfig, net: nn.Module | None = None) -> PreconditionedDenoiser:
    """The sigma-space denoiser D for this run: network + discrete-time adapter + preconditioning."""
    net = net if net is not None else build_network(config.model)
    schedule = build_schedule(config.diffusion)
    return discrete_time_denoiser(net, schedule, make_prediction(config.diffusion.prediction))
