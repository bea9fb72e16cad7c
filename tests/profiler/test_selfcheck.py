"""Every table checks itself: held-out models (pruned shapes included) measured after the fit, figures stored
in the metadata, printed by ``nvit lut show``, measured again by ``nvit lut check``; spaces derived for any
architecture by ``nvit profile --arch``."""

from __future__ import annotations

import json

import lut_fakes as fk
import numpy as np
import pytest
import torch
from cli_run import run_cli

from nvit.arch import ArchSpec, BlockSpec, save_arch
from nvit.lut.accuracy import error_figures
from nvit.lut.table import LatencyTable
from nvit.presets import preset
from nvit.profiler.device import fingerprint
from nvit.profiler.sampling import pruned_arch
from nvit.profiler.selfcheck import check_archs
from nvit.profiler.space import arch_for_space, derived_space
from nvit.profiler.sweep import SweepOptions, run_sweep
from nvit.vocab import DeviceKind

SLOWER = 1.1  # whole models on the "aged" device are 10% slower than the table says


class AgedBackend(fk.FakeBackend):
    """The fake device after the table was made: every whole model 10% slower."""

    def latency_of(self, workload):
        factor = 1.0 if getattr(workload.module, "nvit_config", None) is not None else SLOWER
        return super().latency_of(workload) * factor


@pytest.fixture
def fake_backends(monkeypatch):
    fk.register_fake(monkeypatch)
    fk.register_fake(monkeypatch, "aged", AgedBackend)


@pytest.fixture(scope="module")
def checked_lut(tmp_path_factory):
    """A table made on "this machine" (so 'nvit lut check' may measure it here), with a 4-model self-check."""
    path = tmp_path_factory.mktemp("check") / "t.parquet"
    here = fingerprint(DeviceKind.CPU).cpu.model_name
    with fk.FakeBackend() as backend:
        run_sweep(fk.tiny_space(), backend, path, device=fk.fake_device(cpu=here),
                  options=SweepOptions(calibration_models=3, check_models=4))
    return path


def test_error_figures_oracle() -> None:
    f = error_figures([10.0, 20.0, 40.0, 50.0], [11.0, 19.0, 40.0, 60.0])
    assert f["n"] == 4 and f["mape_pct"] == pytest.approx((10 + 5 + 0 + 20) / 4)
    assert f["bias_pct"] == pytest.approx((10 - 5 + 0 + 20) / 4) and f["max_abs_pct"] == pytest.approx(20)
    assert f["within_5pct"] == 0.5 and f["within_10pct"] == 0.75 and f["kendall_tau"] == pytest.approx(1.0)
    assert error_figures([1.0], [1.0])["kendall_tau"] is None


def test_pruned_shapes_mix_narrow_and_wide_blocks_within_the_base() -> None:
    base = preset("deit_tiny")
    rng = np.random.default_rng(0)
    archs = [pruned_arch(base, rng) for _ in range(20)]
    blocks = [b for a in archs for b in a.blocks]
    for a in archs:
        assert base.embed_dim // 2 <= a.embed_dim <= base.embed_dim and a.embed_dim % 8 == 0
    for b in blocks:
        assert 1 <= b.heads <= 3 and 8 <= b.qk_dim <= 64 and 8 <= b.v_dim <= 64 and 8 <= b.mlp_dim <= 768
        assert b.qk_dim % 8 == 0 and b.v_dim % 8 == 0 and b.mlp_dim % 8 == 0
    narrow = [b for b in blocks if b.heads <= 2 and b.qk_dim <= 16 and b.mlp_dim <= 32]
    wide = [b for b in blocks if b.mlp_dim >= 0.6 * 768]
    assert 0.3 < len(narrow) / len(blocks) < 0.5 and len(wide) / len(blocks) > 0.2
    assert any(any(b in narrow for b in a.blocks) and any(b in wide for b in a.blocks) for a in archs)


def test_check_models_are_seeded_and_half_pruned_shapes() -> None:
    base = preset("vit_test")
    a, b, c = check_archs(base, 6, seed=5), check_archs(base, 6, seed=5), check_archs(base, 6, seed=6)
    assert a == b and a != c
    assert [x.name for x in a] == [f"check-{k}{i:02d}" for i in range(3) for k in ("pruned", "random")]


def test_the_table_stores_its_self_check_and_show_prints_it(checked_lut, capsys) -> None:
    check = LatencyTable.load(checked_lut).meta.self_check
    assert check.n == 4 and check.seed == 500 and check.mape_pct < 1e-6  # the fake is exact
    assert check.pruned_shapes["n"] == 2 and {"kendall_tau", "within_5pct", "bias_pct"} <= set(check.to_dict())
    code, out, _ = run_cli(["lut", "show", str(checked_lut)], capsys)
    assert code == 0
    assert "self-check on held-out whole models (seed 500" in out and "4 models: MAPE 0.00%" in out
    assert "100% within ±5%" in out and "pruned shapes alone: 2 models" in out


def test_a_table_without_self_check_says_so(tmp_path, capsys) -> None:
    path = tmp_path / "t.parquet"
    with fk.FakeBackend() as backend:
        run_sweep(fk.tiny_space(), backend, path, device=fk.fake_device(),
                  options=SweepOptions(calibration_models=2, check_models=0))
    assert LatencyTable.load(path).meta.self_check is None
    code, out, _ = run_cli(["lut", "show", str(path)], capsys)
    assert code == 0 and "no self-check" in out and "nvit lut check" in out


def test_lut_check_measures_now_and_saves(checked_lut, tmp_path, fake_backends, capsys) -> None:
    table = LatencyTable.load(checked_lut)
    aged = tmp_path / "aged.parquet"
    table.with_meta(backend="aged").save(aged)  # the same table, measured again on the aged device
    code, out, err = run_cli(["lut", "check", str(aged), "--models", "3", "--passes", "1"], capsys)
    assert code == 0, err
    expected = (1 / SLOWER - 1) * 100  # predicted / measured - 1
    assert f"{expected:+.2f}%" in out and "3 models: MAPE 9.09%" in out and "0% within ±5%" in out
    assert "stored: " in out and LatencyTable.load(aged).meta.self_check.mape_pct < 1e-6  # not saved
    code, out, err = run_cli(["lut", "check", str(aged), "--models", "2", "--passes", "1", "--save"], capsys)
    assert code == 0, err
    saved = LatencyTable.load(aged).meta.self_check
    assert saved.n == 2 and saved.bias_pct == pytest.approx(expected) and saved.seed == 500
    assert [m.name for m in saved.models] == ["check-pruned00", "check-random00"]


def test_lut_check_refuses_another_device(checked_lut, tmp_path, fake_backends, capsys) -> None:
    table = LatencyTable.load(checked_lut)
    other = tmp_path / "other.parquet"
    table.with_meta(device_identity={**table.meta.device_identity, "cpu": "Other CPU 1"}).save(other)
    code, _, err = run_cli(["lut", "check", str(other), "--models", "2"], capsys)
    assert code == 1 and "Other CPU 1" in err and len(err.strip().splitlines()) == 1


def test_derived_space_reaches_the_group_size_for_any_vit() -> None:
    mine = ArchSpec(embed_dim=96, blocks=(BlockSpec(3, 32, 32, 384),) * 6, img_size=64, patch_size=8, in_chans=3,
                    num_classes=7, name="my_vit")
    space = derived_space(mine)
    assert space.base == mine and space.num_tokens == 65
    assert space.embed_dims[0] == 8 and space.embed_dims[-1] == 96
    assert space.heads == (1, 2, 3) and space.qk_dims == (8, 16, 32) and space.v_dims == (8, 16, 32)
    assert space.mlp_dims[0] == 8 and space.mlp_dims[-1] == 384 and all(m % 8 == 0 for m in space.mlp_dims)
    assert space.mlp_dims[1] - space.mlp_dims[0] < space.mlp_dims[-1] - space.mlp_dims[-2]  # dense at the low end
    assert derived_space(mine, group_size=16).qk_dims == (16, 32)
    small = derived_space(preset("deit_small"))
    assert small.counts()["attn"] == 6 * 6 * 4 * 4 and small.mlp_dims == (8, 32, 104, 384, 768, 1152, 1536)


def test_arch_for_space_reads_files_folders_checkpoints_and_presets(tmp_path) -> None:
    mine = ArchSpec(embed_dim=64, blocks=(BlockSpec(2, 32, 32, 128),) * 3, img_size=32, patch_size=8,
                    num_classes=5, name="mine")
    assert arch_for_space(str(save_arch(mine, tmp_path / "mine.json"))) == mine
    folder = tmp_path / "variant"
    folder.mkdir()
    save_arch(mine, folder / "arch.json")
    assert arch_for_space(str(folder)) == mine
    assert arch_for_space("deit_tiny") == preset("deit_tiny")
    state = {"patch_embed.proj.weight": torch.zeros(64, 3, 8, 8), "pos_embed": torch.zeros(1, 17, 64),
             "head.weight": torch.zeros(5, 64)}
    for i in range(3):
        state[f"blocks.{i}.attn.qkv.weight"] = torch.zeros(3 * 2 * 64, 64)
        state[f"blocks.{i}.mlp.fc1.weight"] = torch.zeros(128, 64)
    torch.save(state, tmp_path / "ckpt.pth")
    inferred = arch_for_space(str(tmp_path / "ckpt.pth"))
    assert inferred.embed_dim == 64 and inferred.depth == 3 and inferred.blocks[0] == BlockSpec(2, 64, 64, 128)
    assert inferred.img_size == 32 and inferred.num_classes == 5


def test_cli_profile_arch_derives_the_grid(tmp_path, fake_backends, capsys) -> None:
    mine = ArchSpec(embed_dim=32, blocks=(BlockSpec(2, 16, 16, 64),) * 2, img_size=16, patch_size=4, in_chans=1,
                    num_classes=3, name="mine")
    arch = save_arch(mine, tmp_path / "mine.json")
    out = tmp_path / "t.parquet"
    code, text, err = run_cli(["profile", "--arch", str(arch), "--backend", "fake", "--out", str(out),
                               "--calibrate", "2", "--check", "2"], capsys)
    assert code == 0, err
    table = LatencyTable.load(out)
    assert table.meta.space == derived_space(mine).to_dict() and table.meta.self_check.n == 2
    assert "self-check on held-out whole models" in text
    code, _, err = run_cli(["profile", "--arch", str(arch), "--space", "vit_test", "--backend", "fake"], capsys)
    assert code == 1 and "not both" in err


def test_check_record_is_json(checked_lut) -> None:
    json.dumps(LatencyTable.load(checked_lut).meta.self_check.to_dict(), allow_nan=False)


def test_pruned_shapes_benchmark_measures_resumably_and_evaluates(checked_lut, tmp_path, fake_backends) -> None:
    """benchmarks/lut_pruned_shapes.py on the fake backend: the oracle makes every LUT prediction exact, the
    FLOPs baseline is not; a run cut by its time budget resumes where it stopped."""
    import lut_pruned_shapes as bench

    measured = tmp_path / "m.json"
    args = ["measure", "--lut", str(checked_lut), "--set", "pruned", "--models", "5", "--seed", "3",
            "--out", str(measured)]
    assert bench.main([*args, "--budget-s", "0"]) == 3 and not measured.exists()  # spent before any group
    assert bench.main([*args, "--passes", "1"]) == 0
    first = json.loads(measured.read_text())["timings"]
    assert len(first) == 6 and {t["pass"] for t in first} == {0}
    assert bench.main([*args, "--passes", "2"]) == 0  # resumes: only the second pass is measured
    doc = json.loads(measured.read_text())
    assert len(doc["timings"]) == 2 * 6 and {t["pass"] for t in doc["timings"]} == {0, 1}
    out = tmp_path / "r.json"
    assert bench.main(["evaluate", "--lut", str(checked_lut), "--label", "after", "--measured", str(measured),
                       "--out", str(out)]) == 0
    results = json.loads(out.read_text())["sets"]["m"]["results"]
    assert results["after"]["n"] == 5 and results["after"]["mape_pct"] < 1e-6
    assert results["flops_proportional"]["mape_pct"] > 1.0
