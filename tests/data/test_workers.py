"""The default number of DataLoader workers follows the cores available, so torch never warns about it."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from nvit.data.workers import MAX_DEFAULT_WORKERS, available_cpus, default_workers


def _cores(monkeypatch, n: int) -> None:
    """Pretend this process may run on ``n`` cores (torch's DataLoader asks os.sched_getaffinity too)."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(n)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: n)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)


def _worker_warnings(num_workers: int) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loader = DataLoader(TensorDataset(torch.zeros(4, 1)), batch_size=2, num_workers=num_workers)  # checks
        loader.check_worker_number_rationality()  # and iterating checks again before starting the workers
    return [str(w.message) for w in caught if "worker" in str(w.message)]


def test_two_cores_get_a_default_torch_does_not_warn_about(monkeypatch) -> None:
    _cores(monkeypatch, 2)
    assert available_cpus() == 2
    assert default_workers() == 1
    assert _worker_warnings(default_workers()) == []
    assert _worker_warnings(4), "the old fixed default of 4 workers warns on 2 cores"


def test_sixteen_cores_get_workers_but_at_most_the_cap(monkeypatch) -> None:
    _cores(monkeypatch, 16)
    assert default_workers() == MAX_DEFAULT_WORKERS == 4
    assert _worker_warnings(default_workers()) == []


@pytest.mark.parametrize(("cpus", "processes", "expected"),
                         [(1, 1, 0), (2, 1, 1), (3, 1, 2), (6, 1, 4), (64, 1, 4), (16, 4, 3), (8, 4, 1), (4, 8, 0)])
def test_each_process_gets_its_share_of_the_cores_minus_one(cpus, processes, expected) -> None:
    assert default_workers(cpus=cpus, processes=processes) == expected


def test_torchrun_processes_on_one_machine_share_its_cores(monkeypatch) -> None:
    _cores(monkeypatch, 8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert default_workers() == 1
    with pytest.raises(ValueError, match="positive"):
        default_workers(processes=0)
