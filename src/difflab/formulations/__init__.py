"""Formulations by name: the one place where a process name is looked up. A formulation (ddpm, vp, subvp, ve, edm,
pfgmpp, pfgm; the consistency models ct and cd) turns a network into a sigma-space denoiser and owns its loss, prior
kernel, sigma range, default grid and admissible samplers. Adding one = a module + a row here + tests."""

from __future__ import annotations

import dataclasses
from typing import Any

from difflab.errors import DifflabError, flag
from difflab.formulations.base import DataInfo, Formulation
from difflab.formulations.consistency import CDConfig, ConsistencyDistillation, ConsistencyTraining, CTConfig
from difflab.formulations.ddpm import DDPM, DDPMConfig
from difflab.formulations.edm import EDM, PFGMPP, EDMConfig, PFGMPPConfig
from difflab.formulations.pfgm import PFGM
from difflab.formulations.score_sde import VE, VP, SubVP, SubVPConfig, VEConfig, VPConfig
from difflab.pfgm import PFGMConfig

FORMULATIONS: dict[str, type[Formulation]] = {
    f.name: f for f in (DDPM, VP, SubVP, VE, EDM, PFGMPP, PFGM, ConsistencyTraining, ConsistencyDistillation)
}


def formulation_class(name: str) -> type[Formulation]:
    if name not in FORMULATIONS:
        raise DifflabError(f"unknown process '{name}': choose one of {', '.join(FORMULATIONS)}")
    return FORMULATIONS[name]


def name_of_config(config: Any) -> str:
    """The registered name of a formulation config object."""
    for name, cls in FORMULATIONS.items():
        if type(config) is cls.Config:
            return name
    raise TypeError(f"{type(config).__name__} is not a registered formulation config")


def make_formulation(config: Any) -> Formulation:
    """The formulation object of a config dataclass (DDPMConfig, EDMConfig, ...)."""
    return FORMULATIONS[name_of_config(config)](config)


def make_config(name: str, data: DataInfo | None = None, **settings: Any) -> Any:
    """The config of formulation `name` from user settings (None = default); a setting it does not have is a
    one-line error naming the flag."""
    cls = formulation_class(name)
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    foreign = sorted(k for k, v in settings.items() if v is not None and k not in fields)
    if foreign:
        flags = ", ".join(flag(k) for k in foreign)
        raise DifflabError(f"process '{name}' does not take {flags}")
    return cls.make_config(data, **settings)


def config_to_dict(config: Any) -> dict[str, Any]:
    return {"name": name_of_config(config), **dataclasses.asdict(config)}


def config_from_dict(values: dict[str, Any]) -> Any:
    """A formulation config from its config_to_dict() form; a missing, unknown or mistyped key is a ValueError
    naming it (formulation.KEY)."""
    from difflab.config import dataclass_from_dict, read_value

    if not isinstance(values, dict) or "name" not in values:
        raise ValueError(f"formulation.name is missing ({', '.join(FORMULATIONS)})")
    values = dict(values)
    cls = formulation_class(read_value(str, values.pop("name"), "formulation.name"))
    return dataclass_from_dict(cls.Config, values, "formulation")


__all__ = [
    "FORMULATIONS", "CDConfig", "CTConfig", "DDPMConfig", "DataInfo", "EDMConfig", "Formulation", "PFGMConfig",
    "PFGMPPConfig", "SubVPConfig", "VEConfig", "VPConfig", "make_config", "make_formulation",
]  # fmt: skip
