"""The content-addressed ONNX store: same content -> same key and one export; other content -> other key;
least recently used entries go first when the store is full."""

from __future__ import annotations

import os
import time

import torch

from nvit.presets import preset
from nvit.profiler.backends.common import OnnxCache
from nvit.profiler.onnx_store import OnnxStore, content_key, default_store
from nvit.profiler.workloads import build_part_module, part_workload
from nvit.vocab import PartConfig, PartKind, Precision


def test_key_follows_content_not_identity() -> None:
    base = preset("vit_test")
    c = PartConfig(PartKind.MLP, 32, mlp_dim=64)
    a, b = build_part_module(c, base), build_part_module(c, base)
    shape = (1, 17, 32)
    assert content_key(a, shape, "fp32", 18) == content_key(b, shape, "fp32", 18)  # same seed, same bytes
    assert content_key(a, shape, "fp32", 18) != content_key(a, shape, "fp16", 18)
    assert content_key(a, shape, "fp32", 18) != content_key(a, (2, 17, 32), "fp32", 18)
    assert content_key(a, shape, "fp32", 18) != content_key(a, shape, "fp32", 19)
    with torch.no_grad():
        b.mlp.fc1.weight[0, 0] += 1.0
    assert content_key(a, shape, "fp32", 18) != content_key(b, shape, "fp32", 18)  # one weight differs
    other = build_part_module(PartConfig(PartKind.MLP, 32, mlp_dim=72), base)
    assert content_key(a, shape, "fp32", 18) != content_key(other, shape, "fp32", 18)


def test_second_session_reuses_the_stored_export(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("NVIT_CACHE_DIR", str(tmp_path))
    w = part_workload(PartConfig(PartKind.ATTN, 32, heads=2, qk_dim=8, v_dim=8), preset("vit_test"), 1)
    calls = []
    import nvit.models.onnx as onnx_export

    real = onnx_export.export_onnx
    monkeypatch.setattr(onnx_export, "export_onnx", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = OnnxCache("t")
    p1 = first.path(w, Precision.FP32)
    data = p1.read_bytes()
    first.close()
    second = OnnxCache("t")
    p2 = second.path(w, Precision.FP32)
    assert len(calls) == 1 and p2 == p1 and p2.read_bytes() == data
    assert str(p2).startswith(str(tmp_path / "onnx"))
    second.close()
    assert p2.exists()  # the store outlives the sessions
    monkeypatch.setenv("NVIT_ONNX_CACHE", "0")
    assert default_store() is None
    third = OnnxCache("t")
    assert third.path(w, Precision.FP32) != p2 and len(calls) == 2
    third.close()


def test_the_store_lives_in_the_cache_folder_every_nvit_cache_shares(tmp_path, monkeypatch) -> None:
    from nvit.fileio import nvit_cache_dir

    monkeypatch.delenv("NVIT_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_store().root == tmp_path / "xdg" / "nvit" / "onnx" == nvit_cache_dir() / "onnx"
    monkeypatch.setenv("NVIT_CACHE_DIR", str(tmp_path / "mine"))
    assert default_store().root == tmp_path / "mine" / "onnx"


def test_least_recently_used_entries_are_evicted(tmp_path) -> None:
    store = OnnxStore(tmp_path, max_bytes=250)
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 100)
    for i, key in enumerate(("aa1", "bb2", "cc3")):
        store.put(key, src)
        os.utime(store._path(key), (time.time() - 100 + i, time.time() - 100 + i))
    assert store.get("aa1") is not None  # touched: now the most recent
    assert store.evict() == 1
    assert store.get("bb2") is None and store.get("aa1") is not None and store.get("cc3") is not None
    assert store.size_bytes() == 200
