"""Swin: exact parameter counts and FLOPs against a traced count, the published Swin-T/S/B sizes, the forward
against a reference written token by token from the paper's definitions, timm's two checkpoint layouts, and
ONNX export (the shift and its mask) verified in ONNX Runtime."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from nvit.arch import BlockSpec
from nvit.errors import CheckpointError, SpecError
from nvit.models.swin import build_swin
from nvit.models.swin_checkpoint import canonical_swin_state, infer_swin_arch, load_swin_checkpoint
from nvit.swin import SwinSpec, SwinStage, swin_preset

SMALL = swin_preset("swin_test")
#: A pruned-looking Swin: per-block widths, Q/K and V widths apart, one attention and one MLP removed.
RAGGED = SwinSpec(stages=(SwinStage(24, (BlockSpec(3, 8, 16, 40), BlockSpec(2, 16, 8, 0))),
                          SwinStage(40, (BlockSpec(0, 0, 0, 72), BlockSpec(4, 8, 8, 96))),
                          SwinStage(48, (BlockSpec(2, 24, 16, 64),))),
                  img_size=32, patch_size=2, in_chans=1, num_classes=10, window_size=4, name="ragged")


@pytest.mark.parametrize("spec", [SMALL, RAGGED], ids=lambda s: s.name)
def test_params_and_flops_are_exact(spec: SwinSpec) -> None:
    model = build_swin(spec, seed=0).eval()
    assert spec.num_params() == sum(p.numel() for p in model.parameters())
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, spec.in_chans, spec.img_size, spec.img_size))
    assert spec.flops() == counter.get_total_flops()


def test_the_published_sizes() -> None:
    """Swin-T/S/B as published (224 px, window 7): 28.3 M / 49.6 M / 87.8 M params, 4.5 / 8.7 / 15.4 GMACs."""
    tiny, small, base = (swin_preset(n) for n in ("swin_tiny", "swin_small", "swin_base"))
    assert tiny.num_params() == 28_288_354  # torchvision's swin_t and timm's swin_tiny_patch4_window7_224
    assert round(tiny.macs() / 1e9, 1) == 4.5
    assert round(small.num_params() / 1e6, 1) == 49.6 and round(small.macs() / 1e9, 1) == 8.7
    assert round(base.num_params() / 1e6, 1) == 87.8 and round(base.macs() / 1e9, 1) == 15.4
    assert [tiny.resolution(i) for i in range(4)] == [56, 28, 14, 7]
    assert [tiny.shift(3, j) for j in range(2)] == [0, 0]  # one window covers the last stage: no shift
    assert sum(p.numel() for p in build_swin(tiny).parameters()) == tiny.num_params()


def test_spec_round_trips_and_refuses_bad_geometry() -> None:
    assert SwinSpec.from_dict(RAGGED.to_dict()) == RAGGED
    with pytest.raises(SpecError, match="not a multiple of the window"):
        SwinSpec(stages=SMALL.stages, img_size=40, patch_size=2, window_size=6)
    with pytest.raises(SpecError, match="unknown Swin spec key"):
        SwinSpec.from_dict({**SMALL.to_dict(), "depths": [2, 2]})


# ---- a reference from the paper's definitions ------------------------------------------------------------
def _ln(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + 1e-5) * w + b


def _segment(coord: int, res: int, window: int, shift: int) -> int:
    """Which part of the shifted axis a coordinate lies in: tokens of different parts were not neighbours."""
    return 0 if coord < res - window else (1 if coord < res - shift else 2)


def _reference_attention(x: torch.Tensor, sd: dict, p: str, blk: BlockSpec, window: int, shift: int) -> torch.Tensor:
    """One image ``(R, R, C)``: every token attends to the tokens of its window on the grid shifted by
    ``shift`` (coordinates taken mod R), except those the wrap-around brought from the far edge, with the
    bias of their relative offset: softmax(q·k/√d + B) v, per head, then the projection."""
    res, _, c = x.shape
    h, dq, dv = blk.heads, blk.qk_dim, blk.v_dim
    qkv = x.reshape(-1, c) @ sd[p + "attn.qkv.weight"].T + sd[p + "attn.qkv.bias"]
    q, k, v = qkv.split([h * dq, h * dq, h * dv], dim=-1)
    table = sd[p + "attn.relative_position_bias_table"]
    out = torch.zeros(res * res, h * dv, dtype=x.dtype)
    shifted = [((i - shift) % res, (j - shift) % res) for i in range(res) for j in range(res)]
    for t, (ti, tj) in enumerate(shifted):
        mates = [u for u, (ui, uj) in enumerate(shifted)
                 if ui // window == ti // window and uj // window == tj // window
                 and all(_segment(a, res, window, shift) == _segment(b, res, window, shift)
                         for a, b in ((ui, ti), (uj, tj)))] if shift else \
            [u for u, (ui, uj) in enumerate(shifted) if ui // window == ti // window and uj // window == tj // window]
        for head in range(h):
            qh = q[t, head * dq:(head + 1) * dq]
            kh = torch.stack([k[u, head * dq:(head + 1) * dq] for u in mates])
            bias = torch.stack([table[((ti % window) - (shifted[u][0] % window) + window - 1) * (2 * window - 1)
                                      + (tj % window) - (shifted[u][1] % window) + window - 1, head] for u in mates])
            weights = torch.softmax(kh @ qh / math.sqrt(dq) + bias, dim=0)
            out[t, head * dv:(head + 1) * dv] = weights @ torch.stack([v[u, head * dv:(head + 1) * dv] for u in mates])
    return (out @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]).reshape(res, res, c)


def _reference_forward(spec: SwinSpec, sd: dict, image: torch.Tensor) -> torch.Tensor:
    x = torch.nn.functional.conv2d(image[None], sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"],
                                   stride=spec.patch_size)[0].permute(1, 2, 0)
    x = _ln(x, sd["patch_embed.norm.weight"], sd["patch_embed.norm.bias"])
    for s, stage in enumerate(spec.stages):
        if s:
            p = f"layers.{s}.downsample."
            merged = torch.cat([x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2]], dim=-1)
            x = _ln(merged, sd[p + "norm.weight"], sd[p + "norm.bias"]) @ sd[p + "reduction.weight"].T
        res = spec.resolution(s)
        window = min(spec.window_size, res)
        for b, blk in enumerate(stage.blocks):
            p = f"layers.{s}.blocks.{b}."
            shift = spec.window_size // 2 if b % 2 and res > spec.window_size else 0
            if blk.has_attn:
                x = x + _reference_attention(_ln(x, sd[p + "norm1.weight"], sd[p + "norm1.bias"]), sd, p, blk,
                                             window, shift)
            if blk.has_mlp:
                y = _ln(x, sd[p + "norm2.weight"], sd[p + "norm2.bias"])
                y = y @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"]
                x = x + torch.nn.functional.gelu(y) @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]
    x = _ln(x, sd["norm.weight"], sd["norm.bias"]).mean(dim=(0, 1))
    return x @ sd["head.weight"].T + sd["head.bias"]


@pytest.mark.parametrize("spec", [SMALL, RAGGED], ids=lambda s: s.name)
def test_forward_matches_the_reference_from_the_paper(spec: SwinSpec) -> None:
    model = build_swin(spec, seed=1).double().eval()
    with torch.no_grad():  # a non-trivial bias table, so a wrong offset or sign shows
        for m in model.modules():
            if hasattr(m, "relative_position_bias_table"):
                m.relative_position_bias_table.normal_(0, 1.0)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    images = torch.randn(2, spec.in_chans, spec.img_size, spec.img_size, dtype=torch.float64)
    with torch.no_grad():
        got = model(images)
    want = torch.stack([_reference_forward(spec, sd, im) for im in images])
    assert torch.allclose(got, want, atol=1e-9, rtol=1e-9)


# ---- checkpoints -------------------------------------------------------------------------------------------
def _as_original_layout(state: dict) -> dict:
    """The paper's code / older timm: merging at the end of the previous stage, plus the derived buffers."""
    out = {}
    for key, value in state.items():
        if key.startswith("layers.") and ".downsample." in key:
            stage = int(key.split(".")[1])
            key = key.replace(f"layers.{stage}.downsample.", f"layers.{stage - 1}.downsample.", 1)
        out[key] = value
    out["layers.0.blocks.1.attn_mask"] = torch.zeros(4, 16, 16)
    out["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(16, 16, dtype=torch.long)
    return out


def test_both_checkpoint_layouts_load_and_compute_the_same(tmp_path) -> None:
    model = build_swin(SMALL, seed=3).eval()
    images = torch.randn(2, 1, SMALL.img_size, SMALL.img_size)
    state = model.state_dict()
    modern = {k.replace("head.", "head.fc.", 1) if k.startswith("head.") else k: v for k, v in state.items()}
    for name, sd in (("modern", modern), ("original", _as_original_layout(state))):
        path = tmp_path / f"{name}.pth"
        torch.save({"model": sd}, path)
        loaded = load_swin_checkpoint(path, img_size=SMALL.img_size, head_dim=16)
        assert loaded.spec.to_dict() == {**SMALL.to_dict(), "name": name}
        with torch.no_grad():
            assert torch.equal(loaded(images), model(images))


def test_a_checkpoint_that_does_not_fit_is_one_clear_error(tmp_path) -> None:
    state = canonical_swin_state(build_swin(SMALL, seed=0).state_dict())
    extra = {**state, "layers.1.blocks.0.attn.q_bias": torch.zeros(64)}
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"no place in the model: 'layers.1.blocks.0.attn.q_bias'"):
        load_swin_checkpoint(tmp_path / "extra.pth", SMALL)
    wrong = {**state, "head.weight": torch.zeros(7, 64)}
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(CheckpointError, match=r"'head.weight' has shape \(7, 64\), the model expects \(10, 64\)"):
        load_swin_checkpoint(tmp_path / "wrong.pth", SMALL)
    with pytest.raises(CheckpointError, match="stage 0 block 0: qkv width 96 is not 3 x 2 heads x 64"):
        infer_swin_arch(state, img_size=SMALL.img_size, head_dim=64)


def test_onnx_export_keeps_the_shift_and_its_mask(tmp_path) -> None:
    import onnxruntime as ort

    from nvit.models.onnx import export_onnx

    model = build_swin(RAGGED, seed=2).eval()
    path = export_onnx(model, torch.randn(1, 1, 32, 32), tmp_path / "swin.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_providers() == ["CPUExecutionProvider"]
    images = torch.randn(3, 1, 32, 32)  # another batch than exported with: the batch is dynamic
    got = session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]
    with torch.no_grad():
        want = model(images).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_arch_show_and_list_know_swin(capsys) -> None:
    from cli_run import run_cli

    code, out, _ = run_cli(["arch", "show", "swin_tiny"], capsys)
    assert code == 0 and "total: 28.29 M params, 4.49 GMACs" in out and "7/3" in out  # window 7, shift 3
    code, out, _ = run_cli(["arch", "show", "swin_test", "--json"], capsys)
    assert code == 0 and '"kind": "swin"' in out and f'"params": {SMALL.num_params()}' in out
    code, out, _ = run_cli(["arch", "list"], capsys)
    assert code == 0 and "swin_base" in out and "87.77" in out
