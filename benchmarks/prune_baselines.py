"""Benchmark (issue 4): nvit pruning against baselines on the bundled digits, at 70/50/30% of dense latency.

A ``vit_test`` base is trained on digits; a CPU latency table of it is read (or profiled). For every target
ratio and seed, five methods produce a variant whose *predicted* latency just meets the target:

- ``nvit``: the pruning loop (Hessian-aware saliency − η·ΔLat, KD from the dense model while pruning);
- ``nvit_no_latency``: the same loop ranking by saliency alone (``--no-latency``);
- ``uniform``: every width (embed, heads, QK, V, MLP) scaled by one factor, the largest that meets the
  target (kept units chosen by L1 magnitude within each layer);
- ``l1``: one-shot global pruning of the groups with the smallest mean |w| over the parameters they own;
- ``random``: one-shot global pruning in a seeded random order.

Every variant is then fine-tuned with KD from the dense model, ``finetune_steps`` each (``--budget
finetune``, the default), or to equal *total* training after the base (``--budget total``: the longest nvit
pruning phase for that target plus ``finetune_steps``, minus the method's own training while pruning).
Reported: val top-1 before and after fine-tuning, predicted and measured latency (the table's own backend,
one interleaved session), widths, and the wall time of each nvit pruning step.

Full run (trains the base, profiles the table unless --lut is given, ~40 min on 2 quiet CPU cores):
    python benchmarks/prune_baselines.py --work bench-prune --out results/prune_baselines.json
Smoke run (a few minutes; profile a table once with `nvit profile --space vit_test --out lut.parquet`):
    python benchmarks/prune_baselines.py --quick --lut lut.parquet --work /tmp/bp --out /tmp/prune_baselines.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from nvit import __version__
from nvit.arch import ArchSpec, preset
from nvit.data import build_dataset, build_loader
from nvit.fileio import atomic_write_text
from nvit.lut.predictor import LatencyPredictor
from nvit.lut.table import LatencyTable
from nvit.models import load_variant, save_variant, slice_model
from nvit.models.vit import VisionTransformer, build_model
from nvit.pruning.batches import StepBatches
from nvit.pruning.config import PruneConfig, Target
from nvit.pruning.distill import DistillationLoss, DistillConfig
from nvit.pruning.groups import BLOCK_KINDS, GroupKind, GroupLayout, Minimums, PruneState
from nvit.pruning.loop import prune
from nvit.pruning.recipe import frozen_teacher, top1
from nvit.pruning.runstate import STATE_FILE
from nvit.pruning.train import TrainConfig, fit, lr_factor, parameter_groups, train_step

METHODS = ("nvit", "nvit_no_latency", "uniform", "l1", "random")
TARGETS = (0.7, 0.5, 0.3)
ALPHA_STEP = 0.01  # resolution of the uniform width factor


@dataclass(frozen=True)
class Settings:
    base_epochs: int
    interval: int
    prune_per_iter: int
    prune_lr: float
    finetune_steps: int
    finetune_lr: float
    batch_size: int
    group_size: int = 8
    min_embed_dim: int = 16
    latency_weight: float = 1.0
    kd_weight: float = 0.5
    kd_temperature: float = 1.0
    base_lr: float = 3e-3


FULL = Settings(base_epochs=60, interval=20, prune_per_iter=4, prune_lr=5e-4, finetune_steps=200,
                finetune_lr=1e-3, batch_size=64)
QUICK = Settings(base_epochs=3, interval=3, prune_per_iter=8, prune_lr=1e-3, finetune_steps=10,
                 finetune_lr=1e-3, batch_size=32)


def override(s: Settings, items: list[str]) -> Settings:
    changes: dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in Settings.__dataclass_fields__:
            raise SystemExit(f"unknown setting {key!r}; known: {', '.join(Settings.__dataclass_fields__)}")
        changes[key] = type(getattr(s, key))(value)
    return replace(s, **changes)


def log(msg: str) -> None:
    print(f"[prune_baselines {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- base model and table -------------------------------------------------------------------------
def base_model(work: Path, s: Settings, spec: ArchSpec) -> VisionTransformer:
    folder = work / "base"
    if (folder / "arch.json").is_file():
        return load_variant(folder)
    log(f"training the vit_test base on digits for {s.base_epochs} epochs")
    model = build_model(spec, seed=0)
    train = build_loader(build_dataset("digits", "train", spec, augment=True), batch_size=64, train=True)
    val = build_loader(build_dataset("digits", "val", spec, augment=False), batch_size=256, train=False)
    cfg = TrainConfig(epochs=s.base_epochs, batch_size=64, lr=s.base_lr, warmup_epochs=1.0)
    from nvit.pruning.distill import ClassificationLoss

    result = fit(model, train, ClassificationLoss(), cfg, val_loader=val, checkpoint_path=work / "base_train.pt")
    save_variant(model, folder, {"trained": cfg.to_dict(), "val_top1": result.history[-1].val_top1})
    return load_variant(folder)


def profiled_lut_path(args: argparse.Namespace) -> Path:
    return args.work / f"lut-vit_test-b{args.lut_batch_size}.parquet"


def latency_table(args: argparse.Namespace) -> LatencyTable:
    if args.lut is not None:
        return LatencyTable.load(args.lut)
    from nvit.profiler.base import DeviceKind, Precision, get_backend
    from nvit.profiler.space import preset_space
    from nvit.profiler.sweep import run_sweep

    out = profiled_lut_path(args)
    log(f"profiling the vit_test table into {out} (resumable)")
    space = preset_space("vit_test", batch_size=args.lut_batch_size)
    backend = get_backend("onnxruntime")(device=DeviceKind.CPU, precision=Precision.FP32,
                                         batch_size=args.lut_batch_size)
    with backend:
        return run_sweep(space, backend, out).table


# ---- one-shot baselines ---------------------------------------------------------------------------
def l1_group_scores(model: VisionTransformer, layout: GroupLayout) -> np.ndarray:
    """Mean |w| over every parameter a group owns (both sides of its units), per group."""
    def per_unit(f: Any) -> torch.Tensor:
        p = {k: f(v.detach().double()) for k, v in model.named_parameters() if "gate" not in k}
        emb = p["patch_embed.proj.weight"].sum((1, 2, 3)) + p["patch_embed.proj.bias"] + p["pos_embed"].sum((0, 1))
        for name in ("cls_token", "dist_token"):
            emb = emb + p[name].sum((0, 1)) if name in p else emb
        parts = []
        for i, blk in enumerate(model.blocks):
            q = f"blocks.{i}."
            a = blk.attn
            h, dq, dv = a.heads, a.qk_dim, a.v_dim
            emb = emb + sum(p[q + n] for n in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias",
                                                "attn.proj.bias", "mlp.fc2.bias"))
            emb = emb + p[q + "attn.qkv.weight"].sum(0) + p[q + "attn.proj.weight"].sum(1)
            emb = emb + p[q + "mlp.fc1.weight"].sum(0) + p[q + "mlp.fc2.weight"].sum(1)
            rows = p[q + "attn.qkv.weight"].sum(1) + p[q + "attn.qkv.bias"]
            qr, kr = rows[: h * dq].view(h, dq), rows[h * dq : 2 * h * dq].view(h, dq)
            vr = rows[2 * h * dq :].view(h, dv)
            proj = p[q + "attn.proj.weight"].sum(0).view(h, dv)
            mlp = p[q + "mlp.fc1.weight"].sum(1) + p[q + "mlp.fc1.bias"] + p[q + "mlp.fc2.weight"].sum(0)
            parts += [qr.sum(1) + kr.sum(1) + vr.sum(1) + proj.sum(1), qr.sum(0) + kr.sum(0),
                      vr.sum(0) + proj.sum(0), mlp]
        emb = emb + p["norm.weight"] + p["norm.bias"] + p["head.weight"].sum(0)
        if "head_dist.weight" in p:
            emb = emb + p["head_dist.weight"].sum(0)
        flat = torch.cat([emb, *parts])
        return torch.zeros(len(layout), dtype=torch.float64).index_add_(0, layout.unit_group, flat)

    return (per_unit(torch.abs) / per_unit(torch.ones_like)).numpy()


def greedy_to_target(layout: GroupLayout, order: np.ndarray, predictor: LatencyPredictor, target_ms: float
                     ) -> PruneState:
    """Remove groups in ``order`` (skipping those at a minimum) until the predicted latency meets the target."""
    state = PruneState(layout)
    for i in order:
        if predictor.predict_ms(state.spec()) <= target_ms:
            break
        if state.removable(int(i)):
            state.remove(int(i))
    return state


def uniform_to_target(layout: GroupLayout, scores: np.ndarray, predictor: LatencyPredictor, target_ms: float
                      ) -> PruneState:
    """The largest uniform width factor that meets the target; within each gate the highest-L1 units stay."""
    spec, g, m = layout.spec, layout.group_size, layout.minimums

    def width(full: int, alpha: float, unit: int, least: int) -> int:
        return min(full, max(least, unit * round(full * alpha / unit)))

    for alpha in np.arange(1.0, 0.0, -ALPHA_STEP):
        state = PruneState(layout)
        keep = {(GroupKind.EMB, None): width(spec.embed_dim, alpha, g, m.embed_dim)}
        for b, block in enumerate(spec.blocks):
            for kind, full, unit, least in zip(BLOCK_KINDS, (block.heads, block.qk_dim, block.v_dim, block.mlp_dim),
                                               (1, g, g, g), (m.heads, g, g, g), strict=True):
                keep[(kind, b)] = width(full, alpha, unit, least)
        for (kind, b), kept in keep.items():
            idx = layout.indices_of(kind, b)
            n_keep = kept // (1 if kind is GroupKind.HEAD else g)
            for i in idx[np.argsort(-scores[idx], kind="stable")][n_keep:]:
                state.remove(int(i))
        if predictor.predict_ms(state.spec()) <= target_ms:
            return state
    raise RuntimeError("no uniform width factor meets the target")


# ---- fine-tuning ----------------------------------------------------------------------------------
def finetune(model: VisionTransformer, loss: DistillationLoss, train_set: Any, steps: int, s: Settings,
             seed: int) -> float:
    if steps <= 0:
        return float("nan")
    opt = torch.optim.AdamW(parameter_groups(model, 0.05), lr=s.finetune_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: lr_factor(k, total_steps=steps, warmup_steps=0, min_ratio=0.01))
    batches = StepBatches(train_set, batch_size=s.batch_size, seed=1000 + seed).batches(0)
    last = float("nan")
    for _ in range(steps):
        images, labels = next(batches)
        last = train_step(model, images, labels, opt, loss, scheduler=sched).loss
    return last


def widths(spec: ArchSpec) -> dict[str, Any]:
    return {"embed_dim": spec.embed_dim, "heads": [b.heads for b in spec.blocks],
            "qk_dim": [b.qk_dim for b in spec.blocks], "v_dim": [b.v_dim for b in spec.blocks],
            "mlp_dim": [b.mlp_dim for b in spec.blocks], "params": spec.num_params(), "macs": spec.macs()}


# ---- the benchmark --------------------------------------------------------------------------------
def run_seed(seed: int, base: VisionTransformer, predictor: LatencyPredictor, s: Settings, targets: tuple[float, ...],
             work: Path, data: dict[str, Any], budget: str) -> list[dict[str, Any]]:
    """One seed's rows, cached in ``work`` with the fine-tuned variants (a rerun skips finished seeds)."""
    folder = work / f"seed{seed}"
    cache = folder / f"rows-{budget}.json"
    key = {"settings": asdict(s), "targets": list(targets), "budget": budget}
    if cache.is_file() and (doc := json.loads(cache.read_text()))["key"] == key:
        rows = doc["rows"]
        for r in rows:
            r["_module"] = load_variant(r["variant_path"])
        rows[0]["_prune_ms"] = doc["prune_ms"]
        return rows
    rows = _run_seed(seed, base, predictor, s, targets, work, data, budget)
    for r in rows:
        path = folder / f"finetuned-{budget}" / f"{r['method']}_{r['target_ratio']}"
        public = {k: v for k, v in r.items() if k[0] != "_"}
        save_variant(r["_module"], path, {"benchmark": "prune_baselines", **public})
        r["variant_path"] = str(path)
    public = [{k: v for k, v in r.items() if k[0] != "_"} for r in rows]
    atomic_write_text(cache, json.dumps({"key": key, "rows": public, "prune_ms": rows[0]["_prune_ms"]}, indent=1))
    return rows


def _run_seed(seed: int, base: VisionTransformer, predictor: LatencyPredictor, s: Settings, targets: tuple[float, ...],
              work: Path, data: dict[str, Any], budget: str) -> list[dict[str, Any]]:
    dense_ms = predictor.predict_ms(base.spec)
    layout = GroupLayout(base.spec, group_size=s.group_size, minimums=Minimums(embed_dim=s.min_embed_dim))
    loss = DistillationLoss(frozen_teacher(base), DistillConfig(weight=s.kd_weight, temperature=s.kd_temperature))
    pruned: dict[tuple[str, float], tuple[VisionTransformer, int]] = {}  # (method, ratio) -> (model, steps)
    prune_ms: list[float] = []
    for method in ("nvit", "nvit_no_latency"):
        out = work / f"seed{seed}" / method
        cfg = PruneConfig(targets=tuple(Target.ratio(r) for r in targets), group_size=s.group_size,
                          interval=s.interval, prune_per_iter=s.prune_per_iter, use_latency=method == "nvit",
                          latency_weight=s.latency_weight, min_embed_dim=s.min_embed_dim,
                          batch_size=s.batch_size, lr=s.prune_lr, seed=seed)
        log(f"seed {seed}: {method} pruning to {targets}")
        result = prune(load_variant(work / "base"), config=cfg, predictor=predictor, out_dir=out, loss_fn=loss,
                       data=StepBatches(data["train"], batch_size=s.batch_size, seed=seed),
                       resume=(out / STATE_FILE).is_file())
        prune_ms += pd.read_parquet(result.log_path)["prune_wall_ms"].dropna().tolist()
        for v, ratio in zip(result.variants, sorted(targets, reverse=True), strict=True):
            pruned[(method, ratio)] = (load_variant(v.path), v.step + 1)
    scores = l1_group_scores(base, layout)
    rng = np.random.default_rng(seed)
    for ratio in targets:
        target_ms = ratio * dense_ms
        for method, state in (
            ("uniform", uniform_to_target(layout, scores, predictor, target_ms)),
            ("l1", greedy_to_target(layout, np.argsort(scores, kind="stable"), predictor, target_ms)),
            ("random", greedy_to_target(layout, rng.permutation(len(layout)), predictor, target_ms)),
        ):
            model = load_variant(work / "base")
            state.apply(model)
            pruned[(method, ratio)] = (slice_model(model), 0)
    rows = []
    for ratio in targets:
        longest = max(pruned[(m, ratio)][1] for m in ("nvit", "nvit_no_latency"))
        for method in METHODS:
            model, steps = pruned[(method, ratio)]
            tune = s.finetune_steps if budget == "finetune" else s.finetune_steps + longest - steps
            before = top1(model, data["val"])
            log(f"seed {seed}: fine-tuning {method} @ {ratio} for {tune} steps")
            finetune(model, loss, data["train"], tune, s, seed)
            rows.append({"seed": seed, "method": method, "target_ratio": ratio, "target_ms": ratio * dense_ms,
                         "predicted_ms": predictor.predict_ms(model.spec), "top1_before": before,
                         "top1_after": top1(model, data["val"]), "prune_steps": steps,
                         "finetune_steps": tune, "total_steps": steps + tune, **widths(model.spec),
                         "_module": model})
    rows[0]["_prune_ms"] = prune_ms
    return rows


def measure(table: LatencyTable, base: VisionTransformer, rows: list[dict[str, Any]]) -> dict[str, float]:
    from nvit.export.compare import Variant, compare_with_table

    variants = [Variant(f"s{r['seed']}/{r['method']}/{r['target_ratio']}", r["_module"].spec, r["_module"].eval())
                for r in rows]
    report = compare_with_table(table, Variant("base", base.spec, base.eval()), variants)
    return {r.name: r.measured_ms for r in report.results}


def mean_or_none(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def summarise(rows: list[dict[str, Any]], targets: tuple[float, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for ratio in targets:
        per = {}
        for method in METHODS:
            sel = [r for r in rows if r["method"] == method and r["target_ratio"] == ratio]
            after = np.array([r["top1_after"] for r in sel])
            per[method] = {"top1_after_mean": float(after.mean()), "top1_after_std": float(after.std()),
                           "top1_before_mean": float(np.mean([r["top1_before"] for r in sel])),
                           "measured_ms_mean": mean_or_none([r.get("measured_ms") for r in sel]),
                           "predicted_ms_mean": float(np.mean([r["predicted_ms"] for r in sel]))}
        nvit = per["nvit"]["top1_after_mean"]
        beats = {m: nvit > per[m]["top1_after_mean"] for m in METHODS if m != "nvit"}
        out[str(ratio)] = {"methods": per, "nvit_beats": beats}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="Results JSON.")
    parser.add_argument("--lut", type=Path, help="Latency table of vit_test (default: profile one into --work).")
    parser.add_argument("--work", type=Path, default=Path("bench-prune"), help="Base model, runs, profiled table.")
    parser.add_argument("--quick", action="store_true", help="Tiny budgets: a smoke run of a few minutes.")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="Seeds (default: 0 1 2; quick: 0).")
    parser.add_argument("--targets", type=float, nargs="+", default=list(TARGETS),
                        help="Target ratios of the dense predicted latency (default: 0.7 0.5 0.3).")
    parser.add_argument("--no-measure", action="store_true", help="Skip measuring latency with the backend.")
    parser.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
                        help="Override settings, e.g. --set finetune_steps=200 latency_weight=2.")
    parser.add_argument("--budget", choices=("finetune", "total"), default="finetune",
                        help="finetune: every variant gets finetune_steps; total: equal training steps after the "
                        "base, counting nvit's training while pruning (one-shot methods fine-tune longer).")
    parser.add_argument("--lut-batch-size", type=int, default=1, help="Batch size when profiling a table.")
    args = parser.parse_args()
    s = override(QUICK if args.quick else FULL, args.overrides)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    started = time.perf_counter()
    spec = preset("vit_test")
    table = latency_table(args)
    predictor = LatencyPredictor(table)
    base = base_model(args.work, s, spec)
    dense_ms = predictor.predict_ms(base.spec)
    min_ms = predictor.predict_ms(GroupLayout(base.spec, group_size=s.group_size,
                                              minimums=Minimums(embed_dim=s.min_embed_dim)).minimal_spec())
    targets = tuple(sorted((r for r in args.targets if r * dense_ms >= min_ms), reverse=True))
    unreachable = sorted(set(args.targets) - set(targets))
    if unreachable:
        log(f"targets {unreachable} are below the smallest reachable latency ({min_ms / dense_ms:.3f} of dense); "
            "skipped")
    data = {"train": build_dataset("digits", "train", spec, augment=True),
            "val": build_dataset("digits", "val", spec, augment=False)}
    rows = [r for seed in seeds for r in run_seed(seed, base, predictor, s, targets, args.work, data, args.budget)]
    prune_ms = [t for r in rows for t in r.pop("_prune_ms", [])]
    measured = {} if args.no_measure else measure(table, base, rows)
    for r in rows:
        r.pop("_module")
        r["measured_ms"] = measured.get(f"s{r['seed']}/{r['method']}/{r['target_ratio']}")
    doc = {
        "kind": "nvit.benchmark.prune_baselines", "version": 1, "nvit_version": __version__,
        "host": platform.node(), "quick": args.quick, "seeds": seeds, "budget": args.budget, "settings": asdict(s),
        "lut": {"path": str(args.lut or profiled_lut_path(args)), "identity": table.meta.identity(),
                "device": table.meta.device_name()},
        "base": {"val_top1": top1(base, data["val"]), "predicted_ms": predictor.predict_ms(base.spec),
                 "measured_ms": measured.get("base"), **widths(base.spec)},
        "prune_step_wall_ms": {"median": float(np.median(prune_ms)), "p90": float(np.percentile(prune_ms, 90)),
                               "n": len(prune_ms)},
        "targets": list(targets), "unreachable_targets": unreachable, "min_reachable_ratio": min_ms / dense_ms,
        "results": rows, "summary": summarise(rows, targets), "seconds": time.perf_counter() - started,
    }
    atomic_write_text(args.out, json.dumps(doc, indent=2) + "\n")
    for ratio, item in doc["summary"].items():
        cells = ", ".join(f"{m} {100 * v['top1_after_mean']:.1f}%" for m, v in item["methods"].items())
        log(f"target {ratio}: {cells}")
    log(f"wrote {args.out} in {doc['seconds']:.0f} s")


if __name__ == "__main__":
    main()
