"""The timing mode (host clock, CUDA graphs, plain launches) is part of a table's identity: recorded in its
settings, shown by ``nvit lut show``, and tables timed in different modes do not merge."""

from __future__ import annotations

import pytest
from cli_run import run_cli
from lut_fakes import FakeBackend, fake_device, tiny_space

from nvit.errors import LutError
from nvit.lut.table import merge_tables
from nvit.profiler.sweep import SweepOptions, run_sweep
from nvit.vocab import DeviceKind


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    path = tmp_path_factory.mktemp("mode") / "t.parquet"
    with FakeBackend() as backend:
        return path, run_sweep(tiny_space(), backend, path, device=fake_device(),
                               options=SweepOptions(calibration_models=0)).table


def test_the_timing_mode_is_recorded_and_shown(table, capsys, monkeypatch):
    path, t = table
    assert t.meta.settings["timing_mode"] == "host_clock" == t.meta.timing_mode()
    assert t.meta.identity()["timing_mode"] == "host_clock"
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = run_cli(["lut", "show", str(path)], capsys)
    assert code == 0 and "timing host_clock" in out


def test_tables_timed_in_other_modes_do_not_merge(table):
    _, t = table
    gpu = {"device_kind": DeviceKind.CUDA}
    graphs = t.with_meta(**gpu, settings={**t.meta.settings, "timing_mode": "cuda_graph"})
    launches = t.with_meta(**gpu, settings={**t.meta.settings, "timing_mode": "launch"})
    with pytest.raises(LutError, match="cannot merge table 1 into table 0: different identity"):
        merge_tables([graphs, launches])


@pytest.mark.parametrize(("kind", "settings", "mode"), [
    (DeviceKind.CPU, {}, "host_clock"),
    (DeviceKind.CUDA, {"timer_modes": ["cuda_graph"]}, "cuda_graph"),
    (DeviceKind.CUDA, {"timer_modes": ["cuda_graph", "launch"]}, "unknown"),
    (DeviceKind.CUDA, {}, "unknown"),
])
def test_tables_written_before_the_mode_was_recorded(table, kind, settings, mode):
    _, t = table
    assert t.with_meta(device_kind=kind, settings=settings).meta.timing_mode() == mode
