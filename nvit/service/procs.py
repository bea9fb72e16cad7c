"""Stopping the child processes the service and its tools start (agents, servers, workers)."""

from __future__ import annotations

import subprocess
from typing import Any


def stop_process(proc: subprocess.Popen[Any], *, timeout_s: float = 15.0) -> None:
    """SIGTERM ``proc`` if it still runs, wait ``timeout_s`` for it to exit cleanly, then kill it."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
