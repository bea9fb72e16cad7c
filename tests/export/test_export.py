"""ONNX export + ONNX Runtime verification for dense and pruned non-uniform models; compare reports."""

from __future__ import annotations

import csv
import json

import onnx
import pytest
import torch

from nvit.arch import ArchSpec, BlockSpec
from nvit.errors import BackendError
from nvit.export.verify import Tolerance, verify_onnx
from nvit.lut.base import FlopsPredictor
from nvit.models import BlockKeep, KeepIndices, apply_keep_as_gates, build_model, slice_model
from nvit.models.onnx import export_onnx
from nvit.plots import save_compare
from nvit.presets import preset
from nvit.profiler.harness import TimingStats
from nvit.validation.compare import Variant, compare_variants

PRUNED = ArchSpec(
    embed_dim=40,
    blocks=(BlockSpec(3, 8, 16, 96), BlockSpec(1, 16, 8, 32), BlockSpec(4, 16, 16, 200), BlockSpec(2, 8, 4, 8)),
    img_size=8, patch_size=2, in_chans=1, num_classes=10, qk_scale=0.25, name="pruned",
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = {}
    folder = tmp_path_factory.mktemp("onnx")
    for name, spec in (("dense", preset("vit_test")), ("pruned", PRUNED)):
        model = build_model(spec, seed=1).eval()
        path = export_onnx(model, torch.randn(2, 1, 8, 8), folder / f"{name}.onnx")
        out[name] = (model, path)
    return out


@pytest.mark.parametrize("name", ["dense", "pruned"])
def test_export_passes_checker_and_matches_pytorch(exported, name: str) -> None:
    model, path = exported[name]
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    assert graph.opset_import[0].version >= 18
    batch_dim = graph.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param, "batch dimension must be dynamic"
    report = verify_onnx(model, path, input_shape=(1, 1, 8, 8), batch_sizes=(1, 5))
    assert report, report.summary()
    assert [c.batch_size for c in report.checks] == [1, 5]
    assert report.max_abs_error < 1e-4


def test_export_reuses_the_exporter_registry_and_writes_the_same_bytes(tmp_path) -> None:
    from torch.onnx._internal.exporter import _registration

    from nvit.models import onnx as onnx_export

    original = _registration.ONNXRegistry.__dict__["from_torchlib"]
    model = build_model(PRUNED, seed=1).eval()
    x = torch.randn(1, 1, 8, 8)
    onnx_export._REGISTRIES.clear()
    first = export_onnx(model, x, tmp_path / "first.onnx", dynamic_batch=False)  # builds the registry
    built = dict(onnx_export._REGISTRIES)
    second = export_onnx(model, x, tmp_path / "second.onnx", dynamic_batch=False)  # reuses it
    assert list(built) == [onnx_export.DEFAULT_OPSET]
    assert onnx_export._REGISTRIES[onnx_export.DEFAULT_OPSET] is built[onnx_export.DEFAULT_OPSET]
    assert first.read_bytes() == second.read_bytes()
    assert _registration.ONNXRegistry.__dict__["from_torchlib"] is original  # restored after each export


def test_verification_fails_when_weights_differ(exported) -> None:
    model, path = exported["dense"]
    other = build_model(model.spec, seed=2).eval()
    report = verify_onnx(other, path, input_shape=(1, 1, 8, 8))
    assert not report
    assert report.max_abs_error > Tolerance.FP32.atol
    assert "FAILED" in report.summary()


def test_sliced_model_exports_and_verifies(tmp_path) -> None:
    spec = preset("vit_test")
    model = build_model(spec, seed=3).eval()
    keep = KeepIndices(
        emb=tuple(range(0, 64, 2)),
        blocks=tuple(BlockKeep(tuple(range(h)), tuple(range(8)), tuple(range(4, 16)), tuple(range(0, 256, 3)))
                     for h in (4, 3, 2, 1)),
    )
    apply_keep_as_gates(model, keep)
    small = slice_model(model).eval()
    path = export_onnx(small, torch.randn(1, 1, 8, 8), tmp_path / "small.onnx")
    assert verify_onnx(small, path, input_shape=(1, 1, 8, 8))
    # and the exported pruned graph computes what the gated dense model computes
    x = torch.randn(3, 1, 8, 8)
    from nvit.export.verify import ort_session

    (got,) = ort_session(path).run(None, {"input": x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(x), atol=1e-4, rtol=1e-4)


def test_missing_provider_is_a_clear_error(exported) -> None:
    from nvit.export.verify import ort_session

    with pytest.raises(BackendError, match="onnxruntime-gpu"):
        ort_session(exported["dense"][1], provider="CUDAExecutionProvider")


def _stats(ms: float) -> TimingStats:
    return TimingStats(ms, ms, ms * 0.95, ms * 1.05, ms * 1.1, ms * 0.02, 0.02, ms * 0.01, 50)


def test_compare_report_figures_and_files(tmp_path) -> None:
    base_spec = preset("vit_test")
    predictor = FlopsPredictor(base_spec, reference_ms=2.0)
    measured = {"base": 2.2, "pruned": 1.0}  # a fake device: 10% slower on the base, exact... almost
    base = Variant("base", base_spec, None, top1=0.95)
    pruned = Variant("pruned", PRUNED, None, target_ms=1.1, top1=0.9)
    report = compare_variants(base, [pruned], predictor, lambda v: _stats(measured[v.name]))
    by_name = {r.name: r for r in report.results}
    pred_pruned = predictor.predict_ms(PRUNED)
    assert by_name["base"].error_pct == pytest.approx(100 * (2.0 - 2.2) / 2.2)
    assert by_name["pruned"].error_pct == pytest.approx(100 * (pred_pruned - 1.0) / 1.0)
    assert by_name["pruned"].speedup_measured == pytest.approx(2.2)
    assert by_name["pruned"].speedup_predicted == pytest.approx(2.0 / pred_pruned)
    assert by_name["pruned"].target_met_measured is True
    assert by_name["base"].target_met_measured is None
    paths = save_compare(report, tmp_path)
    doc = json.loads(paths["json"].read_text())
    assert doc["schema_version"] == 3 and len(doc["results"]) == 2 and doc["trust"]["verdict"] in ("quiet", "noisy")
    assert all(r["arch"]["embed_dim"] > 0 for r in doc["results"])  # what nvit lut learn refits on
    rows = list(csv.DictReader(paths["csv"].open()))
    assert rows[1]["name"] == "pruned" and float(rows[1]["measured_ms"]) == 1.0
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
