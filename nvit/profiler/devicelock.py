"""One measurement at a time on a device: an exclusive lock file that every measuring process takes.

``nvit profile``, ``nvit compare``, ``nvit export --measure`` and every job of ``nvit agent`` hold the lock of
their device (the CPU of this machine, or one GPU by UUID) while they measure, so two measurements never
overlap on one device, whichever program started them. The lock is an ``flock`` on a file under
``$NVIT_LOCK_DIR`` (default: ``<tmp>/nvit-device-locks``, shared by every user of the machine); the kernel
releases it when its holder exits, even by SIGKILL, so a crashed holder never leaves the device locked.
The file holds a line describing the current holder, shown to whoever waits.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from nvit.errors import NvitError
from nvit.vocab import DeviceKind

logger = logging.getLogger(__name__)

LOCK_DIR_ENV = "NVIT_LOCK_DIR"
_POLL_S = 0.1
_SHARED_DIR_MODE = 0o1777  # like /tmp: every user may create locks, nobody may remove another's


class DeviceBusyError(NvitError):
    """The device stayed locked by another measurement for longer than the caller would wait."""


@dataclass(frozen=True)
class DeviceLockInfo:
    """Which lock was taken and when (``time.time()`` seconds)."""

    path: Path
    acquired_at: float
    waited_s: float


def lock_dir() -> Path:
    value = os.environ.get(LOCK_DIR_ENV)
    return Path(value) if value else Path(tempfile.gettempdir()) / "nvit-device-locks"


def lock_path(kind: DeviceKind | str, cuda_index: int = 0) -> Path:
    """The lock file of a device: ``cpu.lock``, or ``cuda-<GPU UUID>.lock`` (``cuda<index>.lock`` when the
    UUID cannot be read), so two processes that number GPUs differently still share one lock per GPU."""
    kind = DeviceKind(kind)
    if kind is DeviceKind.CPU:
        return lock_dir() / "cpu.lock"
    uuid = _gpu_uuid(cuda_index)
    name = f"cuda-{uuid}" if uuid else f"cuda{cuda_index}"
    return lock_dir() / (re.sub(r"[^A-Za-z0-9.-]+", "-", name) + ".lock")


@functools.cache
def _gpu_uuid(cuda_index: int) -> str:
    with contextlib.suppress(Exception):  # no torch/CUDA here: the index is the best name there is
        from nvit.profiler.gpu_probe import gpu_uuid

        return gpu_uuid(cuda_index)
    return ""


def _open_lock_file(path: Path) -> int:
    if not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            os.chmod(path.parent, _SHARED_DIR_MODE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    with contextlib.suppress(OSError):
        os.fchmod(fd, 0o666)
    return fd


def read_holder(path: Path) -> str:
    """The description the current (or last) holder wrote, or ``""``."""
    try:
        return path.read_text().strip()
    except OSError:
        return ""


@contextlib.contextmanager
def device_lock(
    kind: DeviceKind | str,
    *,
    cuda_index: int = 0,
    holder: str = "",
    timeout_s: float | None = None,
    on_wait: Callable[[str], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> Iterator[DeviceLockInfo]:
    """Hold the exclusive lock of a device for the ``with`` block.

    Waits until the device is free (``timeout_s``: at most that long, then :class:`DeviceBusyError`);
    ``on_wait`` is called once, with the holder's description, when the device is busy. While waiting,
    ``stop`` returning True ends the wait with :class:`DeviceBusyError` too.
    """
    path = lock_path(kind, cuda_index)
    fd = _open_lock_file(path)
    start = time.monotonic()
    told = False
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                current = read_holder(path) or "another process"
                if not told:
                    told = True
                    logger.info("device %s is busy (%s); waiting", path.name, current)
                    if on_wait is not None:
                        on_wait(current)
                if timeout_s is not None and time.monotonic() - start >= timeout_s:
                    raise DeviceBusyError(f"the device is busy with {current} (lock {path}); "
                                          f"gave up after {timeout_s:g} s") from None
                if stop is not None and stop():
                    raise DeviceBusyError(f"the device is busy with {current} (lock {path}); "
                                          "stopped waiting") from None
                time.sleep(_POLL_S)
        info = DeviceLockInfo(path=path, acquired_at=time.time(), waited_s=time.monotonic() - start)
        text = f"{holder or 'nvit'} (pid {os.getpid()})\n".encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, text, 0)
        try:
            yield info
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
