"""One writer per run folder: RUN/.lock names the process that trains into it (pid and host, as JSON).

On Linux and macOS the lock is an advisory `fcntl.flock` on that file, which the kernel drops when its process
dies however it ends, so a lock left behind by a killed run is taken over (with a note) and a live one is never
broken. Where there is no `fcntl` (Windows) the file itself is the lock: created with O_CREAT | O_EXCL, taken over
only when its pid is gone on this host. The file is removed when the run ends, on errors and signals too.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from difflab.errors import DifflabError

try:
    import fcntl
except ImportError:  # Windows: fall back to an exclusive create
    fcntl = None

LOCK_FILE = ".lock"
_held: dict[Path, list] = {}  # lock path -> [open file descriptor or None, depth]: the locks this process holds


class RunLocked(DifflabError):
    """Another live process trains into the run folder."""


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[Path]:
    """Hold RUN/.lock for the duration (re-entrant within a process); refuse in one line when another live process
    holds it. Yields the lock file's path."""
    path = Path(os.path.abspath(Path(run_dir) / LOCK_FILE))
    if path in _held:
        _held[path][1] += 1
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        _held[path] = [_acquire(path), 1]
    try:
        yield path
    finally:
        _held[path][1] -= 1
        if _held[path][1] == 0:
            _release(path, _held.pop(path)[0])


def _owner_text() -> str:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname()})


def _read_owner(path: Path) -> dict:
    """The {"pid", "host"} a lock file names ({} when it is unreadable or empty)."""
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _refusal(path: Path, owner: dict) -> RunLocked:
    who = f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}"
    return RunLocked(
        f"'{path.parent}' is in use by another difflab run ({who}, lock {path}); wait for it to end or use "
        "another --out"
    )


def _note_takeover(path: Path, owner: dict) -> None:
    if owner:
        print(
            f"difflab: note: took over the stale lock of pid {owner.get('pid')} on {owner.get('host')} (that run "
            f"ended without removing it) in '{path.parent}'",
            file=sys.stderr,
        )


def _acquire(path: Path):
    return _acquire_flock(path) if fcntl is not None else _acquire_exclusive(path)


def _acquire_flock(path: Path) -> int:
    """flock RUN/.lock; retries when the file was replaced between open and lock (a run ending meanwhile)."""
    for _ in range(10):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise _refusal(path, _read_owner(path)) from None
        try:
            same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same_file = False
        if not same_file:  # the previous holder removed this file as we opened it: lock the new one
            os.close(fd)
            continue
        _note_takeover(path, _read_owner(path))
        os.ftruncate(fd, 0)
        os.write(fd, _owner_text().encode())
        os.fsync(fd)
        return fd
    raise _refusal(path, _read_owner(path))


def _pid_alive(pid: int) -> bool:
    if sys.platform == "win32":  # os.kill(pid, 0) would terminate it: assume alive, never break the lock
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _acquire_exclusive(path: Path) -> None:
    """No flock: create the file exclusively; a file naming a dead pid on this host is stale and taken over."""
    for _ in range(10):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            owner = _read_owner(path)
            pid, host = owner.get("pid"), owner.get("host")
            if not isinstance(pid, int) or host != socket.gethostname() or _pid_alive(pid):
                raise _refusal(path, owner) from None
            _note_takeover(path, owner)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        with os.fdopen(fd, "w") as f:
            f.write(_owner_text())
        return None
    raise _refusal(path, _read_owner(path))


def _release(path: Path, fd) -> None:
    with contextlib.suppress(OSError):
        path.unlink()  # before unlocking: a waiting process then locks a fresh file, never this one
    if fd is not None:
        os.close(fd)


@contextlib.contextmanager
def waiting_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created, never removed), waiting for another holder to finish: for short
    read-modify-write updates of a shared file (a checkpoint's grids.json). Without fcntl (Windows) it holds nothing."""
    if fcntl is None:
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # (closing the descriptor releases the lock)
