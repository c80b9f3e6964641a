"""`difflab distill`: a trained model into a few-step student. Progressive distillation (Salimans & Ho 2022) halves
the teacher's DDIM steps each round (OUT/steps_N per round); consistency distillation (Song et al. 2023) makes a
one-step consistency model of an EDM teacher (OUT)."""

from __future__ import annotations

import argparse

from difflab.cli.common import add_runtime_arguments, setup_runtime


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, metavar="RUN", help="the trained model's run folder (difflab train)")
    p.add_argument("--method", choices=("progressive", "consistency"), default="progressive")
    p.add_argument("--out", required=True, help="progressive: a folder of students OUT/steps_N; consistency: the run")
    p.add_argument("--steps", type=int, default=1000, help="training steps (per round for progressive)")
    p.add_argument("--batch-size", type=int, help="default: the teacher's")
    p.add_argument("--lr", type=float, help="default: the teacher's")
    p.add_argument("--lr-schedule", help="constant, cosine or linear (progressive: default linear decay to 0 in each "
                   "round, no warm-up; consistency: the teacher's)")  # fmt: skip
    prog = p.add_argument_group("progressive distillation")
    prog.add_argument("--rounds", type=int, default=1, help="halvings of the step count (e.g. 8: 256 -> 1)")
    prog.add_argument(
        "--teacher-steps",
        type=int,
        help="the teacher's DDIM steps on the trailing grid (default 256; a student: its own)",
    )
    cons = p.add_argument_group("consistency distillation")
    cons.add_argument("--levels", type=int, help="N Karras levels between which f is made consistent (default 18)")
    cons.add_argument("--target-ema", type=float, help="decay mu of the target network (default 0.95)")
    cons.add_argument("--distance", choices=("l2", "pseudo_huber"), help="default l2")
    p.add_argument("--no-progress", action="store_true")
    add_runtime_arguments(p)


def run(args: argparse.Namespace) -> int:
    from difflab.distill.run import distill

    device = setup_runtime(args)
    students = distill(args.teacher, args.out, method=args.method, rounds=args.rounds, teacher_steps=args.teacher_steps,
                       steps=args.steps, batch_size=args.batch_size, lr=args.lr, lr_schedule=args.lr_schedule,
                       levels=args.levels, target_ema=args.target_ema, distance=args.distance, device=device,
                       progress=not args.no_progress)  # fmt: skip
    for path in students:
        print(f"student: {path}")
    print(f"sample with: difflab sample --ckpt {students[-1]} --n 16 --out samples.png (its own sampler and steps)")
    return 0
