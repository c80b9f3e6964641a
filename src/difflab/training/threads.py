"""CPU threads: torch's intra-op threads default to the physical cores this process may use; on an oversubscribed
machine (load above those cores) extra threads mostly wait for each other, so training says so once."""

from __future__ import annotations

import os
from pathlib import Path


def available_cpus() -> set[int]:
    """The logical CPUs this process may run on."""
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return set(range(os.cpu_count() or 1))


def physical_cores() -> int:
    """Physical cores among the CPUs this process may use (hyper-threads of one core count once)."""
    cpus = available_cpus()
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text(), (topology / "core_id").read_text()))
        except OSError:
            return len(cpus)
    return max(1, len(cores))


def default_threads() -> int:
    """$DIFFLAB_THREADS if set (the test suite sets 1), else the physical cores this process may use, shared by the
    processes torchrun started on this machine (LOCAL_WORLD_SIZE)."""
    value = os.environ.get("DIFFLAB_THREADS")
    return int(value) if value else max(1, physical_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def set_threads(n: int | None) -> int:
    """Set torch's intra-op threads to n (default: `default_threads()`); returns the number set."""
    import torch

    n = default_threads() if n is None else n
    if n < 1:
        from difflab.errors import DifflabError

        raise DifflabError(f"--threads must be at least 1, got {n}")
    torch.set_num_threads(n)
    return n


def oversubscription_warning() -> str | None:
    """A one-line warning when the 1-minute load average exceeds the cores available, else None."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return None
    cores = len(available_cpus())
    if load <= cores:
        return None
    import torch

    hint = "; --threads 1 often helps on a busy machine" if torch.get_num_threads() > 1 else ""
    return f"the machine is oversubscribed (load {load:.1f} on {cores} cores): training throughput is limited{hint}"
