"""Runs users can trust (issue 11): stop signals save a checkpoint, re-saves never lose a step, one writer per run
folder, a user's folder is never taken over, corrupt checkpoints and torn logs are survived, non-finite gradients are
skipped and never saved, and --resume refuses flags that would change the run."""

import contextlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, run_cli
from safetensors.torch import load_file, save_file

from difflab.config import DataConfig, RunConfig, TrainConfig
from difflab.data import load_dataset
from difflab.errors import DifflabError
from difflab.formulations.ddpm import DDPMConfig
from difflab.nets import ModelConfig
from difflab.nets.mlp import MLPConfig
from difflab.pipeline import load
from difflab.training import checkpoint as ckpt_mod
from difflab.training import lock as lock_mod
from difflab.training.checkpoint import (
    NonFiniteCheckpoint,
    checkpoint_problem,
    latest_checkpoint,
    list_checkpoints,
    recover_checkpoints,
    save_checkpoint,
)
from difflab.training.run import train_run
from difflab.training.tasks import DenoiserTask
from difflab.training.trainer import Trainer, read_log

CPU = torch.device("cpu")
SIGNALS = [s for s in ("SIGTERM", "SIGHUP", "SIGINT") if hasattr(signal, s)]


def _config(steps=20, **train):
    data = DataConfig("moons", "points", (2,))
    model = ModelConfig("mlp", MLPConfig(data_dim=2, hidden=16, num_blocks=1, embed_dim=8), "custom")
    kw = dict(steps=steps, batch_size=32, lr=1e-3, warmup_steps=2, checkpoint_every=10, log_every=5) | train
    return RunConfig(data, model, DDPMConfig(schedule="linear", timesteps=100, prediction="eps"), TrainConfig(**kw))


@pytest.fixture(autouse=True)
def _quiet_machine(monkeypatch):
    """No oversubscription warning on a busy test machine: stderr then holds only what these tests look at."""
    monkeypatch.setattr("difflab.training.run.oversubscription_warning", lambda: None)


@pytest.fixture(scope="module")
def moons():
    return load_dataset("moons")


def _log_steps(run: Path) -> list[int]:
    return [r["step"] for r in read_log(run)]


# ---- 1. stop signals ---------------------------------------------------------------------------------------------
def test_sigterm_to_the_cli_saves_the_step_reached_exits_0_and_resumes(tmp_path, capsys):
    """A real pre-emption: `difflab train` in a subprocess gets SIGTERM; while it runs a second `difflab train` on
    the same folder is refused naming its pid."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "difflab.cli.main", "train", "--data", "moons", "--out", str(out), "--steps",
           "1000000", "--checkpoint-every", "1000000", "--no-progress", "--threads", "1"]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 90
        while not _log_steps(out) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert _log_steps(out), proc.stderr.read() if proc.poll() is not None else "no log line in 90 s"
        config_before = (out / "config.json").read_text()
        code, _, err = run_cli(capsys, "train", "--data", "moons", "--out", out, "--steps", 5, "--no-progress")
        assert_one_line_error(code, err, f"pid {proc.pid}", "in use by another difflab run")
        assert (out / "config.json").read_text() == config_before
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    lines = stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stopped by SIGTERM at step "), stdout
    step = int(lines[0].split("at step ")[1].split(";")[0])
    ckpt = out / "checkpoints" / f"step_{step:08d}"
    assert f"checkpoint: {ckpt}" in lines[0] and f"difflab train --out {out} --resume latest" in lines[0]
    assert latest_checkpoint(out) == ckpt and load(out).step == step and not (out / ".lock").exists()
    code, stdout, _ = run_cli(capsys, "train", "--out", out, "--resume", "latest", "--steps", step + 7, "--no-progress")
    assert code == 0 and f"trained {step + 7} steps" in stdout
    steps = _log_steps(out)
    assert steps[-1] == step + 7 and steps == sorted(set(steps))


@pytest.mark.parametrize("name", SIGNALS)
def test_a_stop_signal_during_training_checkpoints_the_step_reached(name, tmp_path, moons):
    sig = getattr(signal, name)
    before = signal.getsignal(sig)
    trainer = Trainer(DenoiserTask(_config(1000, checkpoint_every=1000)), moons.data, tmp_path, CPU)
    trainer.hooks.append(lambda t: os.kill(os.getpid(), sig) if t.step == 7 else None)
    result = trainer.run(progress=False)
    assert (result.stopped_by, result.signal, result.step) == ("signal", name, 7)
    assert list_checkpoints(tmp_path) == [tmp_path / "checkpoints" / "step_00000007"]
    saved = load_file(str(tmp_path / "checkpoints" / "step_00000007" / "model.safetensors"))
    for key, value in trainer.module.state_dict().items():
        assert torch.equal(saved[key], value), key
    assert signal.getsignal(sig) == before and not (tmp_path / ".lock").exists()


@pytest.mark.parametrize(("name", "code"), [("SIGINT", 130), ("SIGHUP", 0)])
def test_the_cli_reports_the_checkpoint_of_a_stop_signal(name, code, tmp_path, capsys, monkeypatch):
    from difflab.training import run as run_mod

    add_hooks = run_mod.add_hooks

    def with_a_signal(trainer, config, out):
        add_hooks(trainer, config, out)
        trainer.hooks.append(lambda t: os.kill(os.getpid(), getattr(signal, name)) if t.step == 3 else None)

    monkeypatch.setattr(run_mod, "add_hooks", with_a_signal)
    got, stdout, _ = run_cli(capsys, "train", "--data", "moons", "--out", tmp_path, "--steps", 50, "--no-progress")
    ckpt = tmp_path / "checkpoints" / "step_00000003"
    assert got == code and stdout.strip() == (
        f"stopped by {name} at step 3; checkpoint: {ckpt}; continue with: difflab train --out {tmp_path} "
        "--resume latest"
    )
    assert load(tmp_path).step == 3


# ---- 2. re-saving a step -----------------------------------------------------------------------------------------
def _tensors(value: float) -> dict:
    return {"model": {"w": torch.full((3,), value)}, "ema": {"w": torch.full((3,), value)},
            "training_state": {"n": torch.zeros(1)}}  # fmt: skip


def _value(ckpt: Path) -> float:
    return float(load_file(str(ckpt / "model.safetensors"))["w"][0])


def test_resaving_a_step_keeps_a_complete_copy_wherever_it_dies(tmp_path, monkeypatch):
    """The process 'dies' at the k-th file operation of a re-save (that and every later rename or delete fails): a
    complete copy of the step is always listed, and recover_checkpoints leaves exactly step_N behind."""
    real_rename, real_rmtree = os.rename, shutil.rmtree
    ops = {"n": 0, "die_at": math.inf}

    def op(real):
        def wrapped(*args, **kwargs):
            ops["n"] += 1
            if ops["n"] >= ops["die_at"]:
                raise OSError("killed")
            return real(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(ckpt_mod.os, "rename", op(real_rename))
    monkeypatch.setattr(ckpt_mod.shutil, "rmtree", op(real_rmtree))
    run, config = tmp_path / "count", _config()
    save_checkpoint(run, 10, config, _tensors(1.0), {"step": 10})
    ops["n"] = 0
    save_checkpoint(run, 10, config, _tensors(2.0), {"step": 10})
    total, seen_aside = ops["n"], False
    for k in range(1, total + 1):
        run = tmp_path / f"die{k}"
        ops["die_at"] = math.inf
        save_checkpoint(run, 10, config, _tensors(1.0), {"step": 10})
        ops["n"], ops["die_at"] = 0, k
        with contextlib.suppress(OSError):
            save_checkpoint(run, 10, config, _tensors(2.0), {"step": 10})
        ops["die_at"] = math.inf
        (listed,) = list_checkpoints(run)
        seen_aside |= listed.name.startswith(".old-")
        value = _value(listed)
        assert checkpoint_problem(listed, ("model.safetensors",)) is None and value in (1.0, 2.0), k
        recover_checkpoints(run)
        assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000010"], k
        assert _value(run / "checkpoints" / "step_00000010") == value
    assert seen_aside  # the dangerous moment (old copy aside, new one not yet in place) was reached


def test_resume_restores_a_checkpoint_left_aside_by_a_killed_resave(tmp_path, moons):
    Trainer(DenoiserTask(_config(10)), moons.data, tmp_path, CPU).run(progress=False)
    root = tmp_path / "checkpoints"
    (root / "step_00000010").rename(root / ".old-step_00000010-99999")
    (root / ".tmp-step_00000010-99999").mkdir()
    assert latest_checkpoint(tmp_path) == root / ".old-step_00000010-99999"
    resumed = Trainer(DenoiserTask(_config(20)), moons.data, tmp_path, CPU)
    resumed.resume()
    assert resumed.step == 10 and sorted(p.name for p in root.iterdir()) == ["step_00000010"]


# ---- 3. one writer per run folder --------------------------------------------------------------------------------
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("mechanism", ["flock", "exclusive-file"])
def test_the_run_lock_refuses_a_live_owner_and_takes_over_a_dead_one(mechanism, tmp_path, capsys, monkeypatch):
    lock_file = tmp_path / ".lock"
    lock_file.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    holder = None
    if mechanism == "flock":
        import fcntl

        holder = os.open(lock_file, os.O_RDWR)
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    else:
        monkeypatch.setattr(lock_mod, "fcntl", None)
    with pytest.raises(lock_mod.RunLocked) as refused, lock_mod.run_lock(tmp_path):
        pass
    assert f"pid {os.getpid()} on {socket.gethostname()}" in str(refused.value) and "\n" not in str(refused.value)
    if holder is not None:
        os.close(holder)  # the owner is gone; its file stays behind
    dead = _dead_pid()
    lock_file.write_text(json.dumps({"pid": dead, "host": socket.gethostname()}))
    capsys.readouterr()
    with lock_mod.run_lock(tmp_path):
        assert json.loads(lock_file.read_text())["pid"] == os.getpid()
        with lock_mod.run_lock(tmp_path):  # re-entrant within the process
            pass
        assert lock_file.exists()
    assert f"took over the stale lock of pid {dead}" in capsys.readouterr().err
    assert not lock_file.exists()


def test_the_lock_is_released_when_training_fails(tmp_path, moons):
    trainer = Trainer(DenoiserTask(_config(30)), moons.data, tmp_path, CPU)
    real_loss = trainer.task.loss_fn
    trainer.task.loss_fn = lambda d, x0, g=None, c=None: real_loss(d, x0, g, c) * math.nan
    with pytest.raises(DifflabError, match="not finite for 10 steps in a row"):
        trainer.run(progress=False)
    assert not (tmp_path / ".lock").exists()


# ---- 4. a folder that is not a difflab run ------------------------------------------------------------------------
def test_train_refuses_a_folder_that_is_not_a_difflab_run(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"learning_rate": 3}')
    code, _, err = run_cli(capsys, "train", "--data", "moons", "--out", mine, "--steps", 2, "--no-progress")
    assert_one_line_error(code, err, "not a difflab run", "config.json", "new or empty --out")
    assert (mine / "config.json").read_text() == '{"learning_rate": 3}' and sorted(os.listdir(mine)) == ["config.json"]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("x")
    code, _, err = run_cli(capsys, "train", "--data", "moons", "--out", tmp_path / "notes", "--steps", 2)
    assert_one_line_error(code, err, "not a difflab run", "todo.txt")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli(capsys, "train", "--data", "moons", "--out", empty, "--steps", 2, "--no-progress")[0] == 0
    shutil.rmtree(empty / "checkpoints")  # a difflab run killed before its first checkpoint: may be started again
    (empty / "train_log.jsonl").write_text('{"step": 900, "loss": 1.0}\n')
    assert run_cli(capsys, "train", "--data", "moons", "--out", empty, "--steps", 2, "--no-progress")[0] == 0
    assert _log_steps(empty) == [2]  # the old run's log was not continued


# ---- 5. a corrupt latest checkpoint ------------------------------------------------------------------------------
@pytest.mark.parametrize("broken", ["model.safetensors", "training_state.json"])
def test_resume_falls_back_from_a_corrupt_latest_checkpoint(broken, tmp_path, capsys, moons):
    train_run(_config(20), tmp_path, data=moons, progress=False)
    path = tmp_path / "checkpoints" / "step_00000020" / broken
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    capsys.readouterr()
    outcome = train_run(None, tmp_path, data=moons, resume=True, steps=30, progress=False)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "corrupt checkpoint" in err[0] and str(path.parent) in err[0] and broken in err[0]
    assert f"resuming from '{tmp_path / 'checkpoints' / 'step_00000010'}' (step 10)" in err[0]
    assert outcome.step == 30 and _log_steps(tmp_path) == [5, 10, 15, 20, 25, 30]
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["corrupt-step_00000020", "step_00000020", "step_00000030"]
    assert checkpoint_problem(tmp_path / "checkpoints" / "step_00000020") is None


# ---- 6. a torn log line ------------------------------------------------------------------------------------------
def test_a_torn_log_line_is_tolerated_and_resume_logs_each_step_once(tmp_path, moons):
    train_run(_config(20), tmp_path, data=moons, progress=False)
    with open(tmp_path / "train_log.jsonl", "a") as log:
        log.write('{"step": 25, "lo')  # killed mid-append
    assert _log_steps(tmp_path) == [5, 10, 15, 20]
    shutil.rmtree(tmp_path / "checkpoints" / "step_00000020")  # the kill came before the step-20 checkpoint
    train_run(None, tmp_path, data=moons, resume=True, steps=20, progress=False)
    lines = (tmp_path / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [5, 10, 15, 20]


# ---- 7. non-finite gradients -------------------------------------------------------------------------------------
def test_non_finite_gradients_skip_the_step_and_are_never_saved(tmp_path, moons):
    trainer = Trainer(DenoiserTask(_config(20)), moons.data, tmp_path, CPU)
    calls = {"n": 0}

    def poison(grad):  # a finite loss whose gradients are NaN on the 4th and 5th backward passes
        calls["n"] += 1
        return grad * math.nan if calls["n"] in (4, 5) else grad

    next(trainer.module.parameters()).register_hook(poison)
    trainer.run(progress=False)
    assert trainer.step == 20 and trainer.skipped == 2 and calls["n"] == 22
    assert all(torch.isfinite(p).all() for p in trainer.module.parameters())
    assert all(torch.isfinite(v).all() for v in trainer.ema.state_dict().values())
    for ckpt in list_checkpoints(tmp_path):
        for name in ("model.safetensors", "ema.safetensors"):
            assert all(torch.isfinite(v).all() for v in load_file(str(ckpt / name)).values())
    assert read_log(tmp_path)[-1]["skipped_steps"] == 2

    with torch.no_grad():
        next(trainer.module.parameters())[0] = math.inf
    trainer.step = 21
    with pytest.raises(NonFiniteCheckpoint, match="refusing to write the checkpoint of step 21"):
        trainer.save()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000010", "step_00000020"]


# ---- 8. flags --resume cannot honour -----------------------------------------------------------------------------
def test_resume_refuses_flags_that_change_the_run_and_names_the_ones_it_ignores(tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli(capsys, "train", "--data", "moons", "--out", run, "--steps", 2, "--no-progress")[0] == 0
    code, _, err = run_cli(capsys, "train", "--out", run, "--resume", "latest", "--data", "digits", "--lr", "0.5",
                           "--model", "base", "--timesteps", 50)  # fmt: skip
    assert_one_line_error(code, err, "--data digits (the run has moons)", "--model base (the run has tiny)",
                          "--timesteps 50 (the run has 1000)", "new --out")  # fmt: skip
    assert "--lr" not in err and load(run).step == 2
    code, out, err = run_cli(capsys, "train", "--out", run, "--resume", "latest", "--data", "moons", "--steps", 4,
                             "--lr", "0.5", "--batch-size", 8, "--seed", 0, "--no-progress")  # fmt: skip
    assert code == 0 and "trained 4 steps" in out
    assert err.strip() == (
        "difflab train: warning: --resume latest keeps the run's saved settings and ignores --batch-size 8 (the run "
        "has 256), --lr 0.5 (the run has 0.001)"
    )
    assert load(run).config.train.lr == 1e-3 and load(run).step == 4
    code, _, err = run_cli(capsys, "train", "--out", tmp_path / "new", "--steps", 2)
    assert_one_line_error(code, err, "give the data to train on: --data")


def test_a_reentrant_lock_sees_no_interleaving_from_the_api(tmp_path, moons):
    """train_run holds the lock while a nested Trainer.run takes it again: one process, one writer."""
    with lock_mod.run_lock(tmp_path):
        outcome = train_run(_config(5), tmp_path, data=moons, progress=False)
        assert outcome.step == 5 and (tmp_path / ".lock").exists()
    assert not (tmp_path / ".lock").exists()


def _signal_at_step(monkeypatch, step: int, name: str = "SIGTERM") -> None:
    """Every Trainer built from now on sends itself `name` once it reaches `step`."""
    init = Trainer.__init__

    def init_with_a_signal(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.hooks.append(lambda t: os.kill(os.getpid(), getattr(signal, name)) if t.step == step else None)

    monkeypatch.setattr(Trainer, "__init__", init_with_a_signal)


def test_a_stop_signal_ends_the_demo_after_its_checkpoint(tmp_path, capsys, monkeypatch):
    _signal_at_step(monkeypatch, 2)
    with pytest.raises(SystemExit) as stopped:
        run_cli(capsys, "demo", "--steps", 40, "--out", tmp_path, "--no-progress")
    assert stopped.value.code == 0
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step_00000002"
    assert f"stopped by SIGTERM at step 2; checkpoint: {ckpt}" in capsys.readouterr().out
    assert load(run).step == 2
    assert not list(tmp_path.glob("samples_*.png"))  # nothing sampled after the signal


def test_a_stop_signal_ends_classifier_training_with_its_checkpoint(tmp_path, capsys, monkeypatch):
    _signal_at_step(monkeypatch, 3, "SIGINT")
    code, out, _ = run_cli(capsys, "train-classifier", "--data", "moons", "--out", tmp_path, "--steps", 40,
                           "--no-progress")  # fmt: skip
    assert code == 130
    assert out.strip() == (f"stopped by SIGINT at step 3; checkpoint: {tmp_path / 'checkpoints' / 'step_00000003'}; "
                           "it works as --classifier; to train longer, start a new --out")  # fmt: skip
    assert list_checkpoints(tmp_path) == [tmp_path / "checkpoints" / "step_00000003"]


def test_resume_refuses_weights_of_another_shape_naming_the_tensor(tmp_path, capsys):
    code, _, _ = run_cli(capsys, "train", "--data", "moons", "--out", tmp_path, "--steps", 4, "--no-progress")
    assert code == 0
    ema = tmp_path / "checkpoints" / "step_00000004" / "ema.safetensors"
    tensors = load_file(str(ema))
    name = next(k for k, v in tensors.items() if v.ndim == 2)
    tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, str(ema))
    code, _, err = run_cli(capsys, "train", "--out", tmp_path, "--resume", "latest", "--steps", 8, "--no-progress")
    assert_one_line_error(code, err, str(ema), f"tensor '{name}' has shape")


def test_resume_refuses_a_changed_attention_level_count_or_training_noise_level(tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--data", "digits", "--process", "edm", "--out", run, "--steps", 1,
                           "--batch-size", 4, "--no-progress")  # fmt: skip
    assert code == 0, err
    code, _, err = run_cli(capsys, "train", "--out", run, "--resume", "latest", "--attention-levels", 2,
                           "--p-mean", 0.4, "--p-std", 1.2)  # fmt: skip
    assert_one_line_error(code, err, "--attention-levels 2 (the run has 1)", "--p-mean 0.4 (the run has -1.2)")
    assert "--p-std" not in err and load(run).step == 1  # the same value as the run's is no change
    code, _, err = run_cli(capsys, "train", "--out", run, "--resume", "latest", "--attention-levels", 1,
                           "--p-mean", -1.2, "--steps", 2, "--no-progress")  # fmt: skip
    assert code == 0, err
    assert load(run).step == 2
