"""Interoperability with other toolkits, offline. diffusers (`pip install 'difflab[diffusers]'`):

    load_diffusers(folder)       a diffusers pipeline folder (model_index.json: unet/, or DiTPipeline's transformer/)
                                 as a difflab Pipeline; difflab.load(folder) calls it for such a folder
    export_diffusers(run, out)   a difflab DDPM U-Net as a diffusers DDPMPipeline folder, where the architecture maps
    load_autoencoder(folder)     a diffusers AutoencoderKL as difflab's Autoencoder (encode/decode scaled latents)
    scheduler_sigmas(sched, ...) a diffusers scheduler's timesteps as a difflab sampling grid

ONNX (`pip install 'difflab[onnx]'`):

    export_onnx(run, out.onnx)   the whole denoiser D(x, sigma[, cond]) as an ONNX file (quantize="int8": dynamic,
                                 the linear layers; "int8-static": the convolutions, calibrated on the model's samples)
    load_onnx_denoiser(pipe, f)  that file, checked to be the pipeline's model, as an onnxruntime-backed Denoiser
    calibration_feeds(pipe)      the denoiser's inputs along the model's own sampling trajectories (fixed seeds)

Importing this package does not import diffusers or onnx; each function does, and a missing extra is a one-line
DifflabError.
"""

from __future__ import annotations

from typing import Any

_MODULES = {
    "diffusers_folder": ("load_diffusers", "is_diffusers_folder", "load_autoencoder"),
    "diffusers_export": ("export_diffusers", "export_refusal"),
    "diffusers_schedule": ("scheduler_sigmas", "SchedulerSpec", "DiffusersDDPM"),
    "diffusers_models": ("DiffusersUNet", "DiffusersDiT", "DiffusersAutoencoder", "DiffusersTextEncoder"),
    "onnx_export": ("export_onnx", "quantize_onnx", "quantize_onnx_static"),
    "onnx_runtime": ("OnnxDenoiser", "load_onnx_denoiser", "calibration_feeds"),
}
_EXPORTS = {name: module for module, names in _MODULES.items() for name in names}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'difflab.interop' has no attribute '{name}'")
    import importlib

    return getattr(importlib.import_module(f"difflab.interop.{_EXPORTS[name]}"), name)
