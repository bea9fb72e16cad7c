"""The sweep: every configuration once, random order, sentinel drift, journal durability and resume,
refusal of foreign journals, and the ``nvit profile`` command (with a fake backend)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lut_fakes as fk
import numpy as np
import pytest
from cli_run import run_cli

from nvit.errors import LutError
from nvit.lut import load_table
from nvit.lut.table import KEY_COLUMNS
from nvit.profiler.space import save_space
from nvit.profiler.sweep import JOURNAL_KIND, Journal, Phase, SweepOptions, journal_path, run_sweep
from nvit.vocab import PartConfig, PartKind

TESTS = Path(__file__).parents[1]  # the shared helpers (lut_fakes)
OPTIONS = SweepOptions(sentinel_every=5, calibration_models=3, check_models=2)
N_PARTS = 16 + 6 + 4 + 2  # tiny_space: attn, mlp, block, fixed
MODELS = 3 + 2  # calibration, then held-out check
ROUNDS = 2  # whole models are measured before the parts and after each pass (one here)
RETIMES = (N_PARTS - 1) // 5  # and one of them with every sentinel after the first (sentinel_every=5)
WHOLE = ("cal-", "check-")


def sweep(out, backend=None, **kwargs):
    backend = backend or fk.FakeBackend()
    kwargs.setdefault("options", OPTIONS)
    kwargs.setdefault("device", fk.fake_device())
    with backend:
        return run_sweep(fk.tiny_space(), backend, out, **kwargs)


def journal_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()[1:]]


def check_complete(table) -> None:
    """Every configuration of the space exactly once, with the oracle's latency."""
    space = fk.tiny_space()
    assert sorted(table.keys()) == sorted(c.key for c in space.configs())
    assert not table.rows.duplicated(list(KEY_COLUMNS)).any()
    for r in table.rows.itertuples():
        config = PartConfig(PartKind(r.kind), r.embed_dim, r.heads, r.qk_dim, r.v_dim, r.mlp_dim)
        assert r.latency_ms_median == pytest.approx(fk.config_ms(config), rel=1e-12)


def test_a_sweep_measures_every_configuration_once_in_random_order(tmp_path) -> None:
    events = []
    backend = fk.FakeBackend()
    result = sweep(tmp_path / "t.parquet", backend, progress=events.append)
    table = result.table
    check_complete(table)
    assert result.measured == N_PARTS + ROUNDS * MODELS + RETIMES and result.resumed == 0
    assert not result.already_complete
    order = table.rows.sort_values("sweep_index")["kind"].tolist()
    assert sorted(table.rows["sweep_index"]) == list(range(N_PARTS))
    assert order != sorted(order, key=["attn", "mlp", "block", "fixed"].index)  # shuffled, not canonical
    # Sentinel first, after every 5 parts and at the end: 1 + 5 (after 5..25 parts) + 1.
    parts = [e for e in events if e.phase is Phase.PART]
    assert len(parts) == N_PARTS and parts[0].done == MODELS + 1
    assert all(e.total == N_PARTS + ROUNDS * MODELS + RETIMES for e in events)
    # between the rounds: the sentinel, then every 5 parts the sentinel and one whole model, the sentinel last
    between = [e.phase for e in events[MODELS:-MODELS] if e.phase is not Phase.PART]
    assert between[0] is Phase.SENTINEL and between[-1] is Phase.SENTINEL and len(between) == 2 + 2 * RETIMES
    assert between[1:-1:2] == [Phase.SENTINEL] * RETIMES
    retimed = [e.name for e in events[MODELS:-MODELS] if e.phase in (Phase.CALIBRATION, Phase.CHECK)]
    assert retimed == ["cal-dense", "cal-uniform", "cal-pruned0", "check-pruned00", "check-random00"]
    assert [e.phase for e in events].count(Phase.SENTINEL) == len(table.meta.sentinel) == 7
    whole = [Phase.CALIBRATION] * 3 + [Phase.CHECK] * 2
    assert [e.phase for e in events][:5] == whole and [e.phase for e in events][-5:] == whole
    assert events[-1].done == N_PARTS + ROUNDS * MODELS + RETIMES
    assert len(backend.calls) == N_PARTS + 7 + ROUNDS * MODELS + RETIMES
    assert table.meta.calibration.method == "scale_offset"
    # The fake is exactly what the predictor models, so the held-out check finds no error.
    check = table.meta.self_check
    assert check.n == 2 and check.seed == OPTIONS.check_seed and check.mape_pct < 1e-6
    assert [m.name for m in check.models] == ["check-pruned00", "check-random00"]
    assert {m.name for m in check.models}.isdisjoint(m.name for m in table.meta.calibration.models)
    assert (tmp_path / "t.parquet").exists() and not journal_path(tmp_path / "t.parquet").exists()


def test_same_seed_same_order_other_seed_other_order(tmp_path) -> None:
    a = sweep(tmp_path / "a.parquet").table.rows.sort_values("sweep_index")
    b = sweep(tmp_path / "b.parquet").table.rows.sort_values("sweep_index")
    c = sweep(tmp_path / "c.parquet", options=SweepOptions(seed=1, sentinel_every=5, calibration_models=3))
    c_rows = c.table.rows.sort_values("sweep_index")
    assert a["latency_ms_median"].tolist() == b["latency_ms_median"].tolist()
    assert a["latency_ms_median"].tolist() != c_rows["latency_ms_median"].tolist()


def test_sentinel_drift_is_recorded(tmp_path) -> None:
    options = SweepOptions(sentinel_every=5, calibration_models=0, check_models=0)
    table = sweep(tmp_path / "t.parquet", fk.FakeBackend(drift_per_call=0.01), options=options).table
    drifts = [s["drift"] for s in table.meta.sentinel]
    assert drifts[0] == 0.0 and np.all(np.diff(drifts) > 0)
    # Call k is 1 + 0.01 k times slower; the sentinel is call 0, then call 6 after five parts.
    assert drifts[1] == pytest.approx(0.06)
    first = table.rows.sort_values("sweep_index").iloc[:6]
    assert first["sentinel_drift"].tolist() == pytest.approx([0.0] * 5 + [0.06])


def test_two_passes_keep_each_configurations_fastest_measurement(tmp_path) -> None:
    options = SweepOptions(sentinel_every=5, calibration_models=3, check_models=2, passes=2)
    backend = fk.FakeBackend(drift_per_call=0.01)  # every call slower than the one before
    table = sweep(tmp_path / "t.parquet", backend, options=options).table
    sentinel = "block/e64/h4/q16/v16/m256"
    parts = [c for c in backend.calls if c != sentinel and not c.startswith(WHOLE)]
    assert len(parts) == 2 * (N_PARTS - 1) and len(set(parts)) == N_PARTS - 1  # the sentinel is in the space
    slots = (2 * N_PARTS - 1) // 5  # one whole model with each sentinel, round-robin over the five
    assert sum(c.startswith("cal-") for c in backend.calls) == (2 + 1) * 3 + sum(s % 5 < 3 for s in range(slots))
    assert sum(c.startswith("check-") for c in backend.calls) == (2 + 1) * 2 + sum(s % 5 >= 3 for s in range(slots))
    first_call = {}
    for i, name in enumerate(backend.calls):
        first_call.setdefault(name, i)
    for r in table.rows.itertuples():
        config = PartConfig(PartKind(r.kind), r.embed_dim, r.heads, r.qk_dim, r.v_dim, r.mlp_dim)
        if config.key != sentinel:  # the sentinel's own first call is its re-timing
            assert r.latency_ms_median == pytest.approx(fk.config_ms(config) * (1 + 0.01 * first_call[config.key]))
    assert table.meta.protocol["passes"] == 2

    out = tmp_path / "resumed.parquet"
    with pytest.raises(fk.Killed):
        sweep(out, fk.FakeBackend(kill_after=N_PARTS + 12 + 2 * MODELS), options=options)
    done = [r for r in journal_records(journal_path(out)) if r["type"] == "part"]
    whole = sum(1 for r in journal_records(journal_path(out)) if r["type"] in ("model", "check"))
    assert {r["pass"] for r in done} == {0, 1}
    backend = fk.FakeBackend()
    result = sweep(out, backend, options=options)
    remeasured = [c for c in backend.calls if c != sentinel and not c.startswith(WHOLE)]
    done_here = sum(PartConfig(**r["config"]).key != sentinel for r in done)
    assert len(remeasured) == 2 * (N_PARTS - 1) - done_here
    assert result.resumed == len(done) + whole  # and the whole models measured before the kill
    check_complete(result.table)


def test_resume_after_a_crash_measures_only_the_rest(tmp_path) -> None:
    out = tmp_path / "t.parquet"
    with pytest.raises(fk.Killed):
        sweep(out, fk.FakeBackend(kill_after=MODELS + 13))
    jpath = journal_path(out)
    assert not out.exists() and jpath.exists()
    done = [r for r in journal_records(jpath) if r["type"] == "part"]
    assert len(done) == 10  # MODELS + 13 calls: the first round of whole models, S, 5 parts, S, a model, 5 parts
    backend = fk.FakeBackend()
    events = []
    result = sweep(out, backend, progress=events.append)
    assert result.resumed == len(done) + MODELS + 1
    assert result.measured == N_PARTS - len(done) + MODELS + RETIMES - 1
    assert events[0].resumed == len(done) + MODELS + 1
    measured_again = {c for c in backend.calls if c.startswith(("attn", "mlp", "fixed"))}
    assert not measured_again & {PartConfig(**r["config"]).key for r in done}
    check_complete(result.table)
    assert not jpath.exists()


def test_sigkill_loses_at_most_the_configuration_in_flight(tmp_path) -> None:
    out = tmp_path / "t.parquet"
    jpath = journal_path(out)
    script = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "import lut_fakes as fk\n"
        "from nvit.profiler.sweep import SweepOptions, run_sweep\n"
        "with fk.FakeBackend(sleep_s=0.05) as b:\n"
        "    run_sweep(fk.tiny_space(), b, sys.argv[2], device=fk.fake_device(),\n"
        "              options=SweepOptions(sentinel_every=5, calibration_models=3, check_models=2))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(TESTS), str(out)])
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if jpath.exists() and sum(1 for r in journal_records(jpath) if r["type"] == "part") >= 6:
                break
            time.sleep(0.02)
        else:
            pytest.fail("the sweep did not start")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    done = {PartConfig(**r["config"]).key for r in journal_records(jpath) if r["type"] == "part"}
    assert 6 <= len(done) < N_PARTS
    backend = fk.FakeBackend()
    whole = sum(1 for r in journal_records(jpath) if r["type"] in ("model", "check"))
    result = sweep(out, backend)
    assert result.resumed == len(done) + whole
    parts_now = [c for c in backend.calls if not c.startswith(("block/e64/h4/q16/v16/m256", *WHOLE))]
    assert not set(parts_now) & done  # nothing measured twice (the sentinel aside)
    check_complete(result.table)


def test_a_torn_last_line_is_dropped_and_a_corrupt_middle_line_refused(tmp_path) -> None:
    out = tmp_path / "t.parquet"
    with pytest.raises(fk.Killed):
        sweep(out, fk.FakeBackend(kill_after=8))
    jpath = journal_path(out)
    good = jpath.read_bytes()
    jpath.write_bytes(good + b'{"type": "part", "config": {"kind": "at')  # a write cut by the kill
    check_complete(sweep(out).table)

    with pytest.raises(fk.Killed):
        sweep(out, fk.FakeBackend(kill_after=8), resume=False)
    lines = jpath.read_bytes().split(b"\n")
    lines[3] = b"garbage"
    jpath.write_bytes(b"\n".join(lines))
    with pytest.raises(LutError, match="corrupt at line 4"):
        sweep(out)


def test_a_journal_from_other_conditions_is_refused(tmp_path) -> None:
    out = tmp_path / "t.parquet"
    with pytest.raises(fk.Killed):
        sweep(out, fk.FakeBackend(kill_after=8))
    with pytest.raises(LutError, match="other device_identity"):
        sweep(out, device=fk.fake_device("Another CPU"))
    with pytest.raises(LutError, match="other options"):
        sweep(out, options=SweepOptions(seed=3, sentinel_every=5, calibration_models=3))
    with fk.FakeBackend() as backend, pytest.raises(LutError, match="other space, space_fingerprint"):
        run_sweep(fk.tiny_space(mlp_dims=(64, 256)), backend, out, options=OPTIONS, device=fk.fake_device())
    with pytest.raises(LutError, match="other settings"):
        sweep(out, fk.FakeBackend(harness={"time_cap_s": 9.0}))
    jpath = journal_path(out)
    header = json.loads(jpath.read_text().splitlines()[0])
    assert header["kind"] == JOURNAL_KIND
    jpath.write_text(json.dumps({**header, "kind": "something"}) + "\n")
    with pytest.raises(LutError, match="not a sweep journal"):
        sweep(out)
    check_complete(sweep(out, resume=False).table)  # --no-resume starts over
    jpath.write_text("")  # a run killed before its header was written: nothing to resume
    check_complete(sweep(out, resume=False).table)


def test_two_runs_never_write_the_same_table(tmp_path) -> None:
    out = tmp_path / "t.parquet"
    with pytest.raises(fk.Killed):
        sweep(out, fk.FakeBackend(kill_after=3))
    header = json.loads(journal_path(out).read_text().splitlines()[0])
    holder = Journal.open(journal_path(out), header)  # another process in the middle of the sweep
    try:
        with pytest.raises(LutError, match="another profiling run is writing"):
            sweep(out)
        with pytest.raises(LutError, match="another profiling run is writing"):
            sweep(out, resume=False)
    finally:
        holder.close()
    check_complete(sweep(out).table)


def test_a_complete_table_is_not_profiled_again(tmp_path) -> None:
    out = tmp_path / "t.parquet"
    first = sweep(out)
    backend = fk.FakeBackend()
    again = sweep(out, backend)
    assert again.already_complete and again.measured == 0 and backend.calls == []
    assert again.table.meta == first.table.meta
    with pytest.raises(LutError, match="already exists and was profiled with other settings"):
        sweep(out, options=SweepOptions(seed=9, sentinel_every=5, calibration_models=3))
    backend = fk.FakeBackend()
    assert sweep(out, backend, resume=False).measured == N_PARTS + ROUNDS * MODELS + RETIMES and backend.calls


def test_bad_requests(tmp_path) -> None:
    mismatch = "batch 1 fp32, the backend for batch 2"
    with fk.FakeBackend(batch_size=2) as backend, pytest.raises(LutError, match=mismatch):
        run_sweep(fk.tiny_space(), backend, tmp_path / "t.parquet", device=fk.fake_device())
    with pytest.raises(LutError, match="sentinel_every"):
        SweepOptions(sentinel_every=0)
    with pytest.raises(LutError, match="calibration_models"):
        SweepOptions(calibration_models=-1)
    with pytest.raises(LutError, match="check_models"):
        SweepOptions(check_models=-1)
    with pytest.raises(LutError, match="its own seed"):
        SweepOptions(check_seed=1, calibration_seed=1)
    with pytest.raises(LutError, match="passes"):
        SweepOptions(passes=0)


def test_uncalibrated_sweep(tmp_path) -> None:
    table = sweep(tmp_path / "t.parquet", options=SweepOptions(calibration_models=0)).table
    assert table.meta.calibration is None
    check_complete(table)


# ---- CLI -----------------------------------------------------------------------------------------
@pytest.fixture
def fake_registered(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    fk.register_fake(monkeypatch)



def test_cli_profile_writes_a_table_and_resumes(tmp_path, capsys, fake_registered) -> None:
    space = save_space(fk.tiny_space(), tmp_path / "space.json")
    out = tmp_path / "lut.parquet"
    argv = ["profile", "--backend", "fake", "--space", str(space), "--out", str(out), "--calibrate", "3"]
    code, stdout, err = run_cli(argv, capsys)
    assert code == 0, err
    assert "16 attn, 6 mlp, 4 block, 2 fixed, 3 calibration + 6 check models" in stdout
    assert "scale_offset" in stdout and "28 rows" in stdout
    check_complete(load_table(out))
    code, stdout, _ = run_cli(argv, capsys)
    assert code == 0 and "already complete" in stdout


def test_cli_profile_errors_are_one_line(tmp_path, capsys, fake_registered) -> None:
    cases = [
        (["profile", "--backend", "nope", "--space", "vit_test"], "unknown backend 'nope'"),
        (["profile", "--backend", "fake", "--space", "vit_huge"], "neither a space preset"),
        (["profile", "--backend", "fake", "--space", "vit_test", "--precision", "int4"], "unknown precision"),
        (["profile", "--backend", "fake", "--space", "vit_test", "--backend-option", "oops"], "KEY=VALUE"),
        (["profile", "--backend", "onnxruntime", "--space", "vit_test", "--precision", "fp16"], "CPU tables are fp32"),
    ]
    for argv, message in cases:
        code, _, err = run_cli([*argv, "--out", str(tmp_path / "x.parquet")], capsys)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 1 and len(lines) == 1 and message in lines[0], (argv, err)


# ---- GPU -----------------------------------------------------------------------------------------
def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _has_cuda(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["torch", pytest.param("tensorrt", marks=[
    pytest.mark.trt, pytest.mark.skipif(not _has("tensorrt"), reason="needs TensorRT")])])
def test_gpu_sweep_writes_a_valid_calibrated_table(tmp_path, name: str) -> None:
    from nvit.lut.predictor import LatencyPredictor
    from nvit.presets import preset
    from nvit.profiler.base import get_backend
    from nvit.profiler.harness import HarnessConfig
    from nvit.vocab import DeviceKind, Precision

    space = fk.tiny_space(embed_dims=(32, 64), heads=(2,), qk_dims=(16,), v_dims=(16,), mlp_dims=(128, 256),
                          blocks_per_embed=1, precision=Precision.FP16)
    harness = HarnessConfig.gpu().replace(warmup_s=0.1, time_cap_s=0.2)
    with get_backend(name)(device=DeviceKind.CUDA, precision=Precision.FP16, batch_size=1,
                           harness=harness) as backend:
        result = run_sweep(space, backend, tmp_path / "gpu.parquet", options=SweepOptions(calibration_models=2))
    table = load_table(tmp_path / "gpu.parquet")
    assert table.meta.device_kind is DeviceKind.CUDA and table.meta.device["gpu"]["name"]
    assert len(table) == len(space.configs()) == result.measured - 2
    assert table.meta.calibration is not None and LatencyPredictor(table).predict_ms(preset("vit_test")) > 0
