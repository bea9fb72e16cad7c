"""LUT storage: round trips, metadata, validation, compatibility checks, merging, and the lut/predict CLI."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli_run import run_cli
from lut_fakes import FakeBackend, fake_device, tiny_space

from nvit.arch import BlockSpec, save_arch
from nvit.errors import LutError
from nvit.lut import load_predictor, load_table
from nvit.lut.table import COLUMNS, LUT_SCHEMA_VERSION, META_KEY, LatencyTable, LutMeta, check_compatible, merge_tables
from nvit.presets import preset
from nvit.profiler.sweep import SweepOptions, run_sweep
from nvit.vocab import DeviceKind, Precision


def make_table(path, **space_changes) -> LatencyTable:
    with FakeBackend(batch_size=space_changes.get("batch_size", 1)) as backend:
        return run_sweep(tiny_space(**space_changes), backend, path, device=fake_device(),
                         options=SweepOptions(calibration_models=3)).table


@pytest.fixture(scope="module")
def lut_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("lut") / "tiny.parquet"
    make_table(path)
    return path


@pytest.fixture(autouse=True)
def wide_console(monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps to the terminal width



def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_round_trip_keeps_rows_types_and_metadata(lut_path, tmp_path) -> None:
    table = load_table(lut_path)
    assert len(table) == 16 + 6 + 4 + 2
    assert {c: str(t) for c, t in table.rows.dtypes.items()} == {c: str(pd.Series(dtype=d).dtype)
                                                                   for c, d in COLUMNS.items()}
    meta = table.meta
    assert meta.backend == "fake" and meta.device_kind is DeviceKind.CPU and meta.precision is Precision.FP32
    assert meta.batch_size == 1 and meta.num_tokens == 17 and meta.base_arch == preset("vit_test").to_dict()
    assert meta.device_identity == fake_device().identity() and meta.device["cpu"]["model_name"] == "Test CPU 9000"
    assert meta.versions["fake"] == "1.0" and meta.settings["batch_size"] == 1
    assert meta.protocol["sentinel"] == "block/e64/h4/q16/v16/m256" and meta.sentinel
    assert meta.calibration.method == "scale_offset" and meta.created_at
    assert meta.schema_version == LUT_SCHEMA_VERSION
    copy = tmp_path / "copy.parquet"
    table.save(copy)
    back = LatencyTable.load(copy)
    pd.testing.assert_frame_equal(back.rows, table.rows)
    assert back.meta == table.meta
    raw = json.loads(pq.read_schema(copy).metadata[META_KEY])
    assert raw["kind"] == "nvit.lut" and raw["num_tokens"] == 17


def test_a_failed_save_leaves_the_old_table_and_no_temporary_file(lut_path, tmp_path, monkeypatch) -> None:
    table = load_table(lut_path)
    target = tmp_path / "t.parquet"
    table.save(target)
    before = target.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", boom)
    with pytest.raises(OSError):
        table.with_meta(backend="other").save(target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.parquet"]


def test_missing_and_unreadable_files(tmp_path) -> None:
    with pytest.raises(LutError, match="not found"):
        load_table(tmp_path / "nope.parquet")
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(LutError, match="not a readable Parquet latency table"):
        load_table(garbage)
    plain = tmp_path / "plain.parquet"
    pd.DataFrame({"a": [1, 2]}).to_parquet(plain)
    with pytest.raises(LutError, match="without nvit LUT metadata"):
        load_table(plain)


def _rewrite(src, dst, *, meta=None, frame=None) -> None:
    arrow = pq.read_table(src)
    md = dict(arrow.schema.metadata)
    if meta is not None:
        md[META_KEY] = meta if isinstance(meta, bytes) else json.dumps(meta).encode()
    if frame is not None:
        arrow = pa.Table.from_pandas(frame, preserve_index=False)
    pq.write_table(arrow.replace_schema_metadata(md), dst)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: b"{not json", "not valid JSON"),
        (lambda m: {**m, "schema_version": 99}, "unsupported LUT schema_version 99"),
        (lambda m: {**m, "kind": "nvit.arch"}, "not an nvit latency table"),
        (lambda m: {**m, "colour": "red"}, "unknown LUT metadata key"),
        (lambda m: {k: v for k, v in m.items() if k != "backend"}, "incomplete"),
        (lambda m: {**m, "precision": "int3"}, "int3"),
        (lambda m: {**m, "batch_size": 0}, "batch_size must be a positive integer"),
    ],
)
def test_corrupt_metadata(lut_path, tmp_path, edit, message: str) -> None:
    meta = json.loads(pq.read_schema(lut_path).metadata[META_KEY])
    bad = tmp_path / "bad.parquet"
    _rewrite(lut_path, bad, meta=edit(meta))
    with pytest.raises(LutError, match=message):
        load_table(bad)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda f: f.drop(columns=["latency_ms_p90"]), "missing column"),
        (lambda f: f.assign(latency_ms_median=-f["latency_ms_median"]), "finite and positive"),
        (lambda f: pd.concat([f, f.iloc[:1]]), "duplicate configuration"),
        (lambda f: f[~((f["kind"] == "attn") & (f["heads"] == 2) & (f["embed_dim"] == 32) & (f["qk_dim"] == 8)
                       & (f["v_dim"] == 8))], "attn grid is incomplete: 15 of 16"),
        (lambda f: f[f["kind"] != "fixed"], "no fixed-part rows"),
        (lambda f: f.assign(kind=f["kind"].replace("mlp", "conv")), "unknown row kind"),
        (lambda f: f.assign(mlp_dim=f["mlp_dim"].where(f["kind"] != "attn", 5)), "attn rows must have mlp_dim = 0"),
        (lambda f: f.iloc[0:0], "no rows"),
    ],
)
def test_corrupt_rows(lut_path, tmp_path, edit, message: str) -> None:
    frame = pq.read_table(lut_path).to_pandas()
    meta = pq.read_schema(lut_path).metadata[META_KEY]
    bad = tmp_path / "bad.parquet"
    _rewrite(lut_path, bad, meta=meta, frame=edit(frame))
    if "grid" in message or "fixed" in message:  # a partial table (a shard) loads, but cannot predict
        load_table(bad)
        with pytest.raises(LutError, match=message):
            load_predictor(bad)
    else:
        with pytest.raises(LutError, match=message):
            load_table(bad)
    if message != "missing column":  # the rest load without validation, and list their problem
        assert any(message in p for p in LatencyTable.load(bad, validate=False).problems())


def test_check_compatible(lut_path) -> None:
    meta = load_table(lut_path).meta
    check_compatible(meta, device="cpu", precision="fp32", batch_size=1, num_tokens=17, backend="fake")
    check_compatible(meta, device="test cpu 9000")  # device names match case-insensitively
    check_compatible(meta, device=DeviceKind.CPU, precision=Precision.FP32)
    cases = [({"device": "cuda"}, "device cpu"), ({"device": "NVIDIA H100"}, "device Test CPU 9000"),
             ({"precision": "fp16"}, "precision fp32"), ({"batch_size": 8}, "batch size 1"),
             ({"num_tokens": 197}, "token count 17"), ({"backend": "tensorrt"}, "backend fake")]
    for kwargs, message in cases:
        with pytest.raises(LutError, match=message):
            check_compatible(meta, **kwargs)
    with pytest.raises(LutError, match="unknown precision"):
        check_compatible(meta, precision="int3")


def test_load_predictor_refuses_other_conditions(lut_path) -> None:
    assert load_predictor(lut_path, device="cpu", precision="fp32", batch_size=1).calibrated
    with pytest.raises(LutError, match="measured with precision fp32, but fp16 is needed"):
        load_predictor(lut_path, precision="fp16")
    with pytest.raises(LutError, match="batch size"):
        load_predictor(lut_path, batch_size=64)


def test_merge_shards_back_into_the_table(lut_path) -> None:
    table = load_table(lut_path)
    rows = table.rows
    shard_a = table.with_rows(rows.iloc[::2])
    shard_b = table.with_rows(rows.iloc[1::2])
    merged = merge_tables([shard_a, shard_b])
    pd.testing.assert_frame_equal(merged.rows, table.rows)
    assert merged.meta.calibration == table.meta.calibration  # identical calibrations are kept
    assert merged.meta.protocol["merged_from"] == 2 and merged.problems() == []
    uncal = merge_tables([shard_a, shard_b.with_meta(calibration=None)])
    assert uncal.meta.calibration is None
    doubled = merge_tables([table, table])
    assert len(doubled) == len(table)  # duplicates keep the first row


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"precision": Precision.FP16}, "identity"),
        ({"batch_size": 2}, "identity"),
        ({"device_identity": {"kind": "cpu", "cpu": "Other CPU", "threads_used": 1}}, "identity"),
        ({"backend": "onnxruntime"}, "identity"),
        ({"settings": {"harness": "other"}}, "backend settings"),
        ({"base_arch": {**preset("vit_test").to_dict(), "num_classes": 3}}, "base architecture"),
    ],
)
def test_merge_refuses_tables_from_other_conditions(lut_path, change: dict, message: str) -> None:
    table = load_table(lut_path)
    with pytest.raises(LutError, match=f"cannot merge table 1 into table 0: different {message}"):
        merge_tables([table, table.with_meta(**change)])
    with pytest.raises(LutError, match="nothing to merge"):
        merge_tables([])


def test_meta_rejects_bad_values() -> None:
    with pytest.raises(LutError, match="num_tokens"):
        LutMeta(backend="x", device_kind="cpu", precision="fp32", batch_size=1, num_tokens=0, base_arch={},
                device_identity={})


# ---- CLI -----------------------------------------------------------------------------------------
def test_cli_show_and_validate(lut_path, capsys) -> None:
    code, out, _ = run_cli(["lut", "show", str(lut_path)], capsys)
    assert code == 0
    assert "Test CPU 9000" in out and "e=32,64 h=2,4 q=8,16 v=8,16" in out and "scale_offset" in out
    code, out, _ = run_cli(["lut", "validate", str(lut_path), "--device", "cpu", "--batch-size", "1"], capsys)
    assert code == 0 and "valid" in out
    code, _, err = run_cli(["lut", "validate", str(lut_path), "--precision", "fp16"], capsys)
    assert code == 1 and "fp16 is needed" in one_error_line(err)


def test_cli_validate_lists_problems_and_fails(lut_path, tmp_path, capsys) -> None:
    frame = pq.read_table(lut_path).to_pandas()
    bad = tmp_path / "bad.parquet"
    _rewrite(lut_path, bad, meta=pq.read_schema(lut_path).metadata[META_KEY],
             frame=pd.concat([frame[frame["kind"] != "fixed"], frame.iloc[:1]]))
    code, out, err = run_cli(["lut", "validate", str(bad)], capsys)
    assert code == 1
    assert "duplicate configuration" in out and "no fixed-part rows" in out
    assert "2 problem(s)" in one_error_line(err)


def test_cli_errors_are_one_line(tmp_path, capsys) -> None:
    code, _, err = run_cli(["lut", "show", str(tmp_path / "missing.parquet")], capsys)
    assert code == 1 and "latency table not found" in one_error_line(err)
    code, _, err = run_cli(["lut", "merge", str(tmp_path / "a.parquet"), "--out", str(tmp_path / "m.parquet")],
                           capsys)
    assert code == 1 and "at least two tables" in one_error_line(err)


def test_cli_merge(lut_path, tmp_path, capsys) -> None:
    table = load_table(lut_path)
    a, b, out = tmp_path / "a.parquet", tmp_path / "b.parquet", tmp_path / "m.parquet"
    table.with_rows(table.rows.iloc[::2]).save(a)
    table.with_rows(table.rows.iloc[1::2]).save(b)
    code, stdout, _ = run_cli(["lut", "merge", str(a), str(b), "--out", str(out)], capsys)
    assert code == 0 and "merged 2 tables" in stdout
    pd.testing.assert_frame_equal(load_table(out).rows, table.rows)
    other = tmp_path / "fp16.parquet"
    table.with_meta(precision=Precision.FP16).save(other)
    code, _, err = run_cli(["lut", "merge", str(a), str(other), "--out", str(tmp_path / "x.parquet")], capsys)
    assert code == 1 and "different identity (precision)" in one_error_line(err)
    assert not (tmp_path / "x.parquet").exists()


def test_cli_predict_per_block_and_total(lut_path, tmp_path, capsys) -> None:
    predictor = load_predictor(lut_path)
    # non-preset widths between the grid points (far beyond it is refused: tests/lut/test_grid_guard.py)
    spec = preset("vit_test").with_blocks((BlockSpec(2, 8, 16, 120), BlockSpec(3, 16, 8, 72)))
    path = save_arch(spec, tmp_path / "arch.json")
    code, out, _ = run_cli(["predict", "--lut", str(lut_path), "--arch", str(path), "--json"], capsys)
    assert code == 0
    doc = json.loads(out)
    assert doc["total_ms"] == pytest.approx(predictor.predict_ms(spec))
    assert doc["blocks_ms"] == pytest.approx(predictor.block_latencies_ms(spec)) and len(doc["blocks_ms"]) == 2
    assert doc["total_ms"] == pytest.approx(sum(doc["blocks_ms"]) + doc["fixed_ms"] + doc["offset_ms"])
    code, out, _ = run_cli(["predict", "--lut", str(lut_path), "--arch", "vit_test"], capsys)
    assert code == 0 and "total" in out and f"{predictor.predict_ms(preset('vit_test')):.4f}" in out
    code, _, err = run_cli(["predict", "--lut", str(lut_path), "--arch", "deit_small"], capsys)
    assert code == 1 and "token count 17, but 197 is needed" in one_error_line(err)
