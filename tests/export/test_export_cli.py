"""`nvit export` end to end on CPU, its error paths, and the TensorRT engine path (GPU hosts only)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from cli_run import run_cli

from nvit.arch import save_arch
from nvit.errors import ExportError
from nvit.export.engine import read_engine_meta
from nvit.models import build_model, save_variant
from nvit.presets import preset


@pytest.fixture()
def variant(tmp_path):
    model = build_model(preset("vit_test"), seed=0)
    return save_variant(model, tmp_path / "variant", provenance={"top1": 0.5})


def test_export_variant_writes_verified_onnx_and_metadata(variant, capsys) -> None:
    code, stdout, err = run_cli(["export", str(variant), "--measure", "--threads", "1"], capsys)
    assert code == 0, err
    meta = json.loads((variant / "export" / "export.json").read_text())
    assert meta["engine"]["timing_backend"]["intra_op_threads"] == 1, "timed with the threads asked for"
    assert meta["verify"]["passed"] and meta["verify"]["max_abs_error"] < 1e-4
    assert meta["onnx"]["opset"] >= 18 and meta["provenance"]["top1"] == 0.5
    assert meta["timing"]["latency_ms_median"] > 0
    assert meta["schema_version"] == 2 and meta["conditions"]["verdict"] in ("quiet", "noisy", "unusable")
    assert meta["conditions"]["wall_s"] > 0 and meta["conditions"]["repeat_spread"] >= 0
    assert "max abs error" in stdout
    assert f"conditions while timing: {meta['conditions']['verdict']}" in " ".join(stdout.split())
    assert (variant / "export" / "model.onnx").stat().st_size > 100_000


def test_export_without_tensorrt_is_one_clear_error(variant, capsys, monkeypatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_tensorrt(name, *args, **kwargs):
        if name == "tensorrt":
            raise ImportError("No module named 'tensorrt'", name="tensorrt")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorrt)
    code, _, err = run_cli(["export", str(variant), "--trt"], capsys)
    assert code == 1
    assert "pip install 'nvit[trt]'" in err and "Traceback" not in err
    assert not (variant / "export").exists(), "no work is done when the engine cannot be built"


def test_missing_weights_and_mismatched_arch_are_errors(variant, tmp_path, capsys) -> None:
    (variant / "model.safetensors").unlink()
    code, _, err = run_cli(["export", str(variant)], capsys)
    assert code == 1 and "weights file" in err
    ckpt = tmp_path / "small.pth"
    torch.save(build_model(preset("vit_test"), seed=0).state_dict(), ckpt)
    code, _, err = run_cli(["export", str(ckpt), "--arch", "deit_tiny"], capsys)
    assert code == 1 and "missing from the checkpoint" in err
    narrow = preset("vit_test")
    narrow = narrow.with_blocks(tuple(replace(b, mlp_dim=128) for b in narrow.blocks))
    code, _, err = run_cli(["export", str(ckpt), "--arch", str(save_arch(narrow, tmp_path / "narrow.json"))], capsys)
    assert code == 1 and "'blocks.0.mlp.fc1.weight' has shape (256, 64), the model expects (128, 64)" in err
    assert len([line for line in err.splitlines() if line.strip()]) == 1


def test_engine_for_another_device_is_refused(tmp_path) -> None:
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"serialized")
    (tmp_path / "model.engine.json").write_text(json.dumps({"device": {"gpu": {"name": "NVIDIA H100 80GB HBM3"}}}))
    assert read_engine_meta(engine, device_name="NVIDIA H100 80GB HBM3")
    with pytest.raises(ExportError, match="built for NVIDIA H100 80GB HBM3, this device is NVIDIA A100"):
        read_engine_meta(engine, device_name="NVIDIA A100")
    (tmp_path / "model.engine.json").unlink()
    with pytest.raises(ExportError, match="no metadata"):
        read_engine_meta(engine)


@pytest.mark.gpu
@pytest.mark.trt
def test_tensorrt_engine_builds_checks_and_times(variant) -> None:
    pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from nvit.export.pipeline import ExportOptions, export_model
    from nvit.models import load_variant
    from nvit.vocab import DeviceKind, Precision

    for precision in (Precision.FP32, Precision.FP16):
        options = ExportOptions(out_dir=variant / f"trt-{precision.value}", trt=True, precision=precision,
                                measure_backend="tensorrt", device=DeviceKind.CUDA)
        result = export_model(load_variant(variant), options)
        meta = read_engine_meta(result.engine_path, device_name=torch.cuda.get_device_name())
        assert meta["check"]["passed"] and result.timing.latency_ms_median > 0
