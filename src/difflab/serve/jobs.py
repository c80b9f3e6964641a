"""The server's work: jobs in a bounded queue, drawn by one worker thread. Compatible jobs (equal `batch_key`: same
model, sampler, steps, size, guidance) waiting together are drawn in one denoiser call per step, each sample with
its own seed (`PerSampleNoise`: the images a job gets do not depend on who it was batched with, up to float rounding).
Every step publishes the predicted x0 of each job as a PNG preview to the job's subscribers; a cancelled job leaves
its batch (the batch stops when no job is left in it)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import logging
import math
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from difflab.errors import DifflabError
from difflab.serve.requests import Generation, Limits, RequestRefused

MAX_BACKLOG = 32  # progress events kept for a subscriber that is not reading
log = logging.getLogger("difflab.serve")
FINISHED = ("done", "cancelled", "failed")
STAGING = ".staging"  # in the output folder: a job's PNGs while they are written, out of every API's reach


class QueueFull(Exception):
    """The queue holds max_queue jobs: the client should retry after `retry_after` seconds (HTTP 429)."""

    def __init__(self, retry_after: int, waiting: int):
        super().__init__(f"the server's queue is full ({waiting} jobs waiting); retry after the Retry-After seconds")
        self.retry_after = retry_after


class Job:
    """One request's life: queued -> running -> done | cancelled | failed, its progress and result files.
    Subscribers (asyncio queues of the server's event loop) receive ("progress" | final status, payload) events."""

    def __init__(self, generation: Generation):
        self.id = uuid.uuid4().hex
        self.generation = generation
        self.status, self.step, self.error = "queued", 0, None
        self.images: list[Path] = []
        self.finished = threading.Event()
        self._lock = threading.RLock()  # (re-entered: finish and subscribe describe the job while holding it)
        self._latest: dict[str, Any] | None = None  # the last progress event, for late subscribers
        self._preview: Callable[[], str] | None = None  # makes the latest step's preview
        self.started: float | None = None  # time.monotonic() when drawing began
        self._subscribers: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = []

    def describe(self) -> dict[str, Any]:
        """The job as the API shows it (read under the lock: never "done" without its images)."""
        with self._lock:
            return {"id": self.id, "status": self.status, "step": self.step, "steps": self.generation.steps,
                    "seeds": self.generation.seeds, "parameters": self.generation.parameters(), "error": self.error,
                    "images": [f"/api/jobs/{self.id}/images/{i}" for i in range(len(self.images))]}  # fmt: skip

    def subscribe(self, loop: asyncio.AbstractEventLoop) -> asyncio.Queue:
        """A queue that receives this job's events from now on, starting with its latest progress (or its end)."""
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if self.status in FINISHED:
                queue.put_nowait((self.status, self.describe()))
            else:
                if self._latest is not None:  # a late subscriber sees the latest step, with its preview
                    queue.put_nowait(("progress", dict(self._latest, preview=self.current_preview())))
                self._subscribers.append((loop, queue))
        return queue

    def watchers(self) -> int:
        """How many subscribers are listening now."""
        with self._lock:
            return len(self._subscribers)

    def unsubscribe(self, queue: asyncio.Queue) -> None:
        with self._lock:
            self._subscribers = [(lp, q) for lp, q in self._subscribers if q is not queue]

    def start(self) -> None:
        with self._lock:
            if self.status == "queued":
                self.status, self.started = "running", time.monotonic()

    def progress(self, step: int, preview: Callable[[], str]) -> None:
        """Step `step` done; `preview()` (a PNG data URL of x0-hat) is made only while someone is subscribed."""
        with self._lock:
            if self.status in FINISHED:
                return
            watched = bool(self._subscribers)
        shown = preview() if watched else None  # (made outside the lock: subscribers and cancels need not wait)
        with self._lock:
            if self.status in FINISHED:
                return
            if shown is None and self._subscribers:  # someone subscribed meanwhile
                shown = preview()
            self.status, self.step, self._preview = "running", step, preview
            self._latest = {"step": step, "steps": self.generation.steps, "preview": shown}
            self._publish("progress", self._latest)

    def current_preview(self) -> str | None:
        """The PNG data URL of the latest step's x0-hat, None before one. Made on first request when nobody was
        subscribed at that step, then kept for later requests (A1111 clients poll /sdapi/v1/progress)."""
        with self._lock:
            latest, preview = self._latest, self._preview
        if latest is None or preview is None:
            return None
        if latest["preview"] is None:
            made = preview()
            with self._lock:  # (this step's event went to nobody: its dict can take the preview)
                latest["preview"] = made
        return latest["preview"]

    def finish(
        self,
        status: str,
        error: str | None = None,
        images: list[Path] | None = None,
        commit: Callable[[], list[Path]] | None = None,
    ) -> bool:
        """End the job (once: a later call does nothing and returns False). `commit`, run under the job's lock only if
        this call ends it, publishes its images and returns their paths: a cancel cannot fall between the two."""
        with self._lock:
            if self.status in FINISHED:
                return False
            if commit is not None:
                images = commit()
            self.status, self.error, self.images = status, error, images or []
            self._latest = self._preview = None
            self._publish(status, self.describe())
            self._subscribers = []
        self.finished.set()
        return True

    def _publish(self, kind: str, payload: dict[str, Any]) -> None:
        for loop, queue in self._subscribers:
            loop.call_soon_threadsafe(deliver, queue, (kind, payload))


def deliver(queue: asyncio.Queue, event: tuple[str, dict[str, Any]]) -> None:
    """Put an event on a subscriber's queue; a reader MAX_BACKLOG events behind (stalled, connection open) skips
    progress events, so that it cannot hoard previews. The final event always arrives."""
    if event[0] == "progress" and queue.qsize() >= MAX_BACKLOG:
        return
    queue.put_nowait(event)


class JobQueue:
    """A bounded queue of jobs and the worker thread that draws them, batching compatible ones (up to max_batch
    samples per denoiser call). Finished jobs are remembered (the last `keep_jobs`) for their status and images."""

    def __init__(self, limits: Limits, out_dir: Path, *, batching: bool = True, batch_wait: float = 0.05):
        self.limits, self.out_dir, self.batching, self.batch_wait = limits, Path(out_dir), batching, batch_wait
        self._expected, self._answered_at = 0, -math.inf  # jobs expected soon after the last batch, and its end
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.drawn = {"batches": 0, "samples": 0, "seconds": 0.0}  # counters: what the worker has drawn so far
        self._pending: list[Job] = []
        self._cond = threading.Condition()
        self._stopping = self._paused = False
        self._thread = threading.Thread(target=self._work, name="difflab-serve-worker", daemon=True)
        self._thread.start()

    # ---- the API's side ---------------------------------------------------------------------------------
    def submit(self, generation: Generation) -> Job:
        """Queue a checked generation; QueueFull when max_queue jobs wait already."""
        with self._cond:
            if self._stopping:
                raise RequestRefused("the server is stopping", status=503)
            if len(self._pending) >= self.limits.max_queue:
                raise QueueFull(self._retry_after(), len(self._pending))
            job = Job(generation)
            self.jobs[job.id] = job
            self._forget_old()
            self._pending.append(job)
            self._cond.notify()
        return job

    def cancel(self, job: Job) -> None:
        """A queued job leaves the queue; a running one leaves its batch (its images are not written)."""
        with self._cond:
            if job in self._pending:
                self._pending.remove(job)
        job.finish("cancelled")

    def discard_images(self, job: Job) -> None:
        """Delete a finished job's PNGs (and its folder): an A1111 request that did not ask to save them."""
        remove_images(job.images, self.out_dir / job.id)
        job.images = []

    @contextlib.contextmanager
    def paused(self):
        """Within: the worker takes no new batch (jobs queued meanwhile are batched together when it resumes)."""
        with self._cond:
            self._paused = True
        try:
            yield
        finally:
            with self._cond:
                self._paused = False
                self._cond.notify()

    def pending(self) -> int:
        with self._cond:
            return len(self._pending)

    def running(self) -> list[Job]:
        """The jobs being drawn now."""
        return [job for job in list(self.jobs.values()) if job.status == "running"]

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            for job in self._pending:
                job.finish("cancelled", "the server stopped")
            self._pending.clear()
            self._cond.notify()
        self._thread.join(timeout=60)

    def _retry_after(self) -> int:
        """Seconds until the queue has room, from the worker's mean time per sample so far (at least 1)."""
        per_sample = self.drawn["seconds"] / max(self.drawn["samples"], 1)
        waiting = sum(job.generation.n for job in self._pending)
        return max(1, math.ceil(per_sample * waiting / max(len(self._pending), 1)))

    def _forget_old(self) -> None:
        finished = [key for key, job in self.jobs.items() if job.status in FINISHED]
        for key in finished[: max(0, len(self.jobs) - self.limits.keep_jobs)]:
            del self.jobs[key]

    # ---- the worker's side ------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._cond:
                while (not self._pending or self._paused) and not self._stopping:
                    self._cond.wait()
                self._gather()
                if self._stopping:
                    return
                if not self._pending or self._paused:  # (cancelled or paused while gathering)
                    continue
                batch = self._take_batch()
            started = time.perf_counter()
            try:
                draw_batch(batch, self.out_dir, self._answered)
            except Exception as err:  # a job's failure must not stop the server: it is reported in the job
                message = str(err) if isinstance(err, DifflabError) else f"internal error: {type(err).__name__}"
                if not isinstance(err, DifflabError):
                    log.exception("generation failed")
                self._answered(batch)
                for job in batch:
                    job.finish("failed", message)
            self.drawn["batches"] += 1
            self.drawn["samples"] += sum(job.generation.n for job in batch)
            self.drawn["seconds"] += time.perf_counter() - started

    def _answered(self, batch: list[Job]) -> None:
        """A batch is about to be answered: its clients' next requests, and those already waiting, are expected
        (counted before any client can send again)."""
        with self._cond:
            self._expected = len(batch) + len(self._pending)
            self._answered_at = time.monotonic()

    def _gather(self) -> None:
        """Within `batch_wait` seconds of a batch's end, wait (at most until then) for its clients' next requests:
        clients that send again once answered would otherwise split into groups that alternate, each drawn apart
        (measured: 8 such clients were drawn in batches of 4). A request long after the last batch waits not at all."""
        if not self.batching:
            return
        deadline = self._answered_at + self.batch_wait
        while (remaining := deadline - time.monotonic()) > 0 and self._pending and not self._stopping:
            key = self._pending[0].generation.batch_key()
            alike = [job.generation.n for job in self._pending if job.generation.batch_key() == key]
            if len(self._pending) >= self._expected or sum(alike) >= self.limits.max_batch:  # all are back, or full
                return
            self._cond.wait(remaining)

    def _take_batch(self) -> list[Job]:
        """The first waiting job and, when batching, the later ones compatible with it while they fit in max_batch."""
        first = self._pending.pop(0)
        batch, size = [first], first.generation.n
        if self.batching:
            key = first.generation.batch_key()
            for job in list(self._pending):
                if job.generation.batch_key() == key and size + job.generation.n <= self.limits.max_batch:
                    self._pending.remove(job)
                    batch.append(job)
                    size += job.generation.n
        return batch


class BatchCancelled(Exception):
    """Every job of a batch was cancelled: drawing stops."""


def draw_batch(jobs: list[Job], out_dir: Path, answering: Callable[[list[Job]], None] = lambda jobs: None) -> None:
    """Draw compatible jobs in one call of the model's sampler (all their seeds in one batch), publish each step's
    previews, write each job's PNGs (difflab JSON + A1111 parameters) under out_dir/<job id>/ and finish it
    (`answering(jobs)` is called just before the first is finished)."""
    first = jobs[0].generation
    pipe = first.model.pipe
    rows, start = [], 0
    for job in jobs:
        rows.append(slice(start, start + job.generation.n))
        start += job.generation.n
    seeds = [s for job in jobs for s in job.generation.seeds]

    def on_step(info) -> None:
        live = [(job, rows[k]) for k, job in enumerate(jobs) if job.status not in FINISHED]
        if not live:
            raise BatchCancelled
        for job, r in live:
            x0 = info.denoised[r].clone()  # (kept for a preview asked for later, e.g. by /sdapi/v1/progress)
            job.progress(info.i + 1, lambda x0=x0: preview_png(pipe, x0))

    for job in jobs:
        job.start()
    try:
        images = pipe.sample(seeds=seeds, sampler=first.sampler, grid=first.grid, steps=first.steps,
                             batch_size=len(seeds), callback=on_step, **condition(jobs), **first.options)  # fmt: skip
    except BatchCancelled:
        answering(jobs)
        return
    answering(jobs)
    for job, r in zip(jobs, rows, strict=True):
        if job.status not in FINISHED:
            staged = write_images(job, images[r], out_dir / STAGING)  # moved into out_dir/<id> only if not cancelled
            if not job.finish("done", commit=lambda s=staged, j=job: publish_images(s, out_dir / j.id)):
                remove_images(staged, out_dir / STAGING / job.id)  # cancelled while written: never reachable


def condition(jobs: list[Job]) -> dict[str, Any]:
    """The batch's conditioning keywords for `Pipeline.sample`: one prompt or class per sample, the shared guidance
    and negative prompt."""
    first = jobs[0].generation
    kind = first.model.conditioning
    settings: dict[str, Any] = {}
    if kind == "text":
        settings["prompt"] = [job.generation.prompt or "" for job in jobs for _ in job.generation.seeds]
        settings["negative_prompt"] = first.negative_prompt
    if kind == "class":
        labels = [job.generation.class_label for job in jobs for _ in job.generation.seeds]
        if first.class_label is not None:  # (no class: p(x), with the null label; batch_key keeps them apart)
            settings["cond"] = {"class_label": torch.tensor(labels)}
    if kind != "unconditional" and first.guidance is not None:
        settings["guidance"] = first.guidance
    return settings


def publish_images(staged: list[Path], folder: Path) -> list[Path]:
    """Move a job's staged folder to `folder` (one rename) and return its PNGs' new paths."""
    staged[0].parent.rename(folder)
    return [folder / p.name for p in staged]


def remove_images(paths: list[Path], folder: Path) -> None:
    """Delete a job's PNGs and then its folder (if nothing else is in it)."""
    for path in paths:
        path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        folder.rmdir()


def preview_png(pipe: Any, x0: torch.Tensor) -> str:
    """The predicted x0 of a job's samples as a PNG data URL: a row of images (a latent model's decoded)."""
    from PIL import Image

    from difflab.viz import images_to_uint8

    arrays = images_to_uint8(pipe.decode(x0.float()).clamp(-1, 1))
    strip = arrays.transpose(1, 0, 2, 3).reshape(arrays.shape[1], -1, arrays.shape[3])
    image = Image.fromarray(strip[..., 0] if strip.shape[-1] == 1 else strip)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def write_images(job: Job, images: torch.Tensor, out_dir: Path) -> list[Path]:
    """The job's images as out_dir/<job id>/seed_SSSSSSSS.png, each with its generation parameters."""
    from difflab.guidance.thresholding import thresholding_record
    from difflab.outputs import write_per_sample

    g = job.generation
    pipe = g.model.pipe
    shape = pipe.sample_shape
    meta = {"sampler": g.sampler, "steps": g.steps, "grid": g.grid, "options": g.options, "guidance": g.guidance,
            "prompt": g.prompt, "negative_prompt": g.negative_prompt,
            "class": None if g.class_label is None else str(g.class_label), "model": g.model.name,
            "checkpoint": str(Path(pipe.checkpoint).resolve()), "train_step": pipe.step,
            "model_hash": pipe.weights_hash(), "size": f"{shape[-1]}x{shape[-2]}", "first_seed": g.seeds[0],
            "batch_size": 1, "use_ema": pipe.weights is None or Path(pipe.weights).name == "ema.safetensors",
            "server_job": job.id} | thresholding_record(*pipe.thresholding())  # fmt: skip
    return write_per_sample(images, out_dir / job.id, meta, g.seeds)
