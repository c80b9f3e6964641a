"""The training loop (Ho et al. 2020, Algorithm 1): AdamW with warm-up, EMA, clipping, mixed precision,
non-finite loss and gradient guard, JSONL log, atomic checkpoints, exact resume, one writer per run folder (RUN/.lock)
and a checkpoint on SIGTERM, SIGHUP or Ctrl-C before stopping. What is trained is a task
(`difflab.training.tasks`): a formulation's denoiser, or a noise-aware classifier; the loop is the same.

Under torchrun (`difflab.distributed`) the loop is data-parallel with DistributedDataParallel: every rank draws the
global batch's indices and noise from the same generators and keeps its own rows (`distributed.sharded_draws`), the
gradients are averaged, a non-finite loss on any rank or a stop signal to any rank is one all-reduced flag that every
rank obeys, and only rank 0 writes the log and the checkpoints; the checkpoint holds every rank's global RNG."""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from difflab import distributed
from difflab.atomic import write_text_atomic
from difflab.conditioning import drop_signals
from difflab.errors import DifflabError
from difflab.training.checkpoint import (
    check_run_folder,
    load_tensors,
    optimizer_from_tensors,
    optimizer_to_tensors,
    recover_checkpoints,
    resume_checkpoint,
    save_checkpoint,
)
from difflab.training.ema import EMA
from difflab.training.lock import run_lock
from difflab.weights import check_header

MAX_NONFINITE_IN_A_ROW = 10
LOG_FILE = "train_log.jsonl"
TASK_STATE = "task_state"  # a task's own training state in a checkpoint: task_state.safetensors
# What schedulers send on pre-emption (TERM), a closed terminal (HUP) and Ctrl-C (INT): finish the step, save, stop.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP", "SIGINT") if hasattr(signal, name))


class TrainingDiverged(DifflabError):
    """The loss or the gradients were not finite for too many steps in a row."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    skipped_steps: int
    stopped_by: str  # "steps", "minutes" or "signal" (a checkpoint of the step reached was saved first)
    signal: str | None = None  # the signal's name (SIGTERM, SIGHUP, SIGINT) when stopped_by == "signal"


def _autocast(device: torch.device, mixed_precision: str):
    if mixed_precision == "no":
        return torch.autocast(device.type, enabled=False)
    if mixed_precision == "fp16" and device.type != "cuda":
        raise DifflabError("--mixed-precision fp16 needs a CUDA device; use bf16 or no on this machine")
    if mixed_precision not in ("fp16", "bf16"):
        raise DifflabError(f"unknown --mixed-precision '{mixed_precision}': choose no, bf16 or fp16")
    return torch.autocast(device.type, dtype=torch.float16 if mixed_precision == "fp16" else torch.bfloat16)


class Trainer:
    """Trains `task.module` on in-memory data (N, *sample_shape) in [-1, 1], writing to run_dir. `cond_data` maps
    signal names to row-aligned tensors (e.g. {"class_label": (N,) int64}); each step hands the task the batch's rows
    of the signals it trains on, a share of each nulled by its dropout (Ho & Salimans 2022, Alg. 1)."""

    def __init__(
        self,
        task,
        data: torch.Tensor,
        run_dir: Path,
        device: torch.device,
        cond_data: dict[str, torch.Tensor] | None = None,
        world: distributed.World | None = None,
        compile: bool = False,
    ):
        self.task, self.config, self.run_dir, self.device = task, task.config, Path(run_dir), device
        self.train_config = tc = task.config.train
        if tc.steps is None and tc.minutes is None:
            raise DifflabError("give a training budget: --steps N or --minutes M")
        _autocast(device, tc.mixed_precision)  # validate early
        self.world = world or distributed.World()
        if tc.batch_size % self.world.size:
            raise DifflabError(f"the batch size {tc.batch_size} (the global batch) does not split over "
                               f"{self.world.size} processes; pass a multiple of {self.world.size}")  # fmt: skip
        check_run_folder(self.run_dir)  # new, empty or a difflab run: never a user's own folder
        self.data = data
        missing = [name for name in task.signals if name not in (cond_data or {})]
        if missing:
            raise DifflabError(
                f"the model is conditioned on {', '.join(missing)} but the data carry none; use labelled data "
                "(digits or a labelled toy) or train without --conditional"
            )
        self.cond_data = {name: cond_data[name] for name in task.signals} if task.signals else None
        task.to(device)
        self.module = task.module
        if self.world.distributed or compile:
            task.training_network = distributed.training_network(self.module, device, self.world, compile)
        params = self.module.parameters()
        self.optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda", enabled=tc.mixed_precision == "fp16")
        self.ema = EMA(self.module, tc.ema_decay)
        self.data_gen = torch.Generator().manual_seed(tc.seed)
        self.noise_gen = torch.Generator(device).manual_seed(tc.seed + 1)
        self.step = 0
        self.skipped = 0
        self.elapsed = 0.0
        self.last_loss = math.nan
        self.extra_state: dict = {}  # JSON-able figures saved with the next checkpoint (e.g. test accuracy)
        self.hooks: list = []  # callables hook(trainer) run after every step (previews, TensorBoard)
        self.stop_signal: str | None = None  # set by a stop signal during run(): stop after the current step
        self.saved_step: int | None = None  # the step of the checkpoint last saved or resumed from

    # ---- state -----------------------------------------------------------------------------------------
    def _rng_tensors(self) -> dict[str, torch.Tensor]:
        """The generators' states; the global RNG (dropout) of every rank (rank r's under "rng.torch_cpu.r")."""
        rng = {"rng.data": self.data_gen.get_state(), "rng.noise": self.noise_gen.get_state()}
        global_states = self.world.gather(torch.get_rng_state())
        rng["rng.torch_cpu"] = global_states[0]
        rng |= {f"rng.torch_cpu.{r}": s for r, s in enumerate(global_states) if r > 0}
        if self.device.type == "cuda":
            rng["rng.torch_cuda"] = torch.cuda.get_rng_state(self.device)
        return rng

    def save(self) -> Path | None:
        """Write a checkpoint of the current step (rank 0; every rank takes part, handing over its RNG state)."""
        rng = self._rng_tensors()
        self.saved_step = self.step
        if not self.world.is_main:
            return None
        opt_tensors, opt_meta = optimizer_to_tensors(self.optimizer.state_dict())
        state_tensors = {f"optimizer.{k}": v for k, v in opt_tensors.items()} | rng
        meta = {
            "step": self.step,
            "skipped_steps": self.skipped,
            "elapsed_s": self.elapsed,
            "optimizer": opt_meta,
        }
        meta["grad_scaler"] = self.scaler.state_dict() if self.scaler.is_enabled() else None
        meta |= self.extra_state
        tensors = {
            "model": self.module.state_dict(),
            "ema": self.ema.state_dict(),
            "training_state": state_tensors,
        }
        tensors |= self.task.frozen_tensors() if hasattr(self.task, "frozen_tensors") else {}
        task_state = self.task.state_tensors() if hasattr(self.task, "state_tensors") else {}
        tensors |= {TASK_STATE: task_state} if task_state else {}
        return save_checkpoint(self.run_dir, self.step, self.config, tensors, meta, self.train_config.keep_checkpoints)

    def resume(self, ckpt: Path | None = None) -> None:
        """Continue from `ckpt`, by default the latest intact checkpoint in run_dir (a corrupt newer one is set
        aside with a warning on stderr): model, EMA, optimizer, step, every RNG."""
        if ckpt is None:
            ckpt = self.world.from_main(self._latest_intact)
        if ckpt is None:
            raise DifflabError(f"--resume latest: no checkpoint in '{self.run_dir}'; start without --resume")
        self.task.check_resume(ckpt)
        expected = self.module.state_dict()  # names, shapes, dtypes: checked from the headers before reading
        for name in ("model", "ema"):
            check_header(ckpt / f"{name}.safetensors", expected)
        self.module.load_state_dict(load_tensors(ckpt / "model.safetensors"))
        self.ema.load_state_dict(load_tensors(ckpt / "ema.safetensors"))
        state = load_tensors(ckpt / "training_state.safetensors")
        meta = json.loads((ckpt / "training_state.json").read_text())
        opt = {k.removeprefix("optimizer."): v for k, v in state.items() if k.startswith("optimizer.")}
        self.optimizer.load_state_dict(optimizer_from_tensors(opt, meta["optimizer"]))
        if meta.get("grad_scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(meta["grad_scaler"])
        self.data_gen.set_state(state["rng.data"])
        self.noise_gen.set_state(state["rng.noise"])
        torch.set_rng_state(state.get(f"rng.torch_cpu.{self.world.rank}", state["rng.torch_cpu"]))
        if self.device.type == "cuda" and "rng.torch_cuda" in state:
            torch.cuda.set_rng_state(state["rng.torch_cuda"], self.device)
        self.step, self.skipped, self.elapsed = meta["step"], meta["skipped_steps"], meta["elapsed_s"]
        self.saved_step = self.step
        task_state = self.task.state_tensors() if hasattr(self.task, "state_tensors") else {}
        if task_state:  # a task's own training state (a target network, a loss history)
            path = ckpt / f"{TASK_STATE}.safetensors"
            check_header(path, task_state)
            self.task.load_state_tensors(load_tensors(path))

    def _latest_intact(self) -> Path | None:
        with run_lock(self.run_dir):
            ckpt, warning = resume_checkpoint(self.run_dir)
        if warning:
            print(f"difflab: warning: {warning}", file=sys.stderr)
        return ckpt

    # ---- one step --------------------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        """Linear warm-up to the base learning rate, then the schedule: constant, or a cosine / linear decay to 0 at
        the end of the budget (budgeted training, Li et al. 2020): the share of --steps done, or of --minutes where no
        step count is given, whichever is further when both are."""
        tc = self.train_config
        warm = min(1.0, (step + 1) / max(1, tc.warmup_steps))
        if tc.lr_schedule == "constant":
            return tc.lr * warm
        done = [step / tc.steps] if tc.steps is not None else []
        done += [self.elapsed / (60 * tc.minutes)] if tc.minutes is not None else []
        left = 1.0 - min(1.0, max(done))
        decay = left if tc.lr_schedule == "linear" else 0.5 * (1.0 - math.cos(math.pi * left))
        return tc.lr * warm * decay

    def train_step(self) -> float:
        """One optimisation step; returns the loss, or NaN/inf if the step was skipped (a non-finite loss or
        gradient norm: weights, optimizer state and EMA are left as they were)."""
        tc = self.train_config
        idx = torch.randint(0, len(self.data), (tc.batch_size,), generator=self.data_gen)
        rows = tc.batch_size // self.world.size
        idx = idx[self.world.rank * rows : (self.world.rank + 1) * rows]  # this rank's shard of the global batch
        x0 = self.data[idx].to(self.device, non_blocking=True)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        if hasattr(self.task, "begin_step"):  # a task whose loss changes with the step (consistency training's N)
            self.task.begin_step(self.step)
        with distributed.sharded_draws(self.world):
            cond = None
            if self.cond_data is not None:
                cond = {k: v[idx].to(self.device) for k, v in self.cond_data.items()}
                cond = drop_signals(cond, self.task.dropout, self.noise_gen)
            with _autocast(self.device, tc.mixed_precision):
                loss = self.task.loss(x0, cond, self.noise_gen).mean()
        self.optimizer.zero_grad(set_to_none=True)
        nonfinite = not torch.isfinite(loss).item()
        if self.world.distributed:  # every rank runs backward: DDP averages the gradients there, once per forward
            self.scaler.scale(loss).backward()
            (nonfinite,) = self.world.any(nonfinite)  # a non-finite loss on any rank skips the step on all
        if nonfinite:
            self.optimizer.zero_grad(set_to_none=True)
            return math.nan
        if not self.world.distributed:
            self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), tc.grad_clip)  # (averaged: the same on all)
        if not self.scaler.is_enabled() and not torch.isfinite(norm):  # (fp16's scaler skips such steps itself)
            self.optimizer.zero_grad(set_to_none=True)
            return math.nan
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.ema.update(self.module, self.step)
        if hasattr(self.task, "end_step"):  # e.g. consistency distillation's target network follows the weights
            self.task.end_step(self.step)
        return loss.item()

    # ---- the loop --------------------------------------------------------------------------------------
    def _log(self, log, window: list[float]) -> float:
        """Append one JSONL record (rank 0): the mean loss of the steps since the last record, over every rank's
        shard; returns it."""
        record = {
            "step": self.step,
            "loss": self.world.mean(sum(window) / len(window)),
            "lr": self.lr_at(self.step - 1),
        }
        if log is None:
            return record["loss"]
        record |= {"elapsed_s": round(self.elapsed, 2), "skipped_steps": self.skipped}
        record |= getattr(self.task, "log_values", {})  # a task's own figures of its last step (loss parts)
        log.write(json.dumps(record) + "\n")
        log.flush()
        return record["loss"]

    def run(self, progress: bool = True) -> TrainResult:
        """Train to the budget holding RUN/.lock. SIGTERM, SIGHUP and SIGINT (in the main thread) stop the run after
        the current step with a checkpoint of that step: stopped_by "signal", the signal's name in `signal`."""
        main = self.world.is_main  # the one writer of a data-parallel group
        with run_lock(self.run_dir) if main else contextlib.nullcontext(), self._stop_signals_caught():
            if main:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                recover_checkpoints(self.run_dir)
                write_text_atomic(self.run_dir / "config.json", self.config.to_json())
                truncate_log(self.run_dir, self.step)
            tc = self.train_config
            bar = tqdm(total=tc.steps, initial=self.step, disable=not (progress and main), desc="train",
                       dynamic_ncols=True)  # fmt: skip
            self.module.train()
            with open(self.run_dir / LOG_FILE, "a") if main else contextlib.nullcontext() as log:
                stopped_by = self._loop(log, bar)
            bar.close()
            if self.saved_step != self.step:
                self.save()
        stop_signal = self.stop_signal if stopped_by == "signal" else None  # (one during the final save is moot)
        return TrainResult(self.run_dir, self.step, self.skipped, stopped_by, stop_signal)

    def _loop(self, log, bar) -> str:
        """Steps until the budget or a stop signal; returns what stopped it."""
        tc = self.train_config
        total, budget_s = tc.steps, tc.minutes * 60 if tc.minutes is not None else math.inf
        start, start_elapsed = time.monotonic(), self.elapsed
        in_a_row, window, stopped_by = 0, [], "steps"
        while total is None or self.step < total:
            self.elapsed = start_elapsed + time.monotonic() - start
            if tc.minutes is not None:  # one clock on every rank: the budget and a decaying learning rate read it
                self.elapsed = self.world.mean(self.elapsed)
            signalled, over_budget = self.world.any(self.stop_signal is not None, self.elapsed >= budget_s)
            if signalled or over_budget:  # (a signal to any rank stops every rank)
                stopped_by = "signal" if signalled else "minutes"
                self.stop_signal = self.stop_signal or ("SIGTERM" if signalled else None)
                break
            loss = self.train_step()
            if not math.isfinite(loss):
                self.skipped, in_a_row = self.skipped + 1, in_a_row + 1
                if in_a_row >= MAX_NONFINITE_IN_A_ROW:
                    raise TrainingDiverged(
                        f"loss or gradients were not finite for {in_a_row} steps in a row at step {self.step}; "
                        "lower --lr or use --mixed-precision no (last good checkpoint kept)"
                    )
                continue
            in_a_row = 0
            self.step += 1
            window.append(loss)
            self.last_loss = loss
            bar.update(1)
            if self.step % tc.log_every == 0 or self.step == total:
                bar.set_postfix(loss=f"{self._log(log, window):.4f}")
                window = []
            if self.step % tc.checkpoint_every == 0:
                self.save()
            for hook in self.hooks if self.world.is_main else ():  # previews, TensorBoard: rank 0's
                hook(self)
        if window:  # the budget or a signal ended between log lines: record the partial window
            self._log(log, window)
        return stopped_by

    @contextlib.contextmanager
    def _stop_signals_caught(self):
        """While training, a stop signal only sets `stop_signal`; a second Ctrl-C raises KeyboardInterrupt at once.
        Python handles signals in the main thread only: elsewhere the process's handlers are left alone."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self.stop_signal is not None and signum == getattr(signal, "SIGINT", None):
                raise KeyboardInterrupt
            self.stop_signal = signal.Signals(signum).name

        previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
        self.stop_signal = None
        for s in STOP_SIGNALS:
            signal.signal(s, handler)
        try:
            yield
        finally:
            for s, old in previous.items():
                signal.signal(s, old if old is not None else signal.SIG_DFL)


def truncate_log(run_dir: Path, step: int) -> None:
    """Keep the log records up to `step` (the checkpoint a run continues from) and drop a torn last line: a resumed
    run then logs each step once. Rewritten atomically, only when something changes."""
    path = Path(run_dir) / LOG_FILE
    if not path.exists():
        return
    text = path.read_text(errors="replace")
    kept = "".join(json.dumps(r) + "\n" for r in read_log(run_dir) if r.get("step", 0) <= step)
    if kept != text:
        write_text_atomic(path, kept)


def read_log(run_dir: Path) -> list[dict]:
    """The JSONL training log of a run, as a list of records; a torn line (a run killed mid-append, a full disk) is
    left out."""
    path = Path(run_dir) / LOG_FILE
    records = []
    for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records
