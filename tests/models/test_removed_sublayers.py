"""Whole sub-layers and blocks absent in the model: exact counts, gates at zero equal to slicing, arch files old and
new, checkpoint inference and a verified ONNX export (pricing and pruning them: tests/pruning/
test_sublayer_pruning.py)."""

from __future__ import annotations

import json

import torch
from cli_run import run_cli

from nvit.arch import ArchSpec, BlockSpec, load_arch_file, save_arch
from nvit.models import build_model, slice_model
from nvit.models.checkpoint import infer_arch
from nvit.presets import preset

SPEC = preset("vit_test")
REMOVED = ArchSpec(embed_dim=32, blocks=(BlockSpec(2, 8, 16, 0), BlockSpec(0, 0, 0, 48), BlockSpec(3, 16, 8, 32)),
                   img_size=8, patch_size=2, in_chans=1, num_classes=10, qk_scale=0.25)


def test_removed_sublayers_count_params_and_flops_exactly() -> None:
    model = build_model(REMOVED, seed=0)
    assert REMOVED.num_params() == sum(p.numel() for p in model.parameters())
    assert model.blocks[0].mlp is None and model.blocks[0].norm2 is None and model.blocks[1].attn is None
    assert REMOVED.removed_sublayers == {"attn": 1, "mlp": 1}
    from torch.utils.flop_counter import FlopCounterMode

    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        model.eval()(torch.randn(1, 1, 8, 8))
    assert fc.get_total_flops() == REMOVED.flops()


def test_branch_gates_at_zero_equal_the_sliced_model_exactly() -> None:
    model = build_model(SPEC, seed=3).eval()
    model.enable_gates()
    with torch.no_grad():
        model.blocks[0].mlp_gate.zero_()
        model.blocks[1].attn_gate.zero_()
        model.blocks[2].attn_gate.zero_()
        model.blocks[2].mlp_gate.zero_()  # block 2 is dropped
        model.emb_gate[5] = 0
        model.blocks[3].attn.head_gate[1] = 0
    x = torch.randn(4, 1, 8, 8)
    sliced = slice_model(model)
    assert sliced.spec.blocks == (BlockSpec(4, 16, 16, 0), BlockSpec(0, 0, 0, 256), BlockSpec(3, 16, 16, 256))
    assert sliced.spec.embed_dim == 63 and sliced.spec.depth == 3
    with torch.no_grad():
        torch.testing.assert_close(sliced(x), model(x), atol=1e-6, rtol=1e-5)


def test_arch_files_round_trip_and_old_ones_still_load(tmp_path, capsys) -> None:
    path = save_arch(REMOVED, tmp_path / "arch.json")
    doc = json.loads(path.read_text())
    assert doc["schema_version"] == 2 and doc["arch"]["blocks"][1] == {"heads": 0, "qk_dim": 0, "v_dim": 0,
                                                                        "mlp_dim": 48}
    assert load_arch_file(path)[0] == REMOVED
    old = {**doc, "schema_version": 1, "arch": SPEC.to_dict()}
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert load_arch_file(tmp_path / "old.json")[0] == SPEC
    code, out, _ = run_cli(["arch", "show", str(path)], capsys)
    assert code == 0 and "attn removed" in out and "mlp removed" in out
    assert "removed: 1 attention, 1 MLP" in " ".join(out.split())


def test_checkpoint_inference_sees_removed_sublayers() -> None:
    spec = REMOVED.with_blocks((BlockSpec(2, 8, 8, 0), BlockSpec(0, 0, 0, 48), BlockSpec(3, 8, 8, 32)))
    inferred = infer_arch(build_model(spec, seed=0).state_dict(), head_dim=8)
    assert inferred.blocks == spec.blocks


def test_onnx_export_of_removed_sublayers_verifies(tmp_path) -> None:
    from nvit.export.pipeline import ExportOptions, export_model
    from nvit.export.verify import ort_session

    model = build_model(REMOVED, seed=1).eval()
    result = export_model(model, ExportOptions(out_dir=tmp_path))
    assert result.verify and result.verify.max_abs_error < 1e-4
    x = torch.randn(3, 1, 8, 8)
    (got,) = ort_session(result.onnx_path).run(None, {"input": x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(x), atol=1e-4, rtol=1e-4)
