"""Names users know from other tools: AUTOMATIC1111's sampler labels (some imply a grid: "DPM++ 2M Karras"), diffusers'
scheduler classes and k-diffusion's sampler functions, plus the noise-level grid names and their aliases. Lookups
ignore case and repeated spaces. This module holds only the tables; `difflab.sampling` resolves them to specs."""

from __future__ import annotations

from difflab.errors import DifflabError

GRID_NAMES = ("respaced", "karras", "uniform_t", "log_snr", "trailing", "tuned")  # tuned: difflab.tuned_grid
# grid alias -> canonical grid. k-diffusion's get_sigmas_exponential (A1111's and ComfyUI's "exponential") is uniform
# in log sigma, i.e. in log-SNR = -2 log sigma; A1111's "Uniform" schedule is uniform in the timestep t.
GRID_ALIASES = {"exponential": "log_snr", "uniform": "uniform_t"}

# alias -> (canonical sampler, implied grid or None for the model's default grid)
SAMPLER_ALIASES: dict[str, tuple[str, str | None]] = {
    # AUTOMATIC1111 labels (modules/sd_samplers_kdiffusion.py, sd_samplers_timesteps.py); A1111 has no "Euler
    # Karras" or "Heun Karras". Since v1.8 A1111 picks the schedule separately ("Schedule type").
    "Euler": ("euler", None),
    "Euler a": ("euler_ancestral", None),
    "Heun": ("heun", None),
    "LMS": ("lms", None),
    "LMS Karras": ("lms", "karras"),
    "DPM++ 2M": ("dpmpp_2m", None),
    "DPM++ 2M Karras": ("dpmpp_2m", "karras"),
    "DPM++ 2M SDE": ("dpmpp_2m_sde", None),
    "DPM++ 2M SDE Karras": ("dpmpp_2m_sde", "karras"),
    "DPM++ 2M SDE Exponential": ("dpmpp_2m_sde", "log_snr"),
    "DDIM": ("ddim", None),
    # A1111's UniPC (modules/sd_samplers_timesteps.py; its settings default to variant bh1 and order 3, which differ
    # from difflab's bh2 only where one coefficient is left (rho = 1/2); pass --order 3 for its order)
    "UniPC": ("unipc", None),
    # A1111's short aliases of the same samplers (its API accepts them too)
    "k_euler": ("euler", None),
    "k_euler_a": ("euler_ancestral", None),
    "k_euler_ancestral": ("euler_ancestral", None),
    "k_heun": ("heun", None),
    "k_lms": ("lms", None),
    "k_lms_ka": ("lms", "karras"),
    "k_dpmpp_2m": ("dpmpp_2m", None),
    "k_dpmpp_2m_ka": ("dpmpp_2m", "karras"),
    "k_dpmpp_2m_sde": ("dpmpp_2m_sde", None),
    "k_dpmpp_2m_sde_ka": ("dpmpp_2m_sde", "karras"),
    "k_dpmpp_2m_sde_exp": ("dpmpp_2m_sde", "log_snr"),
    # diffusers scheduler classes (their own options, e.g. use_karras_sigmas, are not translated)
    "DDPMScheduler": ("ddpm", None),
    "DDIMScheduler": ("ddim", None),
    "EulerDiscreteScheduler": ("euler", None),
    "EulerAncestralDiscreteScheduler": ("euler_ancestral", None),
    "HeunDiscreteScheduler": ("heun", None),
    "LMSDiscreteScheduler": ("lms", None),
    "DPMSolverMultistepScheduler": ("dpmpp_2m", None),  # its default solver_order 2 (order 3 has no name)
    "UniPCMultistepScheduler": ("unipc", None),  # its defaults: bh2, solver_order 2
    "ScoreSdeVeScheduler": ("pc", None),
    # k-diffusion sampler functions (k_diffusion.sampling)
    "sample_euler": ("euler", None),
    "sample_euler_ancestral": ("euler_ancestral", None),
    "sample_heun": ("heun", None),
    "sample_lms": ("lms", None),
    "sample_dpmpp_2m": ("dpmpp_2m", None),
    "sample_dpmpp_2m_sde": ("dpmpp_2m_sde", None),
}


def normalize_name(name: str) -> str:
    """The lookup key of a sampler or grid name: case-folded, runs of white space as one space, ends stripped."""
    return " ".join(str(name).split()).casefold()


_SAMPLER_ALIAS_KEYS = {normalize_name(alias): target for alias, target in SAMPLER_ALIASES.items()}
_GRID_KEYS = {normalize_name(g): g for g in GRID_NAMES} | {normalize_name(a): g for a, g in GRID_ALIASES.items()}


def lookup_sampler_alias(name: str) -> tuple[str, str | None] | None:
    """(canonical sampler, implied grid or None) for an alias of another tool, None if `name` is no alias."""
    return _SAMPLER_ALIAS_KEYS.get(normalize_name(name))


def is_tuned_grid(grid: object) -> bool:
    """Whether `grid` names the levels `difflab tune-grid` stored with a checkpoint ("tuned", any case or spacing)."""
    return isinstance(grid, str) and normalize_name(grid) == "tuned"


def resolve_grid(name: str) -> str:
    """The canonical grid (one of GRID_NAMES) called `name` or one of its aliases, case-insensitive: "Karras" ->
    karras, "exponential" -> log_snr (uniform in log sigma), "uniform" -> uniform_t. A DifflabError otherwise."""
    grid = _GRID_KEYS.get(normalize_name(name))
    if grid is None:
        aliases = ", ".join(f"{a} (= {g})" for a, g in GRID_ALIASES.items())
        raise DifflabError(f"unknown grid '{name}': choose one of {', '.join(GRID_NAMES)}, or an alias: {aliases}")
    return grid
