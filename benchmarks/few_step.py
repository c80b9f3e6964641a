"""Few-step generation on the digits (issue 15): progressive distillation, consistency distillation and consistency
training against the best solver at the same NFE, with their extra training cost.

    python benchmarks/few_step.py --out runs/few_step                # ~1.5-2 h on one busy CPU core
    python benchmarks/few_step.py --out runs/few_step --steps 500    # a smoke test (poor figures)
    python benchmarks/few_step.py --out runs/few_step --phase pd-edm --round-steps 1000  # PD of the EDM teacher
    ... --phase pd-edm --round-steps 1000 --pd-lr-schedule constant     # PD as it was before the linear decay
    ... --phase pd-late --round-steps 2500     # then 8 -> 4 -> 2 steps again from pd-edm's 8-step student, longer
    ... --phase pd-late --late-rounds 1 --round-steps 5000 --late-name r5000   # 8 -> 4 only, into pd_edm_linear_r5000
    ... --phase pd-edm --round-steps 1000 --pd-teacher-steps 256  # from 256 steps: pd_edm_linear_from256
    ... --phase pd-late --late-from pd_edm_linear_from256 --late-rounds 1 --round-steps 10000 --late-name r10000
    python benchmarks/few_step.py --out runs/few_step --phase tuned-solvers  # solvers on grids tuned on the teacher

Teachers at the demo's budget (tiny U-Net, 8x8 digits, `--steps`, default 4000): a DDPM with v-prediction (progressive
distillation needs x- or v-prediction: an eps student cannot predict x0 at sigma_max in one step, Salimans & Ho 2022,
Sec. 4) and an EDM model (the consistency distillation teacher). Students: progressive distillation from 64 DDIM steps
on the trailing grid, 6 rounds (32, 16, ..., 1 steps) of `--round-steps` each; consistency distillation (`--cd-steps`,
target EMA 0.95, L2); consistency training from scratch at the teacher's budget (`--steps`). Each is scored with the
digits classifier's Frechet distance (FD) and the share of confident (p >= 0.9) samples, averaged over `--seed-sets`
disjoint sets of `--n` samples (FD of 500 digits moves by several units from one seed set to another, as much as the
differences the goals ask about), each set against its own draw of as many training digits (the floor), at NFE 1, 2,
4, 8 (CD and CT also at the levels `benchmarks/consistency_sigmas.py` tuned, with `--tuned-levels`), beside the
best solver of the teachers at the same NFE (every deterministic sampler of the registry, the model's default grid
and the trailing grid), DDIM at 50 NFE, and the real-vs-real floor. Training cost
is the wall time of each run's own log (one thread), as a multiple of its teacher's.

Writes OUT (the runs; a finished run is reused) and benchmarks/results/few_step.{md,json}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.stats import sem

import difflab
from difflab.distill.run import distill
from difflab.eval.quality import digits_quality_over_seed_sets
from difflab.sampling import SAMPLERS
from difflab.training.checkpoint import latest_checkpoint
from difflab.training.trainer import read_log

NFES = (1, 2, 4, 8)
PD_TEACHER_STEPS, PD_ROUNDS = 64, 6
PD_SCORED_STEPS = 32  # pd-edm scores no student of more steps (each would cost more to score than Euler 50)
RESULTS = Path(__file__).parent / "results"
TEACHER_ROW = "euler 50 (EDM teacher)"  # the reference every few-step row is paired with (= DDIM 50 on this model)


def train_once(out: Path, **settings) -> Path:
    if latest_checkpoint(out) is None:
        data = difflab.load_dataset("digits")
        difflab.train(difflab.run_config(data, model="tiny", seed=0, **settings), out, progress=False)
    return out


def training_seconds(run: Path) -> float:
    return read_log(run)[-1]["elapsed_s"]


def score(pipe, n: int, seed_sets: int = 1, **kwargs) -> dict:
    """FD, floor and conf90 of n samples, averaged over `seed_sets` disjoint seed sets
    (`digits_quality_over_seed_sets`); fd_se is the standard error of the mean FD over the sets."""
    stats: dict = {}
    q = digits_quality_over_seed_sets(lambda seed: pipe.sample(n, seed=seed, batch_size=500, stats=stats, **kwargs),
                                      seed_sets)  # fmt: skip
    return {"fd": q["frechet"], "fd_se": q["frechet_se"], "floor": q["frechet_floor"],
            "fds": [r["frechet"] for r in q["per_set"]], "conf90": q["confident_share"],
            "nfe": stats["nfe"]}  # fmt: skip


def teacher_reference(pipe, n: int, seed_sets: int) -> dict:
    """The EDM teacher's Euler 50 row (TEACHER_ROW), scored over the seed sets that its students are paired on."""
    return score(pipe, n, seed_sets, sampler="euler", steps=50)


def best_solver(pipe, nfe: int, n: int, seed_sets: int = 1) -> dict:
    """The lowest FD over the deterministic diffusion samplers whose cost fits `nfe`, on the default and trailing
    grids."""
    best = None
    for spec in SAMPLERS.values():
        if spec.family != "diffusion" or spec.cost is None or not spec.deterministic() or spec.nfe(1) > nfe:
            continue
        steps = spec.steps_for_nfe(nfe)
        for grid in (None, "trailing"):
            result = score(pipe, n, seed_sets, sampler=spec.name, steps=steps, grid=grid) | {
                "sampler": spec.name,
                "grid": grid or "default",
            }
            print(f"  {spec.name:<12} nfe {nfe} grid {grid or 'default':<9} FD {result['fd']:.3f}", flush=True)
            if best is None or result["fd"] < best["fd"]:
                best = result
    return best


def tuned_solvers(edm: Path, n: int, seed_sets: int, tune_n: int = 128, tune_seed: int = 1_000_000) -> None:
    """The best solver again, on grids tuned on the EDM teacher's own ODE (`difflab.tune_grid`, on seeds far from the
    scoring sets): every deterministic fixed-step sampler at each NFE of 2 or more whose step count is at least 2,
    scored over the seed sets and paired with the teacher's Euler 50: benchmarks/results/few_step_tuned_solvers.json."""
    pipe = difflab.load(edm)
    teacher = teacher_reference(pipe, n, seed_sets)
    rows = {TEACHER_ROW: teacher}
    for nfe in NFES:
        for spec in SAMPLERS.values():
            if spec.family != "diffusion" or spec.cost is None or not spec.deterministic() or spec.nfe(1) > nfe:
                continue
            steps = spec.steps_for_nfe(nfe)
            if steps < 2 or spec.name == "ddim":  # (ddim is euler on a sigma-space model)
                continue
            tuned = difflab.tune_grid(pipe, spec.name, steps, n=tune_n, check_n=0, seed=tune_seed, save=False)
            r = score(pipe, n, seed_sets, sampler=spec.name, grid=tuned.sigmas[:-1])
            rows[f"{spec.name}, {nfe} NFE, tuned"] = r | paired(r, teacher) | {
                "levels": tuned.sigmas, "endpoint": [tuned.start_error, tuned.error], "start_grid": tuned.start_grid,
            }  # fmt: skip
            print(f"{spec.name} {nfe} NFE tuned: FD {r['fd']:.2f} +- {r['fd_se']:.2f} (endpoint {tuned.start_error:.3f}"
                  f" -> {tuned.error:.3f})", flush=True)  # fmt: skip
    (RESULTS / "few_step_tuned_solvers.json").write_text(json.dumps({"rows": rows}, indent=2, default=float))


def paired(row: dict, teacher: dict) -> dict:
    """The mean and standard error of a row's FD minus the teacher's, seed set by seed set (the same seeds)."""
    if len(row["fds"]) != len(teacher["fds"]):
        raise ValueError(f"cannot pair {len(row['fds'])} seed sets with the teacher's {len(teacher['fds'])}: score "
                         "both over the same --seed-sets")  # fmt: skip
    diff = np.subtract(row["fds"], teacher["fds"])
    return {"paired_diff": float(diff.mean()), "paired_diff_se": float(sem(diff))}


def student_rows(runs: list[Path], teacher: dict, n: int, seed_sets: int) -> dict:
    """Each student at its own sampler and steps, scored over the seed sets and paired with the teacher's row."""
    rows = {}
    for run in runs:
        r = score(difflab.load(run), n, seed_sets)
        rows[run.name] = r | paired(r, teacher)
        print(f"{run.name}: FD {r['fd']:.2f} +- {r['fd_se']:.2f}, paired {rows[run.name]['paired_diff']:+.2f}",
              flush=True)  # fmt: skip
    return rows


def pd_edm_name(lr_schedule: str, teacher_steps: int) -> str:
    """pd-edm's folder and results name: pd_edm_{lr_schedule}, with _from{N} when the chain starts elsewhere than 64."""
    return f"pd_edm_{lr_schedule}" + ("" if teacher_steps == PD_TEACHER_STEPS else f"_from{teacher_steps}")


def progressive_from_edm(edm: Path, out: Path, round_steps: int, n: int, seed_sets: int, lr_schedule: str,
                         teacher_steps: int = PD_TEACHER_STEPS) -> None:  # fmt: skip
    """Progressive distillation of the EDM teacher (the consistency models' teacher, so that the two methods are
    compared on one model): 6 rounds from `teacher_steps` trailing DDIM steps at the learning-rate schedule
    `lr_schedule` in each round, each student of at most PD_SCORED_STEPS steps scored over the seed sets, paired with
    the teacher's Euler 50 on the same seeds (the students start from the teacher's noise):
    benchmarks/results/few_step_{pd_edm_name}.json."""
    counts = [teacher_steps >> r for r in range(1, PD_ROUNDS + 1)]
    runs = [out / f"steps_{count}" for count in counts]
    if latest_checkpoint(runs[-1]) is None:
        distill(edm, out, rounds=PD_ROUNDS, teacher_steps=teacher_steps, steps=round_steps, lr_schedule=lr_schedule,
                progress=False)  # fmt: skip
    teacher = teacher_reference(difflab.load(edm), n, seed_sets)
    rows = {TEACHER_ROW: teacher}
    scored = [run for run, count in zip(runs, counts, strict=True) if count <= PD_SCORED_STEPS]
    rows |= student_rows(scored, teacher, n, seed_sets)
    cost = sum(training_seconds(run) for run in runs) / training_seconds(edm)
    result = {"lr_schedule": lr_schedule, "teacher_steps": teacher_steps, "round_steps": round_steps, "rows": rows,
              "cost": cost}  # fmt: skip
    (RESULTS / f"few_step_{out.name}.json").write_text(json.dumps(result, indent=2))


def longer_last_rounds(out: Path, chain: str, name: str, rounds: int, steps: int, lr: float | None, n: int,
                       seed_sets: int) -> None:  # fmt: skip
    """Progressive distillation's last `rounds` rounds again, `steps` each at base learning rate `lr` (None: the
    teacher's), from the 8-step student of the pd-edm chain `chain` (e.g. pd_edm_linear): OUT/{chain}_{name}/steps_N,
    scored over the same seed sets, paired with the teacher's Euler 50 of few_step_{chain}.json:
    benchmarks/results/few_step_{chain}_{name}.json."""
    start = Path(chain) / "steps_8"
    runs = distill(out / start, out / f"{chain}_{name}", rounds=rounds, steps=steps, lr=lr, progress=False)
    teacher = json.loads((RESULTS / f"few_step_{chain}.json").read_text())["rows"][TEACHER_ROW]
    rows = student_rows(runs, teacher, n, seed_sets)
    result = {"from": start.as_posix(), "round_steps": steps, "lr": lr, "rows": rows}
    (RESULTS / f"few_step_{chain}_{name}.json").write_text(json.dumps(result, indent=2))


def teacher_steps_rows(edm: Path, n: int, seed_sets: int, counts: tuple[int, ...] = (64, 256)) -> None:
    """The EDM teacher's own DDIM on the trailing grid at the step counts a progressive chain may start from, paired
    with its Euler 50 on the same seeds (how far from converged the first student's targets are):
    benchmarks/results/few_step_teacher_steps.json."""
    pipe = difflab.load(edm)
    teacher = teacher_reference(pipe, n, seed_sets)
    rows = {TEACHER_ROW: teacher}
    for steps in counts:
        r = score(pipe, n, seed_sets, sampler="ddim", steps=steps, grid="trailing")
        rows[f"ddim {steps}, trailing"] = r = r | paired(r, teacher)
        print(
            f"ddim {steps} trailing: FD {r['fd']:.2f} +- {r['fd_se']:.2f}, paired {r['paired_diff']:+.2f}", flush=True
        )
    (RESULTS / "few_step_teacher_steps.json").write_text(json.dumps({"rows": rows}, indent=2))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/few_step")
    p.add_argument("--steps", type=int, default=4000, help="teacher and consistency-training steps")
    p.add_argument("--round-steps", type=int, default=500, help="progressive distillation: steps per round")
    p.add_argument("--cd-steps", type=int, default=2000)
    p.add_argument("--n", type=int, default=500, help="samples per seed set")
    p.add_argument("--seed-sets", type=int, default=8, help="FD averaged over this many disjoint seed sets")
    p.add_argument("--tuned-levels", help="benchmarks/consistency_sigmas.py's JSON: also score CD and CT at its levels")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--pd-lr-schedule", default="linear", help="pd-edm: each round's learning-rate schedule")
    p.add_argument("--pd-teacher-steps", type=int, default=PD_TEACHER_STEPS,
                   help="pd-edm: the teacher's DDIM steps that the first student halves")  # fmt: skip
    p.add_argument(
        "--late-from",
        default=pd_edm_name("linear", PD_TEACHER_STEPS),
        help="pd-late: the pd-edm chain whose 8-step student starts",
    )
    p.add_argument("--late-rounds", type=int, default=2, help="pd-late: rounds again from the 8-step student")
    p.add_argument("--late-name", default="long", help="pd-late: OUT/{late-from}_NAME, its results' file name")
    p.add_argument("--late-lr", type=float, help="pd-late: the students' base learning rate (default: the teacher's)")
    phases = ("all", "progressive", "consistency", "eval", "pd-edm", "pd-late", "tuned-solvers", "teacher-steps")
    p.add_argument("--phase", choices=phases,
                   default="all",
                   help="run the progressive chain (DDPM teacher, students) or the consistency chain (EDM teacher, CD, "
                   "CT) alone, e.g. in two processes, then eval")  # fmt: skip
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    ddpm, edm, ct, cd, pd_dir = out / "ddpm_v", out / "edm", out / "ct", out / "cd", out / "pd"
    pd_runs = [pd_dir / f"steps_{PD_TEACHER_STEPS >> r}" for r in range(1, PD_ROUNDS + 1)]
    if args.phase == "tuned-solvers":  # the EDM teacher (trained here if missing), solvers on tuned grids
        tuned_solvers(train_once(edm, process="edm", steps=args.steps), args.n, args.seed_sets)
        return 0
    if args.phase == "teacher-steps":  # the EDM teacher's DDIM at 64 and 256 steps, paired with its Euler 50
        teacher_steps_rows(train_once(edm, process="edm", steps=args.steps), args.n, args.seed_sets)
        return 0
    if args.phase == "pd-late":  # after pd-edm: the last rounds of chain --late-from again, --round-steps each
        longer_last_rounds(out, args.late_from, args.late_name, args.late_rounds, args.round_steps, args.late_lr,
                           args.n, args.seed_sets)  # fmt: skip
        return 0
    if args.phase == "pd-edm":  # after the consistency phase (the EDM teacher)
        folder = out / pd_edm_name(args.pd_lr_schedule, args.pd_teacher_steps)
        progressive_from_edm(edm, folder, args.round_steps, args.n, args.seed_sets, args.pd_lr_schedule,
                             args.pd_teacher_steps)  # fmt: skip
        return 0
    if args.phase in ("all", "progressive"):
        train_once(ddpm, prediction="v", steps=args.steps)
        if latest_checkpoint(pd_runs[-1]) is None:
            distill(ddpm, pd_dir, rounds=PD_ROUNDS, teacher_steps=PD_TEACHER_STEPS, steps=args.round_steps,
                    progress=False)  # fmt: skip
    if args.phase in ("all", "consistency"):
        train_once(edm, process="edm", steps=args.steps)
        if latest_checkpoint(cd) is None:
            distill(edm, cd, method="consistency", steps=args.cd_steps, progress=False)
        train_once(ct, process="ct", steps=args.steps)
    if args.phase not in ("all", "eval"):
        return 0

    k = args.seed_sets
    rows, teacher_s = {}, {"ddpm": training_seconds(ddpm), "edm": training_seconds(edm)}
    rows["ddim 50 (DDPM teacher)"] = score(difflab.load(ddpm), args.n, k, sampler="ddim", steps=50)
    rows[TEACHER_ROW] = teacher_reference(difflab.load(edm), args.n, k)
    tuned = json.loads(Path(args.tuned_levels).read_text())["rows"] if args.tuned_levels else []
    for nfe in NFES:
        print(f"NFE {nfe}", flush=True)
        student = next(r for r in pd_runs if r.name == f"steps_{nfe}")
        rows[f"progressive distillation, {nfe} NFE"] = score(difflab.load(student), args.n, k)
        for name, run in (("consistency distillation", cd), ("consistency training", ct)):
            rows[f"{name}, {nfe} NFE"] = score(difflab.load(run), args.n, k, steps=nfe)
            levels = next((r["tuned_levels"] for r in tuned if Path(r["run"]).name == run.name and r["steps"] == nfe
                           and nfe > 1), None)  # fmt: skip
            if levels is not None:
                rows[f"{name}, {nfe} NFE, tuned levels"] = score(difflab.load(run), args.n, k, grid=levels)
        for name, run in (("DDPM-v", ddpm), ("EDM", edm)):
            rows[f"best solver on the {name} teacher, {nfe} NFE"] = best_solver(difflab.load(run), nfe, args.n, k)
    cost = {
        "progressive distillation (all rounds)": sum(training_seconds(r) for r in pd_runs) / teacher_s["ddpm"],
        "consistency distillation": training_seconds(cd) / teacher_s["edm"],
        "consistency training (from scratch)": training_seconds(ct) / teacher_s["edm"],
    }
    write(args, rows, cost)
    return 0


def write(args, rows: dict, cost: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    floor = next(iter(rows.values()))["floor"]
    lines = [
        "# Few-step generation on the digits", "",
        f"`python benchmarks/few_step.py --out {args.out} --steps {args.steps} --round-steps {args.round_steps} "
        f"--cd-steps {args.cd_steps} --n {args.n} --seed-sets {args.seed_sets}`; {datetime.date.today()}, "
        f"{platform.machine()} ({platform.processor() or 'cpu'}), torch {torch.__version__}, "
        f"{args.threads} thread(s).", "",
        f"FD: mean over {args.seed_sets} disjoint seed sets of {args.n} samples (+- its standard error). Real-vs-real "
        f"floor (FD of {args.n} training digits to the test split, the same number of draws): {floor:.3f}.", "",
        "| setting | NFE | FD | FD / floor | conf90 | sampler |", "|---|---|---|---|---|---|",
    ]  # fmt: skip
    for name, r in rows.items():
        sampler = f"{r['sampler']} ({r['grid']})" if "sampler" in r else ""
        lines.append(f"| {name} | {r['nfe']:g} | {r['fd']:.2f} +- {r['fd_se']:.2f} | {r['fd'] / floor:.2f} | "
                     f"{r['conf90']:.2f} | "
                     f"{sampler} |")  # fmt: skip
    lines += ["", "Extra training cost (wall time of the run's own log, as a multiple of its teacher's):", ""]
    lines += [f"- {name}: {ratio:.2f}x" for name, ratio in cost.items()]
    (RESULTS / "few_step.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "few_step.json").write_text(json.dumps({"rows": rows, "cost": cost}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
