"""`difflab serve` under load: concurrent clients against a server on loopback, batched against one-by-one.

    python benchmarks/serve.py                          # trains the two models into --work (reused after), ~5 min
    python benchmarks/serve.py --models runs/served     # every model in a folder of run folders instead
    python benchmarks/serve.py --duration 10 --json /tmp/serve.json   # a quick look

For each model (default: a class-conditional digits model with the demo's settings, 200 training steps, and a text
model of the 16x16 shapes world with the scratch encoder, 50 steps: throughput does not depend on training), the
server runs twice, batched (the default: compatible requests share one denoiser call) and one-by-one
(`--no-batching`), back to back (`--rounds 2` or more alternates the order: A B B A ...). Each run is a fresh server
in its own process (`--serve-only`, one torch thread) serving that model alone; `--clients` threads of this process
each loop for `--duration` seconds: POST /sdapi/v1/txt2img (n = 1, `--steps` steps of "DPM++ 2M", guidance 3, a
random seed, a class or one of six prompts), wait for the answer, send the next. One untimed request per client
first warms the server up.

Measured per run: requests answered per second within the window, p50 / p95 latency of the requests sent in it;
sent, answered (200 with one image of the asked seed), refused (429: the client waits Retry-After and goes on),
failed (any other status, or a wrong answer) and lost (no answer within --timeout); the mean batch the worker drew;
the server's CPU time per request (all its threads; less sensitive than throughput to other load on the machine);
the server's resident memory (VmRSS) every 2 s: after loading, at the start and end of the window, its maximum, and
its slope over the window and over its second half (MB/min: growth after warm-up). Prints a Markdown table and the
batched / one-by-one throughput ratio of each model; --json OUT writes every figure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

GUIDANCE = 3.0
SAMPLER = "DPM++ 2M"  # AUTOMATIC1111's label of dpmpp_2m
RSS_EVERY = 2.0  # seconds between samples of the server's memory
MODES = {"batched": [], "one-by-one": ["--no-batching"]}


# ---- the models ---------------------------------------------------------------------------------------------------
def trained_models(work: Path) -> Path:
    """The folder of the two default models under `work`, each trained once (reused when its checkpoint exists)."""
    from difflab.cli.main import main as difflab
    from difflab.training.checkpoint import latest_checkpoint

    folder = work / "models"
    recipes = {
        "digits": ["--data", "digits", "--conditional", "--model", "tiny", "--batch-size", "128", "--lr", "1e-3",
                   "--steps", "200"],
        "shapes": ["--data", "shapes", "--resolution", "16", "--text-encoder", "scratch", "--steps", "50",
                   "--batch-size", "8"],
    }  # fmt: skip
    for name, recipe in recipes.items():
        run = folder / name
        if latest_checkpoint(run) is not None:
            continue
        print(f"training the {name} model into {run} ...", flush=True)
        code = difflab(["train", *recipe, "--out", str(run), "--seed", "0", "--no-progress"])
        if code != 0:
            raise SystemExit(f"training {name} failed (exit {code})")
    return folder


def model_folders(models: Path, work: Path) -> dict[str, Path]:
    """One folder per run folder of `models`, holding only (a link to) it: each server serves one model."""
    alone = {}
    for run in sorted(p for p in models.iterdir() if (p / "config.json").is_file()):
        folder = work / "alone" / run.name
        folder.mkdir(parents=True, exist_ok=True)
        link = folder / run.name
        if not link.exists():
            link.symlink_to(run.resolve(), target_is_directory=True)
        alone[run.name] = folder
    if not alone:
        raise SystemExit(f"no run folders (with a config.json) under {models}")
    return alone


# ---- the server's process -----------------------------------------------------------------------------------------
def serve_only(args: argparse.Namespace) -> None:
    """Serve --serve-only DIR on a free loopback port with one torch thread; print "URL ...", serve until stdin
    closes, then print the worker's counters as "DRAWN {json}"."""
    from difflab.serve import build_server, running
    from difflab.serve.requests import Limits
    from difflab.training.threads import set_threads

    set_threads(1)
    server = build_server(args.serve_only, out_dir=args.out_dir, limits=Limits(), batching=not args.no_batching)
    with running(server) as url:
        models = {name: m.conditioning for name, m in server.models.items()}
        print(f"URL {url} {json.dumps(models)}", flush=True)
        sys.stdin.read()  # until the benchmark closes our stdin
    server.queue.stop()
    print("DRAWN " + json.dumps(server.queue.drawn), flush=True)


class ServerProcess:
    """A `--serve-only` server in a child process: its URL, model, pid and stderr log."""

    def __init__(self, folder: Path, mode_flags: list[str], work: Path):
        self.out = tempfile.mkdtemp(dir=work, prefix="out-")  # its images, removed when it stops
        self.log = work / f"server-{Path(self.out).name[4:]}.log"  # its stderr
        env = {**os.environ, "DIFFLAB_THREADS": "1", "OMP_NUM_THREADS": "1"}
        command = [sys.executable, __file__, "--serve-only", str(folder), "--out-dir", self.out, *mode_flags]
        with self.log.open("w") as log:  # (the child keeps its own copy of the file)
            self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                         text=True, env=env)  # fmt: skip
        line = " "
        while line and not line.startswith("URL "):  # blocks until the models are loaded and the port is open
            line = self.proc.stdout.readline()
        if not line:
            self.proc.kill()
            raise SystemExit(f"the server did not start; see {self.log}")
        _, self.url, models = line.split(" ", 2)
        (self.model, self.conditioning), *_ = json.loads(models).items()

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def cpu_s(self) -> float:
        """CPU seconds the server has used so far (user + system, all its threads)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime

    def stop(self) -> tuple[dict, list[str]]:
        """Stop the server; its worker's counters and the lines of its log that report errors."""
        out, _ = self.proc.communicate(input="", timeout=120)
        drawn = next((json.loads(line[6:]) for line in out.splitlines() if line.startswith("DRAWN ")), {})
        lines = self.log.read_text().splitlines()
        errors = [line for line in lines if any(w in line for w in ("Error", "error", "Traceback"))]
        shutil.rmtree(self.out, ignore_errors=True)
        if not errors:
            self.log.unlink()
        return drawn, errors


# ---- the clients --------------------------------------------------------------------------------------------------
def request_body(server: ServerProcess, rng: random.Random, steps: int) -> dict:
    """An AUTOMATIC1111 txt2img request for the server's model: n = 1, a random seed, a class or a prompt."""
    from difflab.text_demo import PROMPTS  # the shapes demo's prompts

    prompt = {"class": f"class {rng.randrange(10)}", "text": rng.choice(PROMPTS)}.get(server.conditioning, "")
    return {"prompt": prompt, "steps": steps, "sampler_name": SAMPLER, "cfg_scale": GUIDANCE,
            "seed": rng.randrange(2**31), "batch_size": 1,
            "override_settings": {"sd_model_checkpoint": server.model}}  # fmt: skip


def send(client, url: str, body: dict) -> tuple[str, float, float]:
    """One request: (outcome, retry-after seconds, latency); outcome ok, refused, failed or lost."""
    start = time.perf_counter()
    try:
        response = client.post(f"{url}/sdapi/v1/txt2img", json=body)
    except Exception:  # a timeout or a broken connection: the request got no answer
        return "lost", 0.0, time.perf_counter() - start
    latency = time.perf_counter() - start
    if response.status_code == 429:
        return "refused", float(response.headers.get("retry-after", 1)), latency
    if response.status_code != 200:
        return "failed", 0.0, latency
    try:
        answer = response.json()
        right = len(answer["images"]) == 1 and json.loads(answer["info"])["all_seeds"] == [body["seed"]]
    except (ValueError, KeyError, TypeError):  # not the JSON of an A1111 answer
        right = False
    return ("ok" if right else "failed"), 0.0, latency


def client_loop(index: int, server: ServerProcess, args, start: threading.Barrier, window: dict, log: list) -> None:
    """Warm up with one request, wait for the others, then loop until the window closes; `log` gets one
    (sent at, answered at, outcome, latency) per request of the window."""
    import httpx

    rng = random.Random(index)
    with httpx.Client(timeout=args.timeout) as client:
        send(client, server.url, request_body(server, rng, args.steps))
        start.wait(timeout=args.timeout + 60)
        while (sent := time.perf_counter()) < window["end"]:
            outcome, retry_after, latency = send(client, server.url, request_body(server, rng, args.steps))
            log.append((sent, sent + latency, outcome, latency))
            if outcome == "refused":
                time.sleep(min(retry_after, max(0.0, window["end"] - time.perf_counter())))


def measure(folder: Path, mode: str, args: argparse.Namespace, work: Path) -> dict:
    """One run of a fresh server in `mode`, loaded by --clients clients for --duration seconds."""
    server = ServerProcess(folder, MODES[mode], work)
    rss_loaded = server.rss_mb()
    window: dict = {"end": float("inf")}
    log: list = []
    barrier = threading.Barrier(args.clients + 1)
    clients = [threading.Thread(target=client_loop, args=(i, server, args, barrier, window, log))
               for i in range(args.clients)]  # fmt: skip
    for c in clients:
        c.start()
    barrier.wait(timeout=args.timeout + 60)  # every client has had its warm-up answer
    begin, cpu, load = time.perf_counter(), server.cpu_s(), os.getloadavg()[0]
    window["end"] = begin + args.duration
    rss = []  # (seconds into the window, MB)
    while (now := time.perf_counter()) < window["end"]:
        rss.append((now - begin, server.rss_mb()))
        time.sleep(min(RSS_EVERY, max(0.0, window["end"] - now)))
    rss.append((time.perf_counter() - begin, server.rss_mb()))
    cpu, load = server.cpu_s() - cpu, (load, os.getloadavg()[0])
    for c in clients:
        c.join()  # requests sent before the end are waited for: an accepted one must be answered
    drawn, errors = server.stop()
    outcomes = [entry[2] for entry in log]
    latencies = sorted(entry[3] for entry in log if entry[2] == "ok")
    answered = sum(1 for _, done, outcome, _ in log if outcome == "ok" and done <= window["end"])
    return {
        "model": server.model, "conditioning": server.conditioning, "mode": mode, "duration_s": args.duration,
        "clients": args.clients, "steps": args.steps, "sent": len(log),
        **{k: outcomes.count(k) for k in ("ok", "refused", "failed", "lost")},
        "answered_in_window": answered, "requests_per_s": answered / args.duration,
        "p50_s": percentile(latencies, 50), "p95_s": percentile(latencies, 95),
        "mean_batch": drawn.get("samples", 0) / max(drawn.get("batches", 0), 1), "drawn": drawn,
        "rss_loaded_mb": rss_loaded, "rss_start_mb": rss[0][1], "rss_end_mb": rss[-1][1],
        "rss_max_mb": max(mb for _, mb in rss), "rss_slope_mb_per_min": 60 * slope(rss),
        "rss_late_slope_mb_per_min": 60 * slope([p for p in rss if p[0] >= args.duration / 2]), "rss": rss,
        "server_cpu_s": cpu, "server_cpu_ms_per_request": 1000 * cpu / max(answered, 1),
        "load_start": load[0], "load_end": load[1], "server_errors": errors,
    }  # fmt: skip


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of sorted values; nan for none."""
    if not values:
        return float("nan")
    return values[max(0, math.ceil(q / 100 * len(values)) - 1)]


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x (per second)."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0


# ---- the report ---------------------------------------------------------------------------------------------------
def machine() -> str:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine())  # fmt: skip
    return (f"{os.cpu_count()} CPUs ({cpu}), torch {torch.__version__}, 1 torch thread in the server, load average "
            f"{os.getloadavg()[0]:.1f}")  # fmt: skip


def pooled(runs: list[dict]) -> dict:
    """The runs of one model and mode (several with --rounds) as one: rates over the summed time, latencies
    pooled by their medians (p50, p95 of each run averaged)."""
    total = sum(r["duration_s"] for r in runs)
    first = runs[0]
    return {
        **{k: first[k] for k in ("model", "mode")},
        **{k: sum(r[k] for r in runs) for k in ("sent", "ok", "refused", "failed", "lost")},
        "requests_per_s": sum(r["answered_in_window"] for r in runs) / total,
        "server_cpu_ms_per_request": 1000 * sum(r["server_cpu_s"] for r in runs)
        / max(sum(r["answered_in_window"] for r in runs), 1),
        "load": f"{min(r['load_start'] for r in runs):.1f}-{max(r['load_end'] for r in runs):.1f}",
        **{k: statistics.fmean(r[k] for r in runs) for k in ("p50_s", "p95_s", "mean_batch")},
        "rss": "/".join(f"{max(r[k] for r in runs):.0f}" for k in ("rss_loaded_mb", "rss_start_mb", "rss_end_mb",
                                                                   "rss_max_mb")),
        **{k: max(r[k] for r in runs) for k in ("rss_slope_mb_per_min", "rss_late_slope_mb_per_min")},
    }  # fmt: skip


def print_table(runs: list[dict]) -> dict[str, dict[str, float]]:
    """The Markdown table of the runs and each model's batched / one-by-one ratios (returned): of throughput, and of
    the server's CPU time per request (less sensitive to other load on the machine)."""
    print(
        "| model | mode | requests/s | p50 s | p95 s | sent | ok | refused | failed | lost | mean batch "
        "| server CPU ms/request | load avg | RSS MB loaded/start/end/max | RSS slope MB/min (window / 2nd half) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    ratios = {}
    for model in dict.fromkeys(r["model"] for r in runs):
        rows = {mode: pooled([r for r in runs if r["model"] == model and r["mode"] == mode]) for mode in MODES}
        for p in rows.values():
            print(f"| {p['model']} | {p['mode']} | {p['requests_per_s']:.2f} | {p['p50_s']:.2f} | {p['p95_s']:.2f} | "
                  f"{p['sent']} | {p['ok']} | {p['refused']} | {p['failed']} | {p['lost']} | {p['mean_batch']:.1f} | "
                  f"{p['server_cpu_ms_per_request']:.0f} | {p['load']} | {p['rss']} | "
                  f"{p['rss_slope_mb_per_min']:+.1f} / {p['rss_late_slope_mb_per_min']:+.1f} |")  # fmt: skip
        batched, alone = rows["batched"], rows["one-by-one"]
        ratios[model] = {
            "throughput": batched["requests_per_s"] / max(alone["requests_per_s"], 1e-9),
            "cpu_per_request": alone["server_cpu_ms_per_request"] / max(batched["server_cpu_ms_per_request"], 1e-9),
            "rounds": [b["requests_per_s"] / max(a["requests_per_s"], 1e-9) for b, a in zip(
                *([r for r in runs if r["model"] == model and r["mode"] == mode] for mode in MODES), strict=True)],
        }  # fmt: skip
    for model, ratio in ratios.items():
        goal = "met" if ratio["throughput"] >= 2 else "not met"
        rounds = ", ".join(f"{x:.2f}" for x in ratio["rounds"])
        print(f"{model}: batched / one-by-one throughput {ratio['throughput']:.2f}x (goal >= 2x: {goal}; per round "
              f"{rounds}); server CPU per request {ratio['cpu_per_request']:.2f}x less")  # fmt: skip
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=60, help="seconds of load per model and mode")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps per request")
    parser.add_argument("--rounds", type=int, default=1, help="runs per model and mode, the order alternating")
    parser.add_argument("--timeout", type=float, default=300, help="seconds a client waits for an answer")
    parser.add_argument("--models", help="a folder of run folders to serve (default: train two into --work)")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "difflab-bench-serve"),
                        help="where the default models are trained (and reused) and the servers write")  # fmt: skip
    parser.add_argument("--json", metavar="OUT", help="write every figure here")
    parser.add_argument("--serve-only", metavar="DIR", help=argparse.SUPPRESS)  # the server's process
    parser.add_argument("--out-dir", help=argparse.SUPPRESS)
    parser.add_argument("--no-batching", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_only:
        return serve_only(args)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    folders = model_folders(Path(args.models) if args.models else trained_models(work), work)
    started = time.strftime("%Y-%m-%d %H:%M")
    runs = []
    for r in range(args.rounds):
        for name, folder in folders.items():
            for mode in list(MODES) if r % 2 == 0 else list(MODES)[::-1]:
                print(f"round {r + 1}/{args.rounds}: {name}, {mode}, {args.clients} clients for {args.duration:g} s",
                      flush=True)  # fmt: skip
                runs.append(measure(folder, mode, args, work))
                run = runs[-1]
                print(f"  {run['requests_per_s']:.2f} requests/s, p50 {run['p50_s']:.2f} s, p95 {run['p95_s']:.2f} "
                      f"s, ok {run['ok']}/{run['sent']}, mean batch {run['mean_batch']:.1f}, server CPU "
                      f"{run['server_cpu_ms_per_request']:.0f} ms/request, load {run['load_start']:.1f}-"
                      f"{run['load_end']:.1f}, server errors {len(run['server_errors'])}", flush=True)  # fmt: skip
    print(f"\n{started}; {machine()}; {args.clients} clients, {args.steps} steps of {SAMPLER}, guidance {GUIDANCE:g}, "
          f"n = 1, {args.duration:g} s per run, {args.rounds} round(s)")  # fmt: skip
    ratios = print_table(runs)
    for run in runs:
        for line in run["server_errors"][:5]:
            print(f"server log ({run['model']}, {run['mode']}): {line}")
    if args.json:
        figures = {"date": started, "machine": machine(), "argv": sys.argv[1:], "runs": runs, "ratios": ratios}
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
