"""The GPU timing paths on a CPU, through stand-ins for CUDA, pycuda and torch.cuda: the CUDA-event timer,
which CUDA API is chosen, where buffers are allocated, and context clean-up (the real device runs in
tests/profiler/test_gpu.py)."""

from __future__ import annotations

import contextlib
import sys
import types

import pytest
import torch
from fake_gpu import Device, FakeCuda, fake_pycuda

from nvit.errors import BackendError
from nvit.profiler.backends.common import NO_CUDA
from nvit.profiler.backends.cuda_timer import (
    PYCUDA_HINT,
    CudaTimer,
    PycudaCuda,
    TorchCuda,
    select_cuda_api,
    timing_mode,
)
from nvit.profiler.harness import HarnessConfig, measure_callable
from nvit.vocab import TimingMode


def _launch(machine: Device, cost_ms: float):
    return lambda: setattr(machine, "clock_ms", machine.clock_ms + cost_ms)


# ---- the timer ---------------------------------------------------------------------------------------------
def test_timer_replays_a_graph_and_calibrates_iterations():
    machine = Device()
    api = FakeCuda(machine, replay_ms=2.0**-6)  # the graph skips launch gaps: faster than a launch
    timer = CudaTimer(api, _launch(machine, 2.0**-4), min_sample_ms=1.0).prepare()
    assert timer.mode is TimingMode.CUDA_GRAPH and timer.note == ""
    assert timer.iters_per_sample == 64  # 1 ms / (1/64 ms per replay); times are exact binary fractions
    assert timer() == 2.0**-6
    stats = measure_callable(timer, HarnessConfig.gpu().replace(warmup_s=0.0, time_cap_s=0.2), returns_ms=True)
    assert stats.latency_ms_median == 2.0**-6 and stats.stop_reason == "converged"


def test_a_failed_capture_is_an_error_not_a_silent_change_of_timing_mode():
    machine = Device()
    api = FakeCuda(machine, capture_error="operation not permitted when stream is capturing")
    with pytest.raises(BackendError, match=r"CUDA graph capture failed \(operation not permitted when stream is "
                                           r"capturing\); .* cuda_graphs=false"):
        CudaTimer(api, _launch(machine, 0.25), min_sample_ms=1.0).prepare()


@pytest.mark.parametrize(("can_capture", "use_graph", "note"), [
    (True, False, "CUDA graphs disabled"),
    (False, True, "fake cannot capture CUDA graphs"),
])
def test_plain_launches_when_graphs_are_off_or_impossible(can_capture, use_graph, note):
    machine = Device()
    api = FakeCuda(machine, capture_error="must not be called")
    api.can_capture = can_capture
    timer = CudaTimer(api, _launch(machine, 0.25), min_sample_ms=1.0, use_graph=use_graph).prepare()
    assert timer.mode is TimingMode.LAUNCH and timer.iters_per_sample == 4 and timer() == pytest.approx(0.25)
    assert timer.describe() == {"mode": "launch", "iters_per_sample": 4, "note": note}


# ---- which API ---------------------------------------------------------------------------------------------
def test_cuda_api_selection_order():
    assert select_cuda_api("auto", torch_cuda=True, pycuda=True) == "torch"  # graphs: torch first
    assert select_cuda_api("auto", torch_cuda=False, pycuda=True) == "pycuda"  # TensorRT on a CPU torch
    assert select_cuda_api("pycuda", torch_cuda=True, pycuda=True) == "pycuda"
    assert select_cuda_api("torch", torch_cuda=True, pycuda=False) == "torch"
    with pytest.raises(BackendError, match="pycuda is not installed either"):
        select_cuda_api("auto", torch_cuda=False, pycuda=False)
    with pytest.raises(BackendError) as err:
        select_cuda_api("pycuda", torch_cuda=True, pycuda=False)
    assert str(err.value) == PYCUDA_HINT
    with pytest.raises(BackendError) as err:
        select_cuda_api("torch", torch_cuda=False, pycuda=True)
    assert str(err.value) == NO_CUDA
    with pytest.raises(BackendError, match="unknown CUDA buffer API 'cupy'"):
        select_cuda_api("cupy", torch_cuda=True, pycuda=True)
    assert timing_mode(TorchCuda.can_capture, True) is TimingMode.CUDA_GRAPH
    assert timing_mode(TorchCuda.can_capture, False) is timing_mode(PycudaCuda.can_capture, True) is TimingMode.LAUNCH


# ---- torch.cuda: device index and the stream that allocates ------------------------------------------------
@pytest.fixture
def fake_torch_cuda(monkeypatch):
    """torch.cuda's stream/device context managers and torch.zeros, recording what was current."""
    state = types.SimpleNamespace(device=0, stream="default", zeros=[], streams=[])

    class Stream:
        def __init__(self, device):
            self.device, self.made_on, self.cuda_stream = device, state.device, 1234
            state.streams.append(self)

        def synchronize(self):
            pass

    @contextlib.contextmanager
    def switch(attr, value):
        before = getattr(state, attr)
        setattr(state, attr, value)
        try:
            yield
        finally:
            setattr(state, attr, before)

    real_zeros = torch.zeros

    def zeros(*shape, dtype=None, device=None):
        state.zeros.append((state.stream, state.device, str(device)))
        return real_zeros(*shape, dtype=dtype)

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: switch("stream", s))
    monkeypatch.setattr(torch.cuda, "device", lambda i: switch("device", i))
    monkeypatch.setattr(torch, "zeros", zeros)
    return state


def test_torch_cuda_allocates_on_its_own_stream_and_device(fake_torch_cuda):
    api = TorchCuda(1)
    assert fake_torch_cuda.streams[0].made_on == 1 and str(api.stream.device) == "cuda:1"
    ptr, buf = api.alloc_zeros(96)
    assert fake_torch_cuda.zeros == [(api.stream, 1, "cuda:1")]  # zeroed by the stream that will use it
    assert buf.numel() == 96 and ptr == buf.data_ptr()
    with api.on_stream():
        assert (fake_torch_cuda.stream, fake_torch_cuda.device) == (api.stream, 1)
    assert (fake_torch_cuda.stream, fake_torch_cuda.device) == ("default", 0)  # restored
    assert api.stream_handle == 1234


# ---- pycuda: the primary context is pushed while open and popped on close ---------------------------------
@pytest.fixture
def pycuda_stack(monkeypatch):
    def install(**kwargs):
        stack: list[str] = ["user-context"]
        driver = fake_pycuda(stack, **kwargs)
        package = types.ModuleType("pycuda")
        package.driver = driver
        monkeypatch.setitem(sys.modules, "pycuda", package)
        monkeypatch.setitem(sys.modules, "pycuda.driver", driver)
        return stack, driver

    return install


def test_pycuda_pops_its_context_and_frees_its_buffers(pycuda_stack):
    stack, driver = pycuda_stack()
    api = PycudaCuda(2)
    assert stack == ["user-context", "primary2"]
    first, _ = api.alloc_zeros(64)
    second, buf = api.alloc_zeros(64)
    api.free(buf)
    assert driver.freed == [second]
    timer = CudaTimer(api, lambda: None, min_sample_ms=0.0)
    assert not timer.use_graph and timer.note == "pycuda cannot capture CUDA graphs"
    with pytest.raises(BackendError, match="pycuda cannot capture CUDA graphs"):
        api.capture(lambda: None)
    api.close()
    assert stack == ["user-context"] and driver.released == ["primary2"] and driver.freed == [second, first]
    api.close()  # idempotent
    assert stack == ["user-context"]


def test_pycuda_that_fails_to_open_leaves_no_context_pushed(pycuda_stack):
    stack, driver = pycuda_stack(fail_stream=True)
    with pytest.raises(BackendError, match="pycuda could not open CUDA device 0: out of memory"):
        PycudaCuda(0)
    assert stack == ["user-context"] and driver.released == ["primary0"]
