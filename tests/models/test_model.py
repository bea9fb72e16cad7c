"""The ViT against an independent reference forward, and timm/DeiT checkpoint loading."""

from __future__ import annotations

import math

import pytest
import torch

from nvit.arch import ArchSpec, BlockSpec
from nvit.errors import CheckpointError
from nvit.models import build_model, infer_arch, load_checkpoint, load_variant, read_state_dict, save_variant
from nvit.presets import preset


def timm_state_dict(spec, seed: int) -> dict[str, torch.Tensor]:
    """A random state dict with timm/DeiT names and shapes (fused qkv of 3*heads*head_dim rows)."""
    g = torch.Generator().manual_seed(seed)
    ref = build_model(spec).state_dict()
    return {k: torch.randn(v.shape, generator=g) * (0.5 if v.dim() > 1 else 0.1) for k, v in ref.items()}


def reference_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, *, heads: int, depth: int,
                      distilled: bool, eps: float = 1e-6) -> torch.Tensor:
    """A plain ViT/DeiT forward written from the paper's equations, not from nvit's modules."""

    def ln(t, p):
        mu = t.mean(-1, keepdim=True)
        var = ((t - mu) ** 2).mean(-1, keepdim=True)
        return (t - mu) / torch.sqrt(var + eps) * sd[p + ".weight"] + sd[p + ".bias"]

    def lin(t, p):
        return t @ sd[p + ".weight"].T + sd[p + ".bias"]

    w = sd["patch_embed.proj.weight"]
    e, _, p, _ = w.shape
    b, c, hgt, wid = x.shape
    patches = x.reshape(b, c, hgt // p, p, wid // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
    tokens = patches @ w.reshape(e, -1).T + sd["patch_embed.proj.bias"]
    prefix = [sd["cls_token"].expand(b, 1, e)]
    if distilled:
        prefix.append(sd["dist_token"].expand(b, 1, e))
    t = torch.cat([*prefix, tokens], 1) + sd["pos_embed"]
    n = t.shape[1]
    d = e // heads
    for i in range(depth):
        pre = f"blocks.{i}."
        qkv = lin(ln(t, pre + "norm1"), pre + "attn.qkv").reshape(b, n, 3, heads, d)
        q, k, v = (qkv[:, :, j].transpose(1, 2) for j in range(3))
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
        t = t + lin((attn @ v).transpose(1, 2).reshape(b, n, e), pre + "attn.proj")
        hidden = lin(ln(t, pre + "norm2"), pre + "mlp.fc1")
        hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))
        t = t + lin(hidden, pre + "mlp.fc2")
    t = ln(t, "norm")
    out = lin(t[:, 0], "head")
    if distilled:
        out = (out + lin(t[:, 1], "head_dist")) / 2
    return out


@pytest.mark.parametrize("distilled", [False, True])
def test_forward_equals_reference_for_uniform_deit(tmp_path, distilled: bool) -> None:
    # A DeiT shape shrunk for CPU: 32px images, 8px patches, e=48, 3 heads of 16, mlp 4x.
    spec = ArchSpec(embed_dim=48, blocks=(BlockSpec(3, 16, 16, 192),) * 3, img_size=32, patch_size=8,
                    num_classes=10, distilled=distilled)
    sd = timm_state_dict(spec, seed=1)
    path = tmp_path / "deit.pth"
    torch.save({"model": sd, "epoch": 3} if distilled else sd, path)
    model = load_checkpoint(path, spec)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(x)
    expected = reference_forward(sd, x, heads=3, depth=3, distilled=distilled)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


def test_infer_arch_from_timm_keys_and_module_prefix(tmp_path) -> None:
    spec = preset("deit_tiny_distilled", img_size=32, patch_size=8)
    sd = {f"module.{k}": v for k, v in timm_state_dict(spec, seed=2).items()}
    path = tmp_path / "ddp.pth"
    torch.save({"model": sd}, path)
    inferred = infer_arch(read_state_dict(path), head_dim=64)
    assert inferred.blocks == spec.blocks and inferred.distilled and inferred.img_size == 32
    model = load_checkpoint(path)  # architecture inferred from the file
    assert model.spec.num_params() == spec.num_params()


def test_unmatched_tensor_is_named(tmp_path) -> None:
    spec = preset("vit_test")
    sd = timm_state_dict(spec, seed=3)
    sd["blocks.0.attn.relative_bias"] = torch.zeros(3)
    torch.save(sd, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"blocks\.0\.attn\.relative_bias"):
        load_checkpoint(tmp_path / "extra.pth", spec)
    del sd["blocks.0.attn.relative_bias"]
    del sd["blocks.3.mlp.fc2.bias"]
    torch.save(sd, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"missing.*blocks\.3\.mlp\.fc2\.bias"):
        load_checkpoint(tmp_path / "missing.pth", spec)


def test_misshaped_tensor_is_named(tmp_path) -> None:
    spec = preset("vit_test")
    sd = timm_state_dict(spec, seed=4)
    sd["blocks.2.mlp.fc1.weight"] = torch.zeros(128, 64)
    torch.save(sd, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match=r"blocks\.2\.mlp\.fc1\.weight.*\(128, 64\).*\(256, 64\)"):
        load_checkpoint(tmp_path / "shape.pth", spec)


def test_corrupt_and_missing_checkpoints(tmp_path) -> None:
    (tmp_path / "junk.pth").write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        read_state_dict(tmp_path / "junk.pth")
    with pytest.raises(CheckpointError, match="not found"):
        read_state_dict(tmp_path / "nope.pth")
    torch.save({"model": {"x": 1}}, tmp_path / "nontensor.pth")
    with pytest.raises(CheckpointError, match="not a tensor"):
        read_state_dict(tmp_path / "nontensor.pth")


def test_variant_round_trip_excludes_gates(tmp_path) -> None:
    spec = preset("vit_test")
    model = build_model(spec, seed=5).eval()
    model.enable_gates()
    save_variant(model, tmp_path / "v", provenance={"note": "unit test"})
    loaded = load_variant(tmp_path / "v")
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert "emb_gate" not in read_state_dict(tmp_path / "v" / "model.safetensors")
    (tmp_path / "v" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="weights file"):
        load_variant(tmp_path / "v")


def test_gates_of_one_do_not_change_outputs() -> None:
    model = build_model(preset("vit_test"), seed=6).eval()
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        before = model(x)
        model.enable_gates()
        after = model(x)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
