"""The library layer's shape, measured (issue 10): process-name comparisons outside the formulation registry, the CLI's
share of the source lines, and the start-up time of `difflab --help` and `difflab samplers`, for this tree and an
earlier commit side by side (the earlier one from a temporary `git worktree`, run with the same interpreter).

    OMP_NUM_THREADS=1 python benchmarks/library_layer.py --against 7156b7c --rounds 7
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAME_COMPARISON = r"(process|\.name) *(==|!=|in|not in) *[(\"']*(ddpm|vp|subvp|ve|edm|pfgmpp|pfgm)\b"


def name_comparisons(tree: Path) -> list[str]:
    """Lines of src/difflab (outside formulations/) that compare a process name."""
    out = subprocess.run(["grep", "-rnE", NAME_COMPARISON, "src/difflab", "--include=*.py"], cwd=tree,
                         capture_output=True, text=True).stdout  # fmt: skip
    return [line for line in out.splitlines() if "/formulations/" not in line]


def cli_share(tree: Path) -> tuple[int, int]:
    """(CLI lines, all lines) of src/difflab."""
    lines = {p: len(p.read_text().splitlines()) for p in (tree / "src" / "difflab").rglob("*.py")}
    return sum(n for p, n in lines.items() if "/cli/" in str(p)), sum(lines.values())


def startup_seconds(tree: Path, argv: list[str], rounds: int) -> float:
    """Median wall time of `difflab ARGV` in a fresh interpreter (output discarded)."""
    code = f"import sys; from difflab.cli.main import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass"
    env = os.environ | {"PYTHONPATH": str(tree / "src")}
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(tree: Path, rounds: int) -> dict:
    cli, total = cli_share(tree)
    return {
        "name_comparisons": len(name_comparisons(tree)),
        "cli_lines": cli,
        "src_lines": total,
        "cli_share": cli / total,
        "help_s": startup_seconds(tree, ["--help"], rounds),
        "samplers_s": startup_seconds(tree, ["samplers"], rounds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", default="7156b7c", help="the earlier commit to compare with")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "old"
        subprocess.run(["git", "worktree", "add", "-q", "--detach", str(old), args.against], cwd=ROOT, check=True)
        try:
            rows = {args.against: measure(old, args.rounds), "this tree": measure(ROOT, args.rounds)}
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=ROOT, check=True)
    print(f"{'':>12} {'name comparisons':>17} {'CLI lines':>10} {'CLI share':>10} {'--help s':>9} {'samplers s':>11}")
    for label, r in rows.items():
        print(f"{label:>12} {r['name_comparisons']:>17} {r['cli_lines']:>10} {100 * r['cli_share']:>9.1f}% "
              f"{r['help_s']:>9.2f} {r['samplers_s']:>11.2f}")  # fmt: skip
    for line in name_comparisons(ROOT):
        print("  remaining:", line)


if __name__ == "__main__":
    main()
