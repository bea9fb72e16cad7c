"""ArchSpec: presets, exact parameter counts, FLOPs against a traced count, strict JSON files."""

from __future__ import annotations

import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from nvit.arch import ARCH_SCHEMA_VERSION, ArchSpec, BlockSpec, load_arch_file, save_arch
from nvit.errors import SpecError
from nvit.models import build_model
from nvit.presets import preset, preset_names, resolve_arch


def random_spec(seed: int, *, distilled: bool = False) -> ArchSpec:
    g = torch.Generator().manual_seed(seed)

    def r(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    blocks = tuple(BlockSpec(heads=r(1, 4), qk_dim=r(1, 12), v_dim=r(1, 12), mlp_dim=r(1, 48)) for _ in range(3))
    return ArchSpec(embed_dim=r(8, 24), blocks=blocks, img_size=8, patch_size=2, in_chans=3, num_classes=5,
                    distilled=distilled, qk_scale=0.25)


@pytest.mark.parametrize(
    ("name", "params_m", "gmacs"),
    [("deit_tiny", 5.72, 1.26), ("deit_small", 22.05, 4.61), ("deit_base", 86.57, 17.57)],
)
def test_deit_presets_match_published_sizes(name: str, params_m: float, gmacs: float) -> None:
    spec = preset(name)
    assert spec.num_tokens == 197 and spec.depth == 12
    assert spec.num_params() / 1e6 == pytest.approx(params_m, abs=0.005)
    # DeiT reports 1.3 / 4.6 / 17.6 GFLOPs (counted as multiply-adds) for 224px images.
    assert spec.macs() / 1e9 == pytest.approx(gmacs, abs=0.02)


@pytest.mark.parametrize("name", ["deit_tiny", "deit_small_distilled", "vit_test"])
def test_num_params_equals_model_for_presets(name: str) -> None:
    spec = preset(name)
    model = build_model(spec)
    assert sum(p.numel() for p in model.parameters()) == spec.num_params()


@pytest.mark.parametrize("seed", range(4))
def test_num_params_and_flops_equal_model_for_random_specs(seed: int) -> None:
    spec = random_spec(seed, distilled=bool(seed % 2))
    model = build_model(spec, seed=seed).eval()
    assert sum(p.numel() for p in model.parameters()) == spec.num_params()
    x = torch.randn(3, spec.in_chans, spec.img_size, spec.img_size)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x)
    assert counter.get_total_flops() == 3 * spec.flops()


def test_traced_flops_of_deit_small_block() -> None:
    spec = preset("deit_small")
    block = build_model(spec).blocks[0].eval()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        block(torch.randn(1, spec.num_tokens, spec.embed_dim))
    assert counter.get_total_flops() == spec.block_flops(0)


def test_json_round_trip_keeps_spec_and_provenance(tmp_path) -> None:
    spec = random_spec(7, distilled=True)
    path = save_arch(spec, tmp_path / "arch.json", provenance={"base": "vit_test", "target_ms": 1.5})
    loaded, provenance = load_arch_file(path)
    assert loaded == spec
    assert provenance == {"base": "vit_test", "target_ms": 1.5}
    doc = json.loads(path.read_text())
    assert doc["schema_version"] == ARCH_SCHEMA_VERSION
    assert doc["summary"]["params"] == spec.num_params()
    assert not list(tmp_path.glob(".*.tmp")), "atomic write left a temporary file"


def test_bare_spec_file_and_resolve(tmp_path) -> None:
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(preset("deit_tiny").to_dict()))
    assert resolve_arch(str(path)) == preset("deit_tiny")
    assert resolve_arch("deit_tiny") == preset("deit_tiny")
    assert set(preset_names()) >= {"deit_tiny", "deit_small", "deit_base", "deit_base_distilled", "vit_test"}


def _write(tmp_path, doc) -> str:
    path = tmp_path / "bad.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return str(path)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(colour="red"), "unknown architecture key"),
        (lambda d: d["blocks"][0].update(heads=0), "all be positive .attention. or all 0"),
        (lambda d: d["blocks"][1].update(heads=0, qk_dim=0, v_dim=0, mlp_dim=0), "drop the block instead"),
        (lambda d: d["blocks"][1].update(mlp_dim=-4), "mlp_dim must be a non-negative integer"),
        (lambda d: d["blocks"][0].update(extra=1), "unknown keys"),
        (lambda d: d.update(blocks=[]), "at least one block"),
        (lambda d: d.update(embed_dim=0), "embed_dim must be a positive integer"),
        (lambda d: d.update(img_size=9), "not a multiple of patch_size"),
        (lambda d: d.pop("embed_dim"), "missing key"),
        (lambda d: d["blocks"][0].update(qk_dim=2.5), "qk_dim must be a non-negative integer"),
    ],
)
def test_bad_specs_raise_one_clear_error(tmp_path, mutate, message) -> None:
    doc = preset("vit_test").to_dict()
    mutate(doc)
    with pytest.raises(SpecError, match=message):
        load_arch_file(_write(tmp_path, doc))


def test_bad_files_raise_spec_errors(tmp_path) -> None:
    with pytest.raises(SpecError, match="not valid JSON"):
        load_arch_file(_write(tmp_path, "{not json"))
    with pytest.raises(SpecError, match="not found"):
        load_arch_file(tmp_path / "missing.json")
    with pytest.raises(SpecError, match="schema_version"):
        load_arch_file(_write(tmp_path, {"schema_version": 99, "arch": preset("vit_test").to_dict()}))
    with pytest.raises(SpecError, match="unknown architecture preset"):
        preset("deit_huge")
    with pytest.raises(SpecError, match="neither a preset"):
        resolve_arch("deit_huge")


def test_wrong_block_count_for_keep_indices_is_an_error() -> None:
    from nvit.models import KeepIndices

    spec = preset("vit_test")
    keep = KeepIndices.full(spec)
    short = KeepIndices(emb=keep.emb, blocks=keep.blocks[:-1])
    with pytest.raises(SpecError, match="blocks"):
        short.validated(spec)
