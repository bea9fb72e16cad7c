"""The check of an exported TensorRT engine: an fp32 engine built with TF32 is judged at TF32's tolerance
(its logits are not fp32's), TF32 can be turned off and is recorded either way, top-1 must agree on
clear-cut samples. TF32 is emulated on the CPU by rounding every matrix product's operands to 10-bit
mantissas, as TF32 tensor cores do."""

from __future__ import annotations

import copy
import json
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fake_gpu import DataType, Device, install_fake_tensorrt

from nvit.errors import ExportError
from nvit.export import engine as engine_module
from nvit.export.verify import Tolerance, compare_logits
from nvit.models import build_model
from nvit.presets import preset
from nvit.vocab import Precision

SHAPE = (8, 1, 8, 8)


def to_tf32(t: torch.Tensor) -> torch.Tensor:
    """Round fp32 to TF32 (10 explicit mantissa bits), to nearest even."""
    bits = t.contiguous().view(torch.int32)
    bits = (bits + 0x0FFF + ((bits >> 13) & 1)) & ~0x1FFF
    return bits.view(torch.float32)


def tf32_model(model: torch.nn.Module) -> torch.nn.Module:
    emulated = copy.deepcopy(model)
    for m in emulated.modules():
        if isinstance(m, torch.nn.Linear):
            m.forward = lambda x, m=m: F.linear(to_tf32(x), to_tf32(m.weight), m.bias)
    return emulated


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    m = build_model(preset("vit_test"), seed=0).eval()
    with torch.no_grad():
        m.head.weight.mul_(10.0)  # logits of a trained model's size (a few units), not init's tenths
    return m


def logits(model: torch.nn.Module, seed: int = 0) -> np.ndarray:
    with torch.no_grad():
        return model(torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))).numpy()


def test_engine_tolerances():
    assert Tolerance.for_engine(Precision.FP32, tf32=True) is Tolerance.TF32
    assert Tolerance.for_engine(Precision.FP32, tf32=False) is Tolerance.FP32
    assert Tolerance.for_engine(Precision.FP16, tf32=True) is Tolerance.FP16
    assert Tolerance.for_engine(Precision.BF16, tf32=False) is Tolerance.BF16


def test_tf32_logits_fail_the_fp32_tolerance_and_pass_the_tf32_one(model):
    reference, tf32 = logits(model), logits(tf32_model(model))
    strict = compare_logits(tf32, reference, Tolerance.FP32)
    assert not strict.within_tolerance and strict.max_abs_error > 10 * Tolerance.FP32.atol  # the old check
    aware = compare_logits(tf32, reference, Tolerance.TF32)
    assert aware.passed and aware.top1_agreement == 1.0 and aware.decisive_samples >= 6
    assert aware.max_abs_error < Tolerance.TF32.atol / 3  # with room to spare
    assert compare_logits(reference, reference, Tolerance.FP32).passed


def test_top1_must_agree_where_the_reference_is_clear_cut():
    expected = np.array([[5.0, 1.0, 0.0], [2.0, 1.999, 0.0]])  # a clear lead, a near tie
    tie_flipped = np.array([[5.0, 1.0, 0.0], [1.999, 2.0, 0.0]])
    check = compare_logits(tie_flipped, expected, Tolerance.TF32)
    assert check.passed and check.top1_agreement == 0.5 and check.decisive_samples == 1
    lead_flipped = np.array([[1.0, 5.0, 0.0], [2.0, 1.999, 0.0]])
    check = compare_logits(lead_flipped, expected, Tolerance.BF16)
    assert not check.passed and check.decisive_disagreements == 1
    with pytest.raises(ExportError, match="output shape"):
        compare_logits(expected[:1], expected, Tolerance.FP32)


@pytest.fixture
def export_rig(monkeypatch, tmp_path, model):
    """``build_engine_file`` on a fake TensorRT; the engine "runs" the model with TF32 emulated when the
    builder had the TF32 flag, exact fp32 otherwise."""
    machine = Device()
    trt, _ = install_fake_tensorrt(monkeypatch, machine, tmp_path / "model.onnx", input_dtype=DataType.FLOAT)

    def run_engine(backend, engine, inputs):
        tf32 = any(f.name == "TF32" for f in trt.configs[-1].flags)
        runner = tf32_model(model) if tf32 else model
        with torch.no_grad():
            return [runner(x).numpy() for x in inputs]

    monkeypatch.setattr(engine_module, "run_engine", run_engine)
    monkeypatch.setattr("nvit.profiler.device.backend_fingerprint",
                        lambda backend: types.SimpleNamespace(to_dict=lambda: {"gpu": {"name": "NVIDIA H200"}}))
    return trt


@pytest.mark.parametrize(("tf32", "tolerance"), [(True, "tf32"), (False, "fp32")])
def test_an_fp32_engine_records_tf32_and_is_checked_at_its_tolerance(export_rig, tmp_path, model, tf32, tolerance):
    path, meta = engine_module.build_engine_file(model, tmp_path / "model.engine", SHAPE, Precision.FP32, tf32=tf32,
                                                 cache_dir=tmp_path / "cache")
    assert meta["tf32"] is tf32 and meta["settings"]["tf32"] is tf32 and meta["settings"]["applied"]["tf32"] is tf32
    assert meta["check"]["tolerance"] == tolerance and meta["check"]["passed"]
    assert meta["check"]["samples"] == engine_module.CHECK_BATCHES * SHAPE[0]
    assert meta["local_settings"]["cache_dir"] == str(tmp_path / "cache") and path.read_bytes() == b"ENGINE"
    on_disk = json.loads((tmp_path / "model.engine.json").read_text())
    assert on_disk["tf32"] is tf32 and on_disk["check"]["tolerance"] == tolerance


def test_an_engine_that_computes_something_else_fails_its_check(export_rig, tmp_path, model, monkeypatch):
    monkeypatch.setattr(engine_module, "run_engine",
                        lambda backend, engine, inputs: [np.zeros((x.shape[0], 10), np.float32) for x in inputs])
    with pytest.raises(ExportError, match=r"engine differs from PyTorch: max abs error .* \(atol 0\.01, rtol 0\.01, "
                                          r"tf32\), top-1 differs on [1-9]\d* of \d+ clear-cut samples"):
        engine_module.build_engine_file(model, tmp_path / "model.engine", SHAPE, Precision.FP32,
                                        cache_dir=tmp_path / "cache")
    assert not list(tmp_path.glob("model.engine*"))  # nothing that looks like a checked engine
