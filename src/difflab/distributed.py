"""Data parallelism under torchrun (PyTorch's torch.distributed: gloo on CPUs, NCCL on GPUs): the group a process
belongs to, the few collectives training and sampling need, and batch draws that are the same under any world size.

A process started by `torchrun` (RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR in its environment) joins the group with
`join`; any other process is a world of one and nothing here communicates. Random draws of a loss go through `randn`,
`rand`, `randint` and `multinomial`: inside `sharded_draws(world)` each rank draws the *global* batch's values from
the (identically seeded) generator and keeps its own rows, so 2 ranks x batch B/2 see exactly the noise that 1 process
x batch B sees; outside it they are torch's own functions.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from difflab.errors import DifflabError

T = TypeVar("T")
TIMEOUT = datetime.timedelta(minutes=30)  # a collective that waits longer than this fails (a rank is gone)


@dataclass(frozen=True)
class World:
    """This process's place in the data-parallel group: rank in [0, size), its rank on this machine, and whether it
    talks to others (size > 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes logs, checkpoints and outputs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def any(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag or-ed over the ranks (one all-reduce): decisions every rank takes together."""
        if not self.distributed:
            return tuple(bool(f) for f in flags)
        t = torch.tensor([float(f) for f in flags], device=_collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return tuple(bool(v) for v in t.tolist())

    def mean(self, value: float) -> float:
        """The mean of a number over the ranks (a loss for the log: equal shards make it the global batch's mean)."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=_collective_device())
        dist.all_reduce(t)
        return t.item() / self.size

    def gather(self, obj: T) -> list[T]:
        """Every rank's `obj` (picklable), in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def gather_to_main(self, obj: T) -> list[T] | None:
        """Every rank's `obj` (picklable), in rank order, on rank 0; None on the others."""
        if not self.distributed:
            return [obj]
        out: list[Any] | None = [None] * self.size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def from_main(self, fn: Callable[[], T]) -> T:
        """fn() run by rank 0 alone, its result (or its DifflabError, raised on every rank) handed to every rank:
        the decisions that read or repair the run folder (which checkpoint to resume) are taken once."""
        if not self.distributed:
            return fn()
        message: list[Any] = [None]
        if self.is_main:
            try:
                message = [("ok", fn())]
            except DifflabError as err:
                message = [("error", str(err))]
        dist.broadcast_object_list(message, src=0)
        kind, value = message[0]
        if kind == "error":
            raise DifflabError(value)
        return value

    def shard(self, items: Sequence[T]) -> list[T]:
        """The items this rank takes when `items` (e.g. a sampler's batches) are dealt round-robin."""
        return list(items[self.rank :: self.size])

    def seed_share(self, seed: int, n: int, batch_size: int) -> list[int]:
        """This rank's seeds of range(seed, seed + n): the batches dealt round-robin whole, so every sample is drawn in
        the batch one process draws it in (batched matmuls round by batch size: the same pixels)."""
        starts = range(seed, seed + n, batch_size)
        return [s for start in self.shard(starts) for s in range(start, min(start + batch_size, seed + n))]


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"))


def restart_count() -> int:
    """How often torchrun (--max-restarts) has restarted this group after a failure: 0 on the first attempt."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if launched_by_torchrun() else 1


def current_world() -> World:
    """The group this process has joined (a world of one when it has not)."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def join(device: torch.device) -> tuple[World, torch.device]:
    """Join torchrun's group (NCCL for CUDA, else gloo) once, and return it with this rank's device (cuda:LOCAL_RANK
    for CUDA). Outside torchrun: a world of one and `device` unchanged."""
    if not launched_by_torchrun():
        return World(), device
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        dist.init_process_group(backend, store=_attempt_store(rank, size), rank=rank, world_size=size,
                                timeout=TIMEOUT, device_id=device if device.type == "cuda" else None)  # fmt: skip
    return current_world(), device


def leave() -> None:
    """Leave the process group at the end of a command. Exiting with the group still up let a rank's interpreter
    shutdown race gloo's threads (seen in CI: a rank that had finished aborted, "terminate called without an active
    exception", and torchrun failed the run)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _attempt_store(rank: int, size: int) -> dist.Store:
    """torchrun's key-value store (MASTER_ADDR:MASTER_PORT; the agent's, or rank 0's outside torchrun's agent), its
    keys under this attempt's prefix: a group restarted after a failure (--max-restarts) must not read the addresses
    its dead predecessors published there (static rendezvous keeps one store across restarts; measured here: the
    restarted ranks connected to a dead rank's port and failed)."""
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), size,
                          is_master=not agent_store and rank == 0, timeout=TIMEOUT)  # fmt: skip
    return dist.PrefixStore(f"difflab/attempt_{restart_count()}", store)


def training_network(module: torch.nn.Module, device: torch.device, world: World, compile: bool):
    """What the loss runs instead of `module`: DistributedDataParallel around it for a group of ranks (gradients
    averaged during backward), torch.compile around that with `compile`."""
    net = module
    if world.distributed:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        net = DistributedDataParallel(module, device_ids=ids)
    return torch.compile(net) if compile else net


def _collective_device() -> torch.device:
    """Where a collective's tensors must live: the GPU for NCCL, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---- batch draws that do not depend on the world size --------------------------------------------------------------
_SHARD: contextvars.ContextVar[World | None] = contextvars.ContextVar("difflab_sharded_draws", default=None)


@contextlib.contextmanager
def sharded_draws(world: World) -> Iterator[None]:
    """Within: the draw functions below return this rank's rows of the global batch's draws (a no-op for one rank)."""
    token = _SHARD.set(world if world.distributed else None)
    try:
        yield
    finally:
        _SHARD.reset(token)


def _draw(fn: Callable[..., torch.Tensor], size: Sequence[int], batch_dim: int, **kwargs: Any) -> torch.Tensor:
    world = _SHARD.get()
    if world is None:
        return fn(tuple(size), **kwargs)
    size = list(size)
    rows = size[batch_dim]
    size[batch_dim] = rows * world.size
    return fn(tuple(size), **kwargs).narrow(batch_dim, world.rank * rows, rows)


def randn(*size: int, batch_dim: int = 0, **kwargs: Any) -> torch.Tensor:
    """torch.randn(size, **kwargs), the global batch's draw cut to this rank's rows along `batch_dim`."""
    return _draw(torch.randn, _flat(size), batch_dim, **kwargs)


def rand(*size: int, batch_dim: int = 0, **kwargs: Any) -> torch.Tensor:
    """torch.rand, as `randn`."""
    return _draw(torch.rand, _flat(size), batch_dim, **kwargs)


def randint(low: int, high: int, size: Sequence[int], batch_dim: int = 0, **kwargs: Any) -> torch.Tensor:
    """torch.randint(low, high, size, **kwargs), as `randn`."""
    return _draw(lambda s, **kw: torch.randint(low, high, s, **kw), size, batch_dim, **kwargs)


def multinomial(probs: torch.Tensor, n: int, **kwargs: Any) -> torch.Tensor:
    """torch.multinomial(probs (K,), n, **kwargs), as `randn`."""
    return _draw(lambda s, **kw: torch.multinomial(probs, s[0], **kw), (n,), 0, **kwargs)


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """The global batch's rows of a per-sample tensor (rank order, as the draws): what a loss's own statistics (iDDPM's
    loss history) record, so that every rank keeps the same history as one process would."""
    world = _SHARD.get()
    if world is None:
        return t
    parts = [torch.empty_like(t) for _ in range(world.size)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def _flat(size: tuple) -> tuple[int, ...]:
    return tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
