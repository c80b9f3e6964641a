"""difflab: diffusion and Poisson-flow generative models, one sigma-space denoiser interface.

    import difflab
    pipe = difflab.load("runs/digits")                        # a run folder or a checkpoint folder
    images = pipe.sample(16, sampler="dpmpp_2m", steps=20, seed=0)
    run = difflab.train(difflab.run_config(difflab.load_dataset("moons"), process="edm", steps=2000), "runs/moons")
    unclip = difflab.load_unclip("runs/decoder", "runs/prior")  # DALL-E 2: .sample, .variations, .interpolate

Names are imported on first use, so `import difflab` (and `difflab --help`) stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

_EXPORTS = {
    "load": "difflab.pipeline",
    "Pipeline": "difflab.pipeline",
    "train": "difflab.training.run",
    "run_config": "difflab.training.run",
    "RunConfig": "difflab.config",
    "load_dataset": "difflab.data",
    "Guidance": "difflab.guidance.compose",
    "generate": "difflab.generate",
    "FORMULATIONS": "difflab.formulations",
    "SAMPLERS": "difflab.sampling",
    "DifflabError": "difflab.errors",
    "tune_grid": "difflab.tuned_grid",
    "load_unclip": "difflab.unclip.pipeline",
    "UnclipPipeline": "difflab.unclip.pipeline",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'difflab' has no attribute '{name}'")
