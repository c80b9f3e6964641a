"""Data-parallel training and sampling under torchrun (gloo, 2 CPU processes): 2 ranks x batch B/2 train the weights
of 1 process x batch B, a rank killed mid-run brings the group back from the latest checkpoint with the weights of an
unbroken run, and sharded sampling writes the pixels one process writes. The draws and seed sharding are checked
in-process against their closed forms."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from difflab import distributed
from difflab.cli.main import main
from difflab.distributed import World
from tests.conftest import assert_one_line_error, run_cli

STEPS = 60
TRAIN = ["train", "--data", "moons", "--conditional", "--batch-size", "64", "--checkpoint-every", "10", "--no-progress"]
# Measured 2.4e-07 after 200 steps (moons, batch 64, conditional): the shards' smaller matmuls round differently.
WEIGHT_TOLERANCE = 1e-5


def torchrun(*args: str, restarts: int = 0) -> subprocess.Popen:
    """`torchrun --nproc-per-node 2 -m difflab ARGS` on a free port (static rendezvous, which restarts reliably)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
               "--max-restarts", str(restarts), "--monitor-interval", "0.2", "-m", "difflab", *args]  # fmt: skip
    env = os.environ | {"DIFFLAB_THREADS": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finished(proc: subprocess.Popen) -> str:
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]
    return output


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
