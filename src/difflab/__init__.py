"""difflab: diffusion and Poisson-flow generative models, one sigma-space denoiser interface."""

__version__ = "0.1.0"
