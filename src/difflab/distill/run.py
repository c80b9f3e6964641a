"""Distilling a trained model into a few-step student (`difflab distill`): progressive distillation halves the
teacher's DDIM steps round after round (Salimans & Ho 2022), each round's student a run folder of its own;
consistency distillation (Song et al. 2023) turns an EDM teacher into a one-step consistency model. A student is an
ordinary run whose config records its teacher (`RunConfig.distill`): the shared trainer trains it, and
`difflab train --resume --out STUDENT` continues it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from difflab.config import RunConfig
from difflab.distill.config import DistillConfig
from difflab.errors import DifflabError


def teacher_checkpoint(teacher: str | Path) -> tuple[Path, RunConfig, str]:
    """The teacher's checkpoint folder, config and weights hash; a model that cannot teach is refused in one line."""
    from difflab.formulations import make_formulation
    from difflab.loading import load
    from difflab.training.checkpoint import load_config, resolve_checkpoint

    ckpt = resolve_checkpoint(teacher, "pass the teacher's run folder (difflab train)")
    config = load_config(ckpt)
    formulation = make_formulation(config.formulation)
    if formulation.sampler_family != "diffusion" or not formulation.kernel.is_gaussian:
        raise DifflabError(f"'{teacher}' is a {config.process} model; a teacher must be a Gaussian diffusion model "
                           "(ddpm, vp, subvp, ve or edm)")  # fmt: skip
    if any(part is not None for part in (config.upsampler, config.inpainting, config.latent, config.unclip)):
        raise DifflabError(f"'{teacher}' is an upsampler, inpainting, latent or unCLIP model; distillation takes a "
                           "plain image or toy model for now")  # fmt: skip
    return ckpt.resolve(), config, load(ckpt).weights_hash()


def student_config(teacher: RunConfig, ckpt: Path, digest: str, distill: dict, formulation=None, **train) -> RunConfig:
    """The teacher's data, network and conditioning, its weights as the start (train.init_from), `distill`'s record
    and the student's own training budget."""
    settings = {k: v for k, v in train.items() if v is not None}
    train_config = replace(teacher.train, minutes=None, preview_every=None, init_from=str(ckpt), **settings)
    return replace(teacher, formulation=formulation or teacher.formulation, train=train_config,
                   distill=DistillConfig(teacher=str(ckpt), teacher_hash=digest, **distill))  # fmt: skip


def distill(
    teacher: str | Path,
    out: str | Path,
    *,
    method: str = "progressive",
    rounds: int = 1,
    teacher_steps: int | None = None,
    steps: int = 1000,
    batch_size: int | None = None,
    lr: float | None = None,
    lr_schedule: str | None = None,
    levels: int | None = None,
    target_ema: float | None = None,
    distance: str | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> list[Path]:
    """Distil `teacher` (a run folder) and return the students' run folders.

    progressive: `rounds` rounds of `steps` training steps each; round r's student samples with ddim in
    teacher_steps / 2^r steps on the trailing grid, in OUT/steps_N (teacher_steps: the teacher's own count if it is a
    student itself, else 256), each round without warm-up and with its learning rate falling linearly to 0 unless
    `lr_schedule` says otherwise (the paper's configurations anneal it within each halving). consistency: one run of
    `steps` steps in OUT, a `cd` model with N = `levels` Karras levels and target EMA `target_ema` (an EDM teacher
    only; the teacher's learning-rate schedule unless `lr_schedule`)."""
    from difflab.training.run import train_run

    ckpt, config, digest = teacher_checkpoint(teacher)
    train = {"steps": steps, "batch_size": batch_size, "lr": lr, "lr_schedule": lr_schedule}
    if method == "consistency":
        if rounds != 1 or teacher_steps is not None:
            raise DifflabError("--rounds and --teacher-steps are settings of --method progressive")
        student = student_config(config, ckpt, digest, {"method": method, "steps": 1, "sampler": "consistency"},
                                 consistency_formulation(config, levels, target_ema, distance), **train)  # fmt: skip
        return [train_run(student, out, device=device, progress=progress).run_dir]  # a stop signal: resume it
    if method != "progressive":
        raise DifflabError(f"unknown --method '{method}': choose progressive or consistency")
    if any(v is not None for v in (levels, target_ema, distance)):
        raise DifflabError("--levels, --target-ema and --distance are settings of --method consistency")
    students, n = [], check_rounds(config, rounds, teacher_steps)
    train |= {"lr_schedule": lr_schedule or "linear", "warmup_steps": 0}
    for _ in range(rounds):
        n //= 2
        student = student_config(config, ckpt, digest, {"method": method, "steps": n, "sampler": "ddim"}, **train)
        outcome = train_run(student, Path(out) / f"steps_{n}", device=device, progress=progress)
        students.append(outcome.run_dir)
        if outcome.stopped_by == "signal":  # pre-empted: the round resumes with difflab train --resume
            break
        ckpt, config, digest = teacher_checkpoint(outcome.run_dir)
    return students


def check_rounds(teacher: RunConfig, rounds: int, teacher_steps: int | None) -> int:
    """The teacher's step count; it must halve `rounds` times into whole steps."""
    own = teacher.distill.steps if teacher.distill is not None and teacher.distill.method == "progressive" else None
    if own is not None and teacher_steps not in (None, own):
        raise DifflabError(f"the teacher is a distilled student that samples in {own} steps; drop --teacher-steps")
    n = teacher_steps or own or 256
    if not 1 <= rounds <= 16 or n % 2**rounds:
        raise DifflabError(f"--rounds {rounds} must halve the teacher's {n} steps into whole steps (n divisible by "
                           f"2^rounds, 1 <= rounds <= 16)")  # fmt: skip
    return n


def consistency_formulation(teacher: RunConfig, levels: int | None, target_ema: float | None, distance: str | None):
    """A `cd` formulation on the EDM teacher's noise range and sigma_data."""
    from difflab.formulations import CDConfig, EDMConfig

    if type(teacher.formulation) is not EDMConfig:
        raise DifflabError(f"consistency distillation needs an EDM teacher (difflab train --process edm), not "
                           f"{teacher.process}")  # fmt: skip
    f = teacher.formulation
    settings = {"levels": levels, "target_ema": target_ema, "distance": distance}
    return CDConfig(sigma_min=f.sigma_min, sigma_max=f.sigma_max, sigma_data=f.sigma_data,
                    **{k: v for k, v in settings.items() if v is not None})  # fmt: skip
