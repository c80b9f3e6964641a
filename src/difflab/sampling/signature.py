"""How a sampler's options are read: from the keyword-only parameters of its function, parsed from the module's source
(`ast`, so nothing is imported), with the help texts shared by every sampler that takes an option (OPTION_HELP)."""

from __future__ import annotations

import ast
import importlib.util
import inspect
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

from difflab.errors import flag

# Keyword parameters of a sampler that are not user options: what `generate` passes itself (cond, noise,
# callback) and rk45's `info`, a dict it fills with its evaluation count.
NOT_OPTIONS = frozenset({"cond", "noise", "callback", "info"})

# One short line per option name, shared by every sampler that takes it; where the default is None, what None means.
OPTION_HELP: dict[str, str] = {
    "variance": "DDPM step variance: small (beta-tilde), large (beta), learned; default learned if the model has it, "
    "else small",
    "eta": "ancestral noise: 0 deterministic, 1 = DDPM (the reverse SDE)",
    "log_sigma": "step in log sigma (PFGM's log z) instead of sigma",
    "s_churn": "churn (Karras et al. 2022, Alg. 2): noise added per step; 0 = deterministic",
    "s_tmin": "lowest sigma that gets churn",
    "s_tmax": "highest sigma that gets churn",
    "s_noise": "scale of the added noise (1 = as derived)",
    "order": "multistep order: how many past evaluations each step uses (unipc: its predictor's; the corrector adds 1)",
    "rtol": "relative tolerance of the adaptive step size",
    "atol": "absolute tolerance of the adaptive step size",
    "max_nfe": "stop with an error after this many network evaluations (a diverging sample, too tight tolerances)",
    "snr": "Langevin corrector signal-to-noise ratio",
    "corrector_steps": "Langevin corrector steps per noise level (0 = predictor only)",
    "norm_scope": "corrector step: sigma (2 (snr sigma)^2), sample (per-sample norms) or batch (score_sde; couples "
    "the batch)",
    "step_size": "Langevin step size at the smallest sigma (default 0.2 sigma_min^2, NCSN's relative step)",
    "n_steps_each": "Langevin steps per noise level",
    "denoise_last": "end with one denoising step at the smallest sigma (Jolicoeur-Martineau et al. 2021)",
}

OPTION_TYPES = (bool, int, float, str)


def format_default(value: Any) -> str:
    """A default as a user reads it: 1e-05, inf, on/off, small; None (computed by the sampler) as "auto"."""
    if value is None:
        return "auto"
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class SamplerOption:
    """One keyword option of a sampler: its name, type (bool, int, float or str), default and a one-line help."""

    name: str
    type: type
    default: Any
    help: str

    @property
    def flag(self) -> str:
        """The command-line spelling: --s-churn for s_churn."""
        return flag(self.name)


_TYPES = {"bool": bool, "int": int, "float": float, "str": str}


def _option_type(where: str, name: str, annotation: ast.expr | None) -> type:
    """bool, int, float or str from an annotation like `float` or `float | None`; a TypeError for anything else."""
    text = ast.unparse(annotation) if annotation is not None else ""
    kinds = [t.strip() for t in text.split("|") if t.strip() != "None"]
    if len(kinds) != 1 or kinds[0] not in _TYPES:
        raise TypeError(f"{where}: option '{name}' must be annotated as one of bool, int, float, str, got {text!r}")
    return _TYPES[kinds[0]]


def _default(where: str, name: str, node: ast.expr) -> Any:
    """A default written as a literal, or as float("inf")."""
    if isinstance(node, ast.Call) and ast.unparse(node.func) == "float" and len(node.args) == 1:
        return float(ast.literal_eval(node.args[0]))
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise TypeError(f"{where}: option '{name}' needs a literal default, got {ast.unparse(node)}") from None


Target = str | Callable  # "module:function" (module relative to difflab.sampling, or absolute), or the function


def _module_and_function(target: str) -> tuple[str, str]:
    module, _, function = target.partition(":")
    return (module if "." in module else f"difflab.sampling.{module}"), function


@cache
def _function_def(target: Target) -> ast.FunctionDef:
    """The function's definition, parsed from its source (the module file for a name: nothing is imported)."""
    if callable(target):
        source, function = textwrap.dedent(inspect.getsource(target)), target.__name__
    else:
        module, function = _module_and_function(target)
        with open(importlib.util.find_spec(module).origin, encoding="utf-8") as f:
            source = f.read()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef) and node.name == function:
            return node
    raise TypeError(f"{target}: no such function")


def options_from_signature(target: Target) -> tuple[SamplerOption, ...]:
    """The options of sampler `target`: its keyword-only parameters except NOT_OPTIONS, in signature order, each
    with the signature's default, the annotated type and OPTION_HELP's text ("" where it has none); read from the
    source, so a registered name's module is not imported."""
    node = _function_def(target)
    target = node.name
    options = []
    for arg, default in zip(node.args.kwonlyargs, node.args.kw_defaults, strict=True):
        if arg.arg in NOT_OPTIONS:
            continue
        if default is None:
            raise TypeError(f"{target}: option '{arg.arg}' needs a default")
        kind = _option_type(target, arg.arg, arg.annotation)
        options.append(SamplerOption(arg.arg, kind, _default(target, arg.arg, default), OPTION_HELP.get(arg.arg, "")))
    return tuple(options)
