"""Saliency: gate form vs parameter form, window accumulation, normalisation, NaN errors, and ranking quality."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import nvit.models.vit as vit
from nvit.arch import ArchSpec, BlockSpec
from nvit.models import build_model
from nvit.presets import preset
from nvit.pruning.groups import KIND_CODES, GroupKind, GroupLayout, Minimums
from nvit.pruning.saliency import (
    SaliencyAccumulator,
    SaliencyError,
    SaliencyNorm,
    ScoreAverage,
    gate_unit_sums,
    kind_scales,
    normalise,
    parameter_unit_sums,
)
from nvit.pruning.state import PruneState

SMALL_DISTILLED = ArchSpec(embed_dim=32, blocks=(BlockSpec(3, 8, 16, 48), BlockSpec(2, 16, 8, 32)), img_size=8,
                           patch_size=4, in_chans=2, num_classes=5, distilled=True, qk_scale=0.3)


def perturbed(spec: ArchSpec, seed: int) -> vit.VisionTransformer:
    """A float64 model with non-trivial weights, norms and biases (trained-like, not init-like)."""
    model = build_model(spec, seed=seed).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2)
    model.enable_gates()
    return model


def backward(model: vit.VisionTransformer, seed: int, n: int = 12) -> None:
    spec = model.spec
    g = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(n, spec.in_chans, spec.img_size, spec.img_size, generator=g, dtype=torch.float64)
    y = torch.randint(0, spec.num_classes, (n,), generator=g)
    for p in model.parameters():
        p.grad = None
    model.train()
    out = model(x)
    loss = sum(F.cross_entropy(o, y) for o in out) if isinstance(out, tuple) else F.cross_entropy(out, y)
    loss.backward()


def detached_statistics_norm(x, norm, emb_gate):  # the masked LayerNorm with the gate cut out of its statistics
    if emb_gate is None:
        return norm(x)
    stat_gate = emb_gate.detach()
    live = stat_gate.sum()
    mean = (x * stat_gate).sum(-1, keepdim=True) / live
    var = (((x - mean) * stat_gate) ** 2).sum(-1, keepdim=True) / live
    return (x - mean) * emb_gate * torch.rsqrt(var + norm.eps) * norm.weight + norm.bias * emb_gate


@pytest.mark.parametrize("spec", [preset("vit_test"), SMALL_DISTILLED], ids=["vit_test", "distilled"])
def test_gate_form_equals_parameter_form(spec: ArchSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    model = perturbed(spec, seed=1)
    lay = GroupLayout(spec, group_size=8 if spec.embed_dim == 64 else 4, minimums=Minimums(embed_dim=8))
    state = PruneState(lay)
    cand = state.candidates(np.arange(lay.num_units, dtype=float)[::-1])  # scattered groups
    for kind in (GroupKind.HEAD, GroupKind.MLP, GroupKind.V, GroupKind.EMB):
        state.remove(cand.units[int(np.flatnonzero(lay.gate_kind[cand.gate] == KIND_CODES[kind])[1])])
    state.apply(model)  # equality must hold with other units already pruned
    backward(model, seed=1)
    gate, param = gate_unit_sums(model, lay).numpy(), parameter_unit_sums(model, lay).numpy()
    alive, emb = state.alive, lay.unit_kind == 0
    per_block = alive & ~emb
    assert np.abs(gate[per_block]).min() > 0
    np.testing.assert_allclose(gate[per_block], param[per_block], rtol=1e-9, atol=1e-13)
    # EMB: the gate gradient also carries the LayerNorm statistics, which the parameter form lacks ...
    assert np.abs(gate[alive & emb] - param[alive & emb]).max() > 1e-3 * np.abs(gate[alive & emb]).max()
    # ... and with the statistics cut off from the gate the two forms agree exactly
    monkeypatch.setattr(vit, "masked_layer_norm", detached_statistics_norm)
    backward(model, seed=1)
    gate, param = gate_unit_sums(model, lay).numpy(), parameter_unit_sums(model, lay).numpy()
    np.testing.assert_allclose(gate[alive], param[alive], rtol=1e-9, atol=1e-13)


def test_window_is_the_mean_of_squared_unit_sums_and_steps_are_averaged() -> None:
    spec = preset("vit_test")
    model = perturbed(spec, seed=2)
    lay = GroupLayout(spec, group_size=8, minimums=Minimums(embed_dim=8))
    acc = SaliencyAccumulator(lay)
    per_batch = []
    for b in range(5):
        backward(model, seed=10 + b)
        acc.add(model)
        per_batch.append(torch.cat([g.grad.reshape(-1) for g in model.gate_parameters()]).numpy())
    stacked = np.stack(per_batch)
    np.testing.assert_allclose(acc.mean(), (stacked**2).mean(0), rtol=1e-12)
    assert acc.count == 5
    assert np.abs(acc.mean() - stacked.mean(0) ** 2).max() > 1e-3 * acc.mean().max()  # not the squared mean
    # an all-reduce over two identical ranks keeps the mean; state round-trips
    np.testing.assert_allclose(acc.mean(all_reduce=lambda t: t.mul_(2)), acc.mean(), rtol=1e-12)
    other = SaliencyAccumulator(lay)
    other.load_state_dict(acc.state_dict())
    np.testing.assert_array_equal(other.mean(), acc.mean())
    acc.reset()
    with pytest.raises(SaliencyError, match="no batches"):
        acc.mean()
    # across pruning steps: the first window as is, then avg <- 0.9 avg + 0.1 window (NViT's momentum)
    avg = ScoreAverage(lay, 0.9)
    w1, w2 = np.full(lay.num_units, 10.0), np.full(lay.num_units, 20.0)
    np.testing.assert_allclose(avg.update(w1), w1)
    np.testing.assert_allclose(avg.update(w2), 11.0)
    again = ScoreAverage(lay, 0.9)
    again.load_state_dict(avg.state_dict())
    np.testing.assert_allclose(again.update(w2), 0.9 * 11.0 + 2.0)
    np.testing.assert_allclose(ScoreAverage(lay, 0.0).update(w2), w2)
    with pytest.raises(SaliencyError, match=r"momentum must be in \[0, 1\)"):
        ScoreAverage(lay, 1.0)


def test_nan_or_inf_saliency_is_an_error_naming_the_unit() -> None:
    lay = GroupLayout(preset("vit_test"), group_size=8, minimums=Minimums(embed_dim=8))
    acc = SaliencyAccumulator(lay)
    sums = np.ones(lay.num_units)
    bad = int(lay.units_of(lay.gates_of(GroupKind.MLP, block=1)[0])[17])
    sums[bad] = np.nan
    with pytest.raises(SaliencyError, match=r"saliency of block 1 mlp 17 is nan in batch 1"):
        acc.add_sums(sums)
    sums[bad], sums[3] = 1.0, np.inf
    with pytest.raises(SaliencyError, match=r"emb 3 is inf"):
        acc.add_sums(sums)
    model = perturbed(preset("vit_test"), seed=3)
    with torch.no_grad():
        model.blocks[2].mlp.fc2.weight[0, 0] = float("nan")
    backward(model, seed=3)
    with pytest.raises(SaliencyError, match=r"is nan .* and \d+ other unit"):
        acc.add(model)
    model.emb_gate.grad = None
    with pytest.raises(SaliencyError, match="gate gradients are missing"):
        acc.add(model)


def test_normalisation_across_types_is_explicit() -> None:
    lay = GroupLayout(preset("vit_test"), group_size=8, minimums=Minimums(embed_dim=8))
    assert set(kind_scales(SaliencyNorm.NONE, 4).values()) == {1.0}
    scales = kind_scales(SaliencyNorm.TENSOR_COUNT, 4)
    assert scales == {GroupKind.EMB: 0.25, GroupKind.HEAD: 0.25, GroupKind.QK: 0.5, GroupKind.V: 0.5,
                      GroupKind.MLP: 0.5, GroupKind.ATTN_LAYER: 0.5, GroupKind.MLP_LAYER: 0.5}
    raw = np.arange(1, lay.num_units + 1, dtype=np.float64)
    np.testing.assert_array_equal(normalise(raw, lay, SaliencyNorm.NONE), raw)
    out = normalise(raw, lay, SaliencyNorm.TENSOR_COUNT)
    for kind, scale in scales.items():
        idx = lay.unit_kind == KIND_CODES[kind]
        np.testing.assert_allclose(out[idx], raw[idx] * scale)
    assert kind_scales(SaliencyNorm.TENSOR_COUNT, 12)[GroupKind.EMB] == pytest.approx(1 / 12)
    with pytest.raises(ValueError):
        SaliencyNorm("per-tensor")  # the old name claimed to be NViT's rescaling, which it is not


# ---- ranking quality on a trained model ------------------------------------------------------------
TRAIN_STEPS, REFINE_STEPS, MEASURE_SAMPLES, WINDOW_BATCH = 300, 40, 128, 32


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    return (x - x.mean()) / x.std(), torch.tensor(d.target)


def loss_increase_of_each_group(model: vit.VisionTransformer, lay: GroupLayout, groups, x, y) -> np.ndarray:
    """Measured loss increase of removing each group alone (gate 0 is exact removal, see test_groups)."""
    gates = model.gate_parameters()
    out = []
    with torch.no_grad():
        base = F.cross_entropy(model(x), y).item()
        for units in groups:
            flat = torch.ones(lay.num_units)
            flat[torch.from_numpy(units)] = 0.0
            for gate, part in zip(gates, flat.split(lay.gate_sizes), strict=True):
                gate.copy_(part)
            out.append(F.cross_entropy(model(x), y).item() - base)
        for gate in gates:
            gate.fill_(1.0)
    return np.array(out)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    import pandas as pd

    return float(pd.Series(a).corr(pd.Series(b), method="spearman"))


@pytest.mark.slow
def test_saliency_ranks_groups_like_the_measured_loss_increase() -> None:
    """Spearman ρ(I, ΔL) over the 151 groups the first pruning step of vit_test chooses from (all five
    types, formed dynamically from the unit scores; a group's I is the sum of its units') on digits.

    The Fisher form drops the first-order term, which vanishes only at a trained point, so the model is
    trained (300 AdamW steps) and then brought close to a minimum on the measured samples (40 full-batch
    steps). Measured on this recipe with one thread: ρ = 0.92 for seed 0 with 32-sample batches (fixed
    contiguous chunks scored by their squared sums gave 0.77); a shuffled ranking gives |ρ| < 0.2. Bound: 0.6.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is as fast, and immune to busy-waiting on a shared CPU
    try:
        rho, shuffled = _rank_correlation()
    finally:
        torch.set_num_threads(threads)
    print(f"spearman rho(saliency, loss increase) = {rho:.3f} (shuffled: {shuffled:.3f})")
    assert rho > 0.6
    assert abs(shuffled) < 0.3  # the bound separates a real ranking from chance


def _rank_correlation() -> tuple[float, float]:
    x, y = digits()
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    train, test = perm[:1400], perm[1400:]
    model = build_model(preset("vit_test"), seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    for _ in range(TRAIN_STEPS):
        idx = train[torch.randint(0, len(train), (64,), generator=g)]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    xm, ym = x[train[:MEASURE_SAMPLES]], y[train[:MEASURE_SAMPLES]]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(REFINE_STEPS):
        loss = F.cross_entropy(model(xm), ym)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        assert (model(x[test]).argmax(1) == y[test]).float().mean() > 0.7  # it did learn digits

    model.enable_gates()
    lay = GroupLayout(model.spec, group_size=8, minimums=Minimums(embed_dim=8))
    acc = SaliencyAccumulator(lay)
    for start in range(0, MEASURE_SAMPLES, WINDOW_BATCH):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(xm[start : start + WINDOW_BATCH]), ym[start : start + WINDOW_BATCH]).backward()
        acc.add(model)
    cand = PruneState(lay).candidates(acc.mean())  # the groups the first pruning step chooses from
    saliency = cand.saliency
    increase = loss_increase_of_each_group(model, lay, cand.units, xm, ym)

    return spearman(saliency, increase), spearman(np.random.default_rng(0).permutation(saliency), increase)
