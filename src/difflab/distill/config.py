"""The distillation part of a RunConfig: which teacher a student was distilled from (Salimans & Ho 2022; Song et al.
2023) and how the student samples (its own step count)."""

from __future__ import annotations

from dataclasses import dataclass

from difflab.errors import DifflabError

METHODS = ("progressive", "consistency")


@dataclass(frozen=True)
class DistillConfig:
    """`method`: progressive (a student that takes half its teacher's DDIM steps) or consistency (a consistency model
    distilled from an EDM teacher's ODE); `teacher`: the teacher's checkpoint folder (absolute), `teacher_hash`: the
    first 10 hex digits of its weights' SHA-256, checked whenever the teacher is loaded again; `sampler`, `steps`
    and `grid`: what the student samples with by default (`Pipeline.sampling_defaults`)."""

    method: str
    teacher: str
    teacher_hash: str
    steps: int
    sampler: str
    grid: str = "trailing"

    def __post_init__(self):
        if self.method not in METHODS:
            raise DifflabError(f"unknown distillation method '{self.method}': choose {' or '.join(METHODS)}")
        if not 1 <= self.steps <= 100_000:
            raise DifflabError(f"a student's step count must lie in 1..100000, got {self.steps}")

    def sampling_defaults(self) -> dict[str, object]:
        """The student's own sampler, step count and grid (`Pipeline.sampling_defaults`)."""
        return {"sampler": self.sampler, "steps": self.steps, "grid": self.grid}
