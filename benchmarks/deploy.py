"""Scale and deployment (issue 16): data-parallel training throughput of 1 vs 2 processes (torchrun, gloo), and
DeepCache's sampling speed-up and FD change at K = 2, 3, 5 on the digits. The backends (onnxruntime, torch.compile,
int8) are measured by benchmarks/deploy_backends.py and the watermarks by benchmarks/watermark.py.

    python benchmarks/deploy.py --section training                    # ~5 min on a busy 2-core machine
    python benchmarks/deploy.py --section deepcache --ckpt RUN        # a trained digits model (the demo's run)

Training: `difflab train --data digits` (tiny U-Net, global batch 128) for `--steps` in one process, then under
`torchrun --nproc-per-node 2` (each rank batch 64), one thread per process; throughput is images per second of the
steps after the first `--warmup` (from the run's log, so start-up and compilation are left out). DeepCache: DDIM
with `--steps` steps on `--n` samples (seeds 0..n-1), the same samples without and with `--cache-interval K`; speed is
the ratio of sampling wall times measured side by side in this process, FD the digits classifier's.
Writes benchmarks/results/deploy_{section}.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def training_throughput(steps: int, warmup: int, processes: int, out: Path) -> float:
    """Images per second of a digits run after `warmup` steps (global batch 128)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), "-m"]
    command = [*(launcher if processes > 1 else [sys.executable, "-m"]), "difflab", "train", "--data", "digits",
               "--out", str(out), "--steps", str(steps), "--batch-size", "128", "--no-progress", "--threads", "1",
               "--checkpoint-every", str(steps)]  # fmt: skip
    subprocess.run(command, check=True, env=os.environ | {"OMP_NUM_THREADS": "1"}, capture_output=True)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    first = next(r for r in log if r["step"] >= warmup)
    return 128 * (log[-1]["step"] - first["step"]) / (log[-1]["elapsed_s"] - first["elapsed_s"])


def training_section(args) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        one = training_throughput(args.steps, args.warmup, 1, Path(tmp) / "one")
        two = training_throughput(args.steps, args.warmup, 2, Path(tmp) / "two")
    return [
        f"Command: `python benchmarks/deploy.py --section training --steps {args.steps} --warmup {args.warmup}`; "
        f"{_machine()}, one thread per process.", "",
        "| processes | images/s | speed-up |", "|---|---|---|",
        f"| 1 | {one:.0f} | 1.00x |", f"| 2 (torchrun, gloo) | {two:.0f} | {two / one:.2f}x |",
    ]  # fmt: skip


def deepcache_section(args) -> list[str]:
    import difflab
    from difflab.eval.quality import digits_quality

    torch.set_num_threads(1)
    pipe = difflab.load(args.ckpt)
    intervals = (None, 2, 3, 5)
    seconds = {k: [] for k in intervals}
    for _ in range(args.rounds):  # the settings interleaved, the fastest of each kept: a busy machine's noise
        for interval in intervals:
            start = time.perf_counter()
            pipe.sample(args.time_n, seed=0, sampler="ddim", steps=args.sample_steps, batch_size=args.time_n,
                        cache_interval=interval)  # fmt: skip
            seconds[interval].append(time.perf_counter() - start)
    rows = []
    for interval in intervals:
        stats: dict = {}
        samples = pipe.sample(args.n, seed=0, sampler="ddim", steps=args.sample_steps, batch_size=args.batch_size,
                              cache_interval=interval, stats=stats)  # fmt: skip
        quality = digits_quality(samples)
        calls = stats.get("deep_cache", {"full": args.sample_steps, "shallow": 0})
        speed = min(seconds[None]) / min(seconds[interval])
        rows.append(f"| {interval or 'off'} | {calls['full']} / {calls['shallow']} | {speed:.2f}x | "
                    f"{quality['frechet']:.2f} | {quality['frechet_floor']:.2f} |")  # fmt: skip
        print(rows[-1], flush=True)
    return [
        f"Command: `python benchmarks/deploy.py --section deepcache --ckpt {args.ckpt} --n {args.n} --sample-steps "
        f"{args.sample_steps} --rounds {args.rounds} --time-n {args.time_n}`; {_machine()}, one thread; model: "
        f"{pipe}. Speed: the fastest of {args.rounds} interleaved runs of {args.time_n} samples per setting; FD on "
        f"{args.n} samples (seeds 0..{args.n - 1}).", "",
        "| K | full / shallow calls per batch | speed-up | FD | FD floor |", "|---|---|---|---|---|", *rows,
    ]  # fmt: skip


def _machine() -> str:
    return (f"{datetime.date.today()}, {platform.machine()} ({platform.processor() or 'cpu'}, {os.cpu_count()} "
            f"cores), torch {torch.__version__}")  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--section", choices=("training", "deepcache"), required=True)
    p.add_argument("--steps", type=int, default=300, help="training: steps per run")
    p.add_argument("--warmup", type=int, default=50, help="training: steps left out of the throughput")
    p.add_argument("--ckpt", help="deepcache: a trained digits run")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--rounds", type=int, default=3, help="deepcache: timing rounds")
    p.add_argument("--time-n", type=int, default=100, help="deepcache: samples per timed run")
    args = p.parse_args()
    if args.section == "deepcache" and args.ckpt is None:
        p.error("--section deepcache needs --ckpt RUN")
    lines = training_section(args) if args.section == "training" else deepcache_section(args)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"deploy_{args.section}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
