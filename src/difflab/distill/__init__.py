"""Distillation into few-step students: progressive distillation and consistency distillation (`distill`, imported
on first use), the students' losses (`difflab.distill.losses`) and the record a student keeps of its teacher
(`DistillConfig`, which the run config imports)."""

from typing import Any

from difflab.distill.config import DistillConfig


def __getattr__(name: str) -> Any:
    if name == "distill":
        from difflab.distill.run import distill

        return distill
    raise AttributeError(f"module 'difflab.distill' has no attribute '{name}'")


__all__ = ["DistillConfig", "distill"]
