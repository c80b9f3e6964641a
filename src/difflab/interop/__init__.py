"""Interoperability with other toolkits, offline. diffusers (`pip install 'difflab[diffusers]'`):

    load_diffusers(folder)       a diffusers pipeline folder (model_index.json: unet/, or DiTPipeline's transformer/)
                                 as a difflab Pipeline; difflab.load(folder) calls it for such a folder
    export_diffusers(run, out)   a difflab DDPM U-Net as a diffusers DDPMPipeline folder, where the architecture maps
    load_autoencoder(folder)     a diffusers AutoencoderKL as difflab's Autoencoder (encode/decode scaled latents)
    scheduler_sigmas(sched, ...) a diffusers scheduler's timesteps as a difflab sampling grid

Importing this package does not import diffusers; each function does, and a missing extra is a one-line DifflabError.
"""

from __future__ import annotations

from typing import Any

_MODULES = {
    "diffusers_folder": ("load_diffusers", "is_diffusers_folder", "load_autoencoder"),
    "diffusers_export": ("export_diffusers", "export_refusal"),
    "diffusers_schedule": ("scheduler_sigmas", "SchedulerSpec", "DiffusersDDPM"),
    "diffusers_models": ("DiffusersUNet", "DiffusersDiT", "DiffusersAutoencoder", "DiffusersTextEncoder"),
}
_EXPORTS = {name: module for module, names in _MODULES.items() for name in names}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'difflab.interop' has no attribute '{name}'")
    import importlib

    return getattr(importlib.import_module(f"difflab.interop.{_EXPORTS[name]}"), name)
