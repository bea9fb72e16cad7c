"""The per-device measurement lock: exclusive across processes, released when its holder dies (even by
SIGKILL), and taken by ``nvit profile`` so a local profile never overlaps an agent's measurement."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import lut_fakes as fk
import pytest
from cli_run import run_cli

from nvit.profiler.devicelock import DeviceBusyError, device_lock, lock_path, read_holder
from nvit.profiler.space import save_space
from nvit.vocab import DeviceKind

HOLD = (
    "import sys, time\n"
    "from nvit.profiler.devicelock import device_lock\n"
    "with device_lock('cpu', holder='test holder') as info:\n"
    "    print(info.acquired_at, flush=True)\n"
    "    time.sleep(float(sys.argv[1]))\n"
    "    print(time.time(), flush=True)\n"
    "time.sleep(60)\n"
)


@pytest.fixture
def lock_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NVIT_LOCK_DIR", str(tmp_path / "locks"))
    return tmp_path / "locks"


def holder_process(seconds: float) -> tuple[subprocess.Popen[str], float]:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(seconds)], stdout=subprocess.PIPE, text=True,
                            env=os.environ.copy())
    acquired = float(proc.stdout.readline())
    return proc, acquired


def test_the_lock_is_exclusive_across_processes_and_names_its_holder(lock_dir) -> None:
    proc, _ = holder_process(1.5)
    try:
        assert lock_path(DeviceKind.CPU) == lock_dir / "cpu.lock"
        assert read_holder(lock_dir / "cpu.lock") == f"test holder (pid {proc.pid})"
        with pytest.raises(DeviceBusyError, match="busy with test holder"), device_lock("cpu", timeout_s=0.3):
            pass
        with pytest.raises(DeviceBusyError, match="stopped waiting"), device_lock("cpu", stop=lambda: True):
            pass
        waits = []
        with device_lock("cpu", holder="second", on_wait=waits.append) as info:
            released = float(proc.stdout.readline())
            assert info.acquired_at >= released and info.waited_s > 0.5
            assert waits == [f"test holder (pid {proc.pid})"]
            assert read_holder(lock_dir / "cpu.lock").startswith("second")
    finally:
        proc.kill()
        proc.wait()


def test_a_killed_holder_releases_the_device(lock_dir) -> None:
    proc, _ = holder_process(60)
    try:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        start = time.monotonic()
        with device_lock("cpu", timeout_s=5):
            assert time.monotonic() - start < 1.0
    finally:
        proc.kill()
        proc.wait()


def test_nvit_profile_waits_while_another_measurement_holds_the_device(lock_dir, tmp_path, capsys,
                                                                       monkeypatch) -> None:
    calls: list[float] = []

    class TimedFake(fk.FakeBackend):
        def _measure_impl(self, workload):
            calls.append(time.time())
            return super()._measure_impl(workload)

    fk.register_fake(monkeypatch, cls=TimedFake)
    space = save_space(fk.tiny_space(), tmp_path / "space.json")
    held, released = threading.Event(), []

    def other_measurement() -> None:
        with device_lock("cpu", holder="an agent's job"):
            held.set()
            time.sleep(1.0)
            released.append(time.time())

    thread = threading.Thread(target=other_measurement)
    thread.start()
    held.wait(10)
    code, stdout, err = run_cli(["profile", "--backend", "fake", "--space", str(space), "--out",
                                 str(tmp_path / "lut.parquet"), "--calibrate", "0"], capsys)
    thread.join()
    assert code == 0, err
    assert "waiting for the device: it is measuring for an agent's job" in stdout
    assert calls and min(calls) >= released[0]
