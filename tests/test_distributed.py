"""Data-parallel training and sampling under torchrun (gloo, 2 CPU processes): 2 ranks x batch B/2 train the weights
of 1 process x batch B, a rank killed mid-run brings the group back from the latest checkpoint with the weights of an
unbroken run, a c10d rendezvous (--nnodes/--rdzv-*) trains what the static one does, and sharded sampling writes the
pixels one process writes. An instrumented run (`instrument`, its workers started as `python -m tests.test_distributed`)
shows that a non-finite loss on one rank skips the step on both, that only rank 0 writes checkpoints, and that each
rank's network sees its own rows of the global batch. The draws and seed sharding are checked in-process against their
closed forms."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from difflab import distributed
from difflab.cli.main import main
from difflab.distributed import World
from difflab.training.trainer import read_log
from tests.conftest import assert_one_line_error, run_cli

STEPS = 60
TRAIN = ["train", "--data", "moons", "--conditional", "--batch-size", "64", "--checkpoint-every", "10", "--no-progress"]
# Measured 2.4e-07 after 200 steps (moons, batch 64, conditional): the shards' smaller matmuls round differently.
WEIGHT_TOLERANCE = 1e-5


ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, restarts: int = 0, rendezvous: Sequence[str] = (), module="difflab") -> subprocess.Popen:
    """`torchrun --nproc-per-node 2 -m MODULE ARGS` from the repository root: static rendezvous on a free port (which
    restarts reliably), or the `rendezvous` options given."""
    launch = list(rendezvous) or ["--master-port", str(free_port())]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", *launch,
               "--max-restarts", str(restarts), "--monitor-interval", "0.2", "-m", module, *args]  # fmt: skip
    env = os.environ | {"DIFFLAB_THREADS": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finished(proc: subprocess.Popen, timeout: float = 600) -> str:
    """The launch's output once it has succeeded; a launch still running after `timeout` seconds (ranks out of step
    wait for each other's collectives) is killed with its workers and fails the test."""
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in [*descendants(proc.pid), proc.pid]:  # (torchrun starts its workers in sessions of their own)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"torchrun still running after {timeout} s (ranks out of step?):\n{output[-3000:]}")
    assert proc.returncode == 0, output[-3000:]
    return output


def descendants(pid: int) -> list[int]:
    """The processes below `pid` (its children, theirs, ...)."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
        children = [int(c) for task in tasks for c in (task / "children").read_text().split()]
    except FileNotFoundError:  # (gone meanwhile)
        return []
    return [d for c in children for d in (c, *descendants(c))]


def weights(run: Path, step: int = STEPS) -> dict[str, torch.Tensor]:
    ckpt = run / "checkpoints" / f"step_{step:08d}"
    return load_file(ckpt / "model.safetensors") | {
        f"ema.{k}": v for k, v in load_file(ckpt / "ema.safetensors").items()
    }


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp") / "run"
    finished(torchrun(*TRAIN, "--out", str(out), "--steps", str(STEPS)))
    return out


@pytest.mark.slow
def test_two_processes_train_the_weights_of_one(two_rank_run, tmp_path):
    one = tmp_path / "one"
    assert main([*TRAIN, "--out", str(one), "--steps", str(STEPS)]) == 0
    single, ddp = weights(one), weights(two_rank_run)
    assert max((single[k] - ddp[k]).abs().max().item() for k in single) < WEIGHT_TOLERANCE
    assert max((single[k] - weights(one, 50)[k]).abs().max().item() for k in single) > 1e-4  # it trains
    logged = [r["loss"] for r in map(json.loads, (two_rank_run / "train_log.jsonl").read_text().splitlines())]
    expected = [r["loss"] for r in map(json.loads, (one / "train_log.jsonl").read_text().splitlines())]
    assert np.allclose(logged, expected, rtol=1e-4)  # the log holds the global batch's loss, written once


@pytest.mark.slow
def test_a_killed_rank_recovers_and_resumes_exactly(two_rank_run, tmp_path):
    out = tmp_path / "run"
    proc = torchrun(*TRAIN, "--out", str(out), "--steps", str(STEPS), restarts=1)
    while not (out / "checkpoints" / "step_00000020").exists():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.02)
    workers = [int(pid) for pid in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
    assert len(workers) == 2
    os.kill(workers[-1], signal.SIGKILL)
    output = finished(proc)
    assert "exitcode: -9" in output  # torchrun saw the killed rank and restarted the group
    steps = [r["step"] for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines())]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS  # each step logged once, to the end
    resumed, unbroken = weights(out), weights(two_rank_run)
    assert all(torch.equal(resumed[k], unbroken[k]) for k in unbroken)  # every rank resumed exactly


@pytest.mark.slow
def test_a_c10d_rendezvous_trains_the_weights_of_the_static_one(two_rank_run, tmp_path):
    # torchrun's rendezvous for several machines (--nnodes/--rdzv-*): the ranks join the agent's store, not rank 0's
    out = tmp_path / "run"
    rendezvous = ["--nnodes", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{free_port()}",
                  "--rdzv-id", "difflab-test"]  # fmt: skip
    finished(torchrun(*TRAIN, "--out", str(out), "--steps", str(STEPS), rendezvous=rendezvous))
    c10d, static = weights(out), weights(two_rank_run)
    assert all(torch.equal(c10d[k], static[k]) for k in static)


def test_the_store_is_the_agents_under_torchrun_and_rank_0s_outside_it(monkeypatch):
    # (torch's TCPStore itself forgives a rank 0 that binds the agent's port under torchrun, so the launches above
    # pass either way: the branch is pinned here)
    monkeypatch.setattr(distributed, "TIMEOUT", datetime.timedelta(seconds=2))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    port = free_port()
    monkeypatch.setenv("MASTER_PORT", str(port))
    own = distributed._attempt_store(0, 1)  # launched by another tool: rank 0 serves the store
    own.set("key", "rank 0")
    client = torch.distributed.TCPStore("127.0.0.1", port, 1, False, timeout=datetime.timedelta(seconds=2))
    assert client.get("difflab/attempt_1/key") == b"rank 0"  # under this attempt's prefix
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))  # no agent listens there
    with pytest.raises(torch.distributed.DistError):  # rank 0 only connects to the agent's store: it serves none
        distributed._attempt_store(0, 1)


# ---- an instrumented run: one rank's non-finite loss, each rank's network inputs and checkpoint writes ------------
SHORT = 20  # steps of the instrumented runs (checkpoints at 10 and 20)
NAN_CALL = 5  # the loss call (the attempt at step 5) that is made non-finite on one rank
RECORDED_CALLS = 3  # the loss calls whose network inputs are recorded


def instrument(patch, record: Path, rank: int, nan_rank: int) -> None:
    """Patch this process's training (`patch` is setattr or a MonkeyPatch's): rank `nan_rank`'s loss at call NAN_CALL
    is NaN (a constant added, so the gradients stay finite and only the loss flag can skip the step); the network's
    inputs of the first RECORDED_CALLS calls, the steps of the checkpoints this rank writes, and its final weights and
    result are saved to record/rank{rank}.pt when the run ends."""
    from difflab.training import trainer
    from difflab.training.tasks import DenoiserTask

    patch(distributed, "TIMEOUT", datetime.timedelta(seconds=60))  # ranks out of step fail in a minute, not 30

    seen: dict = {"calls": 0, "inputs": [], "saves": []}
    real_loss, real_save, real_run = DenoiserTask.loss, trainer.save_checkpoint, trainer.Trainer.run

    def tensors(args) -> list[torch.Tensor]:
        out = []
        for a in args:
            values = [a[k] for k in sorted(a)] if isinstance(a, dict) else [a]
            out += [v.detach().clone() for v in values if isinstance(v, torch.Tensor)]
        return out

    def loss(self, x0, cond, generator):
        call = seen["calls"]
        seen["calls"] += 1
        hook = None
        if call < RECORDED_CALLS:  # at F's input, inside DistributedDataParallel
            hook = self.module.register_forward_pre_hook(lambda module, args: seen["inputs"].append(tensors(args)))
        try:
            out = real_loss(self, x0, cond, generator)
        finally:
            if hook is not None:
                hook.remove()
        return out + float("nan") if call == NAN_CALL and rank == nan_rank else out

    def save_checkpoint(run_dir, step, *args, **kwargs):
        seen["saves"].append(step)
        return real_save(run_dir, step, *args, **kwargs)

    def run(self, *args, **kwargs):
        result = real_run(self, *args, **kwargs)
        torch.save(seen | {"model": self.module.state_dict(), "ema": self.ema.state_dict(), "step": result.step,
                           "skipped": result.skipped_steps}, record / f"rank{rank}.pt")  # fmt: skip
        return result

    patch(DenoiserTask, "loss", loss)
    patch(trainer, "save_checkpoint", save_checkpoint)
    patch(trainer.Trainer, "run", run)


@pytest.fixture(scope="module")
def instrumented(tmp_path_factory) -> dict[str, Path]:
    """Two ranks (rank 1's loss NaN once) and one process (its loss NaN at the same call), SHORT steps each:
    {"two": run, "one": run}, each run's records in run/../record."""
    runs = {}
    for name in ("two", "one"):
        folder = tmp_path_factory.mktemp(f"instrumented_{name}")
        (folder / "record").mkdir()
        argv = [*TRAIN, "--out", str(folder / "run"), "--steps", str(SHORT)]
        if name == "two":
            finished(torchrun(str(folder / "record"), "1", *argv, module="tests.test_distributed"), timeout=180)
        else:
            with pytest.MonkeyPatch.context() as mp:
                instrument(mp.setattr, folder / "record", rank=0, nan_rank=0)
                assert main(argv) == 0
        runs[name] = folder / "run"
    return runs


def records(run: Path) -> list[dict]:
    """What `instrument` recorded of each rank of `run`, in rank order."""
    return [torch.load(path) for path in sorted((run.parent / "record").glob("rank*.pt"))]


@pytest.mark.slow
def test_a_nonfinite_loss_on_one_rank_skips_the_step_on_every_rank(instrumented):
    two, one = instrumented["two"], instrumented["one"]
    rank0, rank1 = records(two)
    assert rank0["calls"] == rank1["calls"] == SHORT + 1  # every rank tried step 5 twice
    assert (rank0["step"], rank0["skipped"]) == (rank1["step"], rank1["skipped"]) == (SHORT, 1)
    logged = [(r["step"], r["skipped_steps"]) for r in read_log(two)]
    assert logged == [(SHORT, 1)]  # rank 0, whose own loss was finite, logged the skip
    for name in ("model", "ema"):  # the ranks stayed together: the same weights, bit for bit
        assert all(torch.equal(rank0[name][k], rank1[name][k]) for k in rank0[name])
    saved = weights(two, SHORT)
    assert all(torch.equal(saved[k], rank0["model"][k]) for k in rank0["model"])
    single = weights(one, SHORT)  # one process that skipped the same step (its loss NaN there)
    assert max((single[k] - saved[k]).abs().max().item() for k in single) < WEIGHT_TOLERANCE


@pytest.mark.slow
def test_only_rank_0_writes_checkpoints(instrumented):
    rank0, rank1 = records(instrumented["two"])
    assert rank0["saves"] == [10, 20] and rank1["saves"] == []
    assert sorted(p.name for p in (instrumented["two"] / "checkpoints").iterdir()) == ["step_00000010", "step_00000020"]


@pytest.mark.slow
def test_each_rank_trains_its_own_rows_of_the_global_batch(instrumented):
    rank0, rank1 = records(instrumented["two"])
    (single,) = records(instrumented["one"])
    assert len(rank0["inputs"]) == len(rank1["inputs"]) == len(single["inputs"]) == RECORDED_CALLS
    for call in range(RECORDED_CALLS):  # F's inputs (x, noise level, class labels): rank r has rows [32 r, 32 r + 32)
        for a, b, whole in zip(rank0["inputs"][call], rank1["inputs"][call], single["inputs"][call], strict=True):
            assert len(a) == len(b) == 32 and len(whole) == 64
            assert torch.equal(torch.cat([a, b]), whole)


@pytest.mark.slow
def test_ranks_decaying_the_learning_rate_over_minutes_keep_the_same_weights(tmp_path):
    """--minutes with a decaying --lr-schedule: each rank's clock differs a little, so each would step with its own
    learning rate and the ranks' weights would drift apart; they share one clock (the ranks' mean)."""
    (tmp_path / "record").mkdir()
    argv = [*TRAIN, "--out", str(tmp_path / "run"), "--minutes", "0.04", "--lr-schedule", "cosine", "--lr", "1e-2"]
    finished(torchrun(str(tmp_path / "record"), "-1", *argv, module="tests.test_distributed"), timeout=180)
    rank0, rank1 = records(tmp_path / "run")
    assert rank0["step"] == rank1["step"] > 10
    for name in ("model", "ema"):
        assert all(torch.equal(rank0[name][k], rank1[name][k]) for k in rank0[name])


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("digits") / "run"
    assert main(["train", "--data", "digits", "--conditional", "--steps", "3", "--out", str(run), "--no-progress"]) == 0
    return run


@pytest.mark.slow
def test_sharded_eval_scores_the_samples_of_one_process(digits_run, tmp_path):
    evaluate = ["eval", "--ckpt", str(digits_run), "--num-samples", "30", "--batch-size", "8", "--steps", "3"]
    assert main([*evaluate, "--out", str(tmp_path / "one")]) == 0
    output = finished(torchrun(*evaluate, "--out", str(tmp_path / "two")))
    assert output.count("NFE    3: FID") == 1  # rank 0 scores and reports
    one, two = (json.loads((tmp_path / name / "eval.json").read_text())["rows"][0] for name in ("one", "two"))
    assert one == two and one["fid"] > 0


@pytest.mark.slow
def test_sharded_sampling_writes_the_pixels_of_one_process(digits_run, tmp_path):
    run = digits_run
    sample = ["sample", "--ckpt", str(run), "--num-samples", "7", "--batch-size", "2", "--steps", "3", "--class", "all"]
    assert main([*sample, "--out-dir", str(tmp_path / "one")]) == 0
    output = finished(torchrun(*sample, "--out-dir", str(tmp_path / "two")))
    assert output.count("wrote 7 samples") == 1 and "(4 drawn by rank 0)" in output  # batches 0 and 2 of 4
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir()) and len(names) == 7
    for name in names:
        a, b = Image.open(tmp_path / "one" / name), Image.open(tmp_path / "two" / name)
        assert np.array_equal(np.asarray(a), np.asarray(b)) and a.text["parameters"] == b.text["parameters"]


@pytest.mark.parametrize("size", [1, 2, 3])
def test_sharded_draws_are_the_global_batch_rows(size):
    def draws(world: World) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(7)
        rows = 6 // world.size
        with distributed.sharded_draws(world):
            return [distributed.randn(rows, 3, generator=g), distributed.rand((rows,), generator=g),
                    distributed.randint(0, 10, (rows, 2), generator=g),
                    distributed.multinomial(torch.tensor([0.2, 0.3, 0.5]), rows, replacement=True, generator=g),
                    distributed.rand(2, rows, 2, batch_dim=1, generator=g)]  # fmt: skip

    full = draws(World())
    shards = [draws(World(rank, size)) for rank in range(size)]
    for i, whole in enumerate(full):
        dim = 1 if i == 4 else 0
        assert torch.equal(torch.cat([s[i] for s in shards], dim), whole)


def test_draws_outside_a_shard_are_torchs():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(distributed.randn(4, 2, generator=g1), torch.randn(4, 2, generator=g2))


@pytest.mark.parametrize(("n", "batch", "size"), [(7, 2, 2), (10, 3, 3), (1, 4, 2), (9, 9, 2)])
def test_seed_shards_are_whole_batches_that_cover_every_seed_once(n, batch, size):
    shards = [World(rank, size).seed_share(100, n, batch) for rank in range(size)]
    assert sorted(s for shard in shards for s in shard) == list(range(100, 100 + n))
    batches = [list(range(s, min(s + batch, 100 + n))) for s in range(100, 100 + n, batch)]
    for rank, shard in enumerate(shards):
        assert shard == [s for b in batches[rank::size] for s in b]


def test_a_batch_that_does_not_split_over_the_ranks_is_refused(tmp_path):
    import difflab
    from difflab.training.tasks import DenoiserTask
    from difflab.training.trainer import Trainer

    data = difflab.load_dataset("moons")
    task = DenoiserTask(difflab.run_config(data, steps=1, batch_size=64))
    with pytest.raises(difflab.DifflabError, match="batch size 64 .* does not split over 3 processes"):
        Trainer(task, data.data, tmp_path / "run", torch.device("cpu"), world=World(0, 3))


def test_a_single_out_file_under_torchrun_is_refused(tmp_path, monkeypatch, capsys):
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(name, value)
    code, _, err = run_cli(capsys, "sample", "--ckpt", tmp_path, "--out", tmp_path / "a.png")
    assert_one_line_error(code, err, "under torchrun, write one PNG per sample with --out-dir")


@pytest.mark.parametrize(
    "argv",
    [
        ["train-classifier", "--data", "moons", "--out", "x"],
        ["nll", "--ckpt", "x"],
        ["txt2img", "a red circle", "--ckpt", "x", "--upsampler", "y", "--out-dir", "z"],
    ],
)
def test_commands_of_one_process_are_refused_under_torchrun(argv, monkeypatch, capsys):
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(name, value)
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, "this runs in one process; launch it without torchrun")


def test_a_command_leaves_the_process_group_when_it_ends(tmp_path, capsys):
    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        assert main(["samplers"]) == 0
        assert not torch.distributed.is_initialized()  # gloo's threads stopped before the interpreter exits
    finally:
        distributed.leave()


if __name__ == "__main__":  # a worker of the instrumented run: python -m tests.test_distributed RECORD NAN_RANK ARGS
    record, nan_rank, *argv = sys.argv[1:]
    instrument(setattr, Path(record), int(os.environ["RANK"]), int(nan_rank))
    sys.exit(main(argv))
