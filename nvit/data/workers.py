"""How many DataLoader worker processes to ask for by default, from the cores this process may use."""

from __future__ import annotations

import os

#: The most workers a default asks for (the rest of the cores go to the training's own threads).
MAX_DEFAULT_WORKERS = 4


def available_cpus() -> int:
    """Cores this process may run on: its CPU affinity where the system has one (cgroups, taskset), else
    every core; the count torch's DataLoader compares the worker number with."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def local_processes() -> int:
    """Training processes on this machine: torchrun's ``LOCAL_WORLD_SIZE``, else 1."""
    raw = os.environ.get("LOCAL_WORLD_SIZE", "")
    return int(raw) if raw.isdigit() and int(raw) > 0 else 1


def default_workers(*, processes: int | None = None, cpus: int | None = None) -> int:
    """Loader workers for one of ``processes`` training processes (default: :func:`local_processes`) sharing
    this machine's ``cpus`` (default: :func:`available_cpus`).

    One core per process stays with the training itself: a process gets its share of the cores minus one,
    at most :data:`MAX_DEFAULT_WORKERS` (0 on one core, 1 on two, 4 on six or more). That is always below
    torch's suggested maximum (the available cores), so the DataLoader does not warn.
    """
    processes = local_processes() if processes is None else processes
    if processes < 1:
        raise ValueError(f"processes must be positive, got {processes}")
    share = (available_cpus() if cpus is None else cpus) // processes
    return max(0, min(MAX_DEFAULT_WORKERS, share - 1))
