"""Benchmark: does latency-aware ranking beat saliency-only at equal *measured* latency? (Fashion-MNIST, CPU)

One trained base, one CPU latency table of it, and for every method and seed one pruning run (or one-shot
pruning) to several target ratios of the dense predicted latency, every variant fine-tuned with KD from
the dense model so that each (method, target) gets the same number of training steps after the base
(``total_steps``: steps spent pruning up to that target + fine-tuning). Methods: ``latency_l{λ}``
(``nvit prune --ranking latency --latency-weight λ``), ``saliency`` (``--no-latency``), ``flops_l1`` (a
FLOPs predictor as the regularizer, λ = 1), ``knapsack``, and one-shot ``uniform``, ``l1``, ``random``
(:mod:`prune_methods`); ``dense`` fine-tunes the base itself for ``total_steps`` (is the base converged?).
λ is chosen on the validation split (seed 0, mean val top-1 after fine-tuning over the targets); ``nvit``
in the report is the latency ranking at that λ.

Stages (each cached in --work, resumable; only ``measure`` times anything — run it alone, e.g. under a
lock on a shared machine):
    python benchmarks/prune_fashion.py space --base BASE --work W      # W/space.json, for nvit profile
    python benchmarks/prune_fashion.py run --base BASE --lut LUT --work W --jobs 2
    python benchmarks/prune_fashion.py measure --base BASE --lut LUT --work W
    python benchmarks/prune_fashion.py report --base BASE --lut LUT --work W --out results/prune_fashion.json
Smoke run on digits (a few minutes): add ``--quick --data digits`` to run/measure/report with a vit_test
base and table (e.g. the demo's: --base nvit-demo/base --lut nvit-demo/lut.parquet).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

SWEEP_SEED = 0


@dataclass(frozen=True)
class Settings:
    data: str = "fashion-mnist"
    targets: tuple[float, ...] = (0.8, 0.65, 0.5, 0.35)
    seeds: tuple[int, ...] = (0, 1, 2)
    lambdas: tuple[float, ...] = (1.0, 3.0, 10.0)  # swept on validation with seed 0 (saliency alone is λ = 0)
    interval: int = 15
    pace: float = 0.03
    total_steps: int = 600
    batch_size: int = 64
    prune_lr: float = 3e-4
    finetune_lr: float = 5e-4
    group_size: int = 8
    kd_weight: float = 0.5
    kd_temperature: float = 2.0
    eval_batch: int = 500


QUICK = Settings(data="digits", targets=(0.8, 0.6), seeds=(0, 1), lambdas=(1.0, 3.0), interval=3, pace=0.1,
                 total_steps=40, batch_size=32)


def log(msg: str) -> None:
    print(f"[prune_fashion {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def lam(x: float) -> str:
    return f"{x:g}"


def tasks(s: Settings, chosen: float | None) -> list[tuple[str, int]]:
    """(method, seed) pairs: the sweep (seed 0 of every λ) first, then the chosen λ and λ = 1 for every seed,
    every other method for every seed."""
    first = [(f"latency_l{lam(x)}", SWEEP_SEED) for x in s.lambdas]
    rest = [(m, seed) for m in ("saliency", "knapsack", "flops_l1", "uniform", "l1", "random")
            for seed in s.seeds] + [("dense", SWEEP_SEED)]
    if chosen is not None:
        keep = {f"latency_l{lam(chosen)}", f"latency_l{lam(1.0)}"}
        rest += [(m, seed) for m in sorted(keep) for seed in s.seeds if seed != SWEEP_SEED]
    return first + rest


# ---- one (method, seed) ---------------------------------------------------------------------------
class Context:
    """Everything a run needs, loaded once per worker process."""

    def __init__(self, base_dir: str, lut: str, s: Settings) -> None:
        import torch

        from nvit.data import build_dataset
        from nvit.lut import load_predictor
        from nvit.models import load_variant

        torch.set_num_threads(1)
        self.s = s
        self.base_dir = base_dir
        self.lut = lut
        self.base = load_variant(base_dir)
        self.predictor = load_predictor(lut)
        spec = self.base.spec
        self.train = build_dataset(s.data, "train", spec, augment=True)
        self.val = build_dataset(s.data, "val", spec, augment=False)
        self.test = None if s.data == "digits" else build_dataset(s.data, "test", spec, augment=False)

    def evaluate(self, model: Any) -> dict[str, float | None]:
        from nvit.training.fit import top1

        return {"val": top1(model, self.val, batch_size=self.s.eval_batch),
                "test": None if self.test is None else top1(model, self.test, batch_size=self.s.eval_batch)}

    def loss(self) -> Any:
        from nvit.training.distill import distillation_loss_fn, frozen_teacher

        return distillation_loss_fn(frozen_teacher(self.base), weight=self.s.kd_weight,
                                    temperature=self.s.kd_temperature)


def prune_config(s: Settings, method: str, seed: int, targets: tuple[float, ...] | None = None) -> Any:
    """``method`` as a pruning config: ``<ranking>[_l<λ>][_rm]`` (``_rm``: whole sub-layers may go too; the
    others prune widths only, as this benchmark's methods always did)."""
    from nvit.pruning.config import PruneConfig, RankingMethod, Sublayer, Target

    method = method.removesuffix("_mt")  # measured targets change the run, not its config
    name, removes = method.removesuffix("_rm"), method.endswith("_rm")
    ranking, weight = name, 1.0
    if name.startswith(("latency_l", "flops_l")):
        ranking, _, weight_text = name.partition("_l")
        weight = float(weight_text)
    return PruneConfig(targets=tuple(Target.ratio(r) for r in (targets or s.targets)), group_size=s.group_size,
                       interval=s.interval, pace=s.pace, ranking=RankingMethod(ranking), latency_weight=weight,
                       batch_size=s.batch_size, lr=s.prune_lr, seed=seed,
                       remove=(Sublayer.ATTN, Sublayer.MLP) if removes else ())


def reachable(ctx: Context, method: str, seed: int) -> tuple[float, ...]:
    """The target ratios the method can reach on the table (a width-only floor refuses the lower ones)."""
    import prune_methods as pm

    from nvit.pruning.limits import pruning_layout

    as_ranking = {"depth": "saliency_rm", "uniform": "saliency", "l1": "saliency", "random": "saliency"}
    layout = pruning_layout(ctx.base.spec, prune_config(ctx.s, as_ranking.get(method, method), seed), ctx.predictor)
    return pm.reachable_ratios(layout, ctx.predictor, ctx.s.targets, whole_blocks=method == "depth")


def pruned_variants(ctx: Context, method: str, seed: int, folder: Path
                    ) -> tuple[list[tuple[float, Any, int]], list[dict[str, Any]]]:
    """(ratio, sliced model, training steps spent pruning) per target, and the log of the pruning steps."""
    import pandas as pd

    from nvit.models import load_variant, slice_model
    from nvit.pruning.limits import pruning_layout
    from nvit.pruning.loop import prune
    from nvit.pruning.runstate import RUN_FILE, STATE_FILE, read_run_summary
    from nvit.training.batches import StepBatches

    s = ctx.s
    if method == "dense":
        return [(1.0, load_variant(ctx.base_dir), 0)], []
    targets = reachable(ctx, method, seed)
    if method == "depth":
        import prune_methods as pm

        layout = pruning_layout(ctx.base.spec, prune_config(s, "saliency_rm", seed), ctx.predictor)
        return pm.depth_variants(ctx, layout, targets, seed)
    if method in ("uniform", "l1", "random"):
        import prune_methods as pm

        layout = pruning_layout(ctx.base.spec, prune_config(s, "saliency", seed), ctx.predictor)
        scores = (np.random.default_rng(seed).random(layout.num_units) if method == "random"
                  else pm.l1_unit_scores(ctx.base, layout))
        dense_ms = ctx.predictor.predict_ms(ctx.base.spec)
        out = []
        for ratio in targets:
            make = pm.uniform_to_target if method == "uniform" else pm.greedy_to_target
            state = make(layout, scores, ctx.predictor, ratio * dense_ms)
            model = load_variant(ctx.base_dir)
            state.apply(model)
            out.append((ratio, slice_model(model), 0))
        return out, []
    out_dir = folder / "prune"
    if not (out_dir / RUN_FILE).is_file():
        data = StepBatches(ctx.train, batch_size=s.batch_size, seed=seed)
        measurer = None
        if method.endswith("_mt"):  # targets met at measured latency: the table's backend, beside its rows
            from nvit.lut.table import LatencyTable
            from nvit.validation.targets import TableMeasurer

            measurer = TableMeasurer(LatencyTable.load(ctx.lut))
        prune(load_variant(ctx.base_dir), config=prune_config(s, method, seed, targets), predictor=ctx.predictor,
              data=data, out_dir=out_dir, loss_fn=ctx.loss(), resume=(out_dir / STATE_FILE).is_file(),
              measurer=measurer)
    summary = read_run_summary(out_dir)
    frame = pd.read_parquet(out_dir / "prune_log.parquet")
    steps = frame[frame["pruned_now"] > 0]
    keep = ["step", "predicted_latency_ms", "eta", "pruned_now"] + [c for c in frame if c.startswith("removed_")]
    step_log = steps[keep].to_dict("records")
    ratios = sorted(targets, reverse=True)
    return [(r, load_variant(v["path"]), int(v["step"]) + 1)
            for r, v in zip(ratios, summary["variants"], strict=True)], step_log


def measured_loop(folder: Path) -> dict[str, Any] | None:
    """What measuring targets in the loop did in a run (``None`` when it did not): its correction, how many
    measurements and seconds it took, every measurement, and each saved variant's measured latency."""
    from nvit.pruning.runstate import RUN_FILE, read_run_summary

    if not (folder / "prune" / RUN_FILE).is_file():
        return None
    summary = read_run_summary(folder / "prune")
    loop = summary.get("measured_targets")
    if not loop:
        return None
    return {**loop, "variants": [{k: v.get(k) for k in ("label", "target_ms", "predicted_latency_ms", "measured_ms",
                                                           "target_met_measured")} for v in summary["variants"]]}


def run_one(base_dir: str, lut: str, s: Settings, work: str, method: str, seed: int) -> str:
    """Prune, evaluate, fine-tune and evaluate again; rows written to ``work/runs/method/seedN/rows.json``."""
    from nvit.fileio import atomic_write_text
    from nvit.models import load_variant, save_variant

    folder = Path(work) / "runs" / method / f"seed{seed}"
    rows_path = folder / "rows.json"
    if rows_path.is_file():
        return str(rows_path)
    started = time.process_time()
    ctx = Context(base_dir, lut, s)
    import prune_methods as pm

    rows = []
    variants, step_log = pruned_variants(ctx, method, seed, folder)
    for ratio, model, prune_steps in variants:
        label = f"ratio_{ratio:g}"
        ft = folder / "finetuned" / label
        if (ft / "arch.json").is_file():
            from nvit.arch import load_arch_file

            rows.append(load_arch_file(ft / "arch.json")[1]["row"])
            continue
        before = ctx.evaluate(model)
        steps = s.total_steps - prune_steps
        log(f"{method} seed {seed} {label}: {prune_steps} pruning steps, fine-tuning {steps}")
        pm.finetune(model, ctx.loss(), ctx.train, steps=steps, lr=s.finetune_lr, batch_size=s.batch_size, seed=seed)
        after = ctx.evaluate(model)
        spec = model.spec
        row = {"method": method, "seed": seed, "target_ratio": ratio, "predicted_ms": ctx.predictor.predict_ms(spec),
               "prune_steps": prune_steps, "finetune_steps": steps, "val_before": before["val"],
               "test_before": before["test"], "val_after": after["val"], "test_after": after["test"],
               "arch": spec.to_dict(), "params": spec.num_params(), "variant_path": str(ft)}
        save_variant(model.eval(), ft, {"benchmark": "prune_fashion", "row": row})
        load_variant(ft)  # written completely
        rows.append(row)
    reached = {r["target_ratio"] for r in rows}
    doc = {"method": method, "seed": seed, "settings": asdict(s), "rows": rows, "prune_steps_log": step_log,
           "unreachable": [t for t in s.targets if t not in reached], "cpu_seconds": time.process_time() - started,
           "measured_loop": measured_loop(folder)}
    atomic_write_text(rows_path, json.dumps(doc, indent=1, default=float) + "\n")
    log(f"{method} seed {seed}: done in {doc['cpu_seconds']:.0f} CPU s")
    return str(rows_path)


# ---- stages ---------------------------------------------------------------------------------------
def load_rows(work: Path) -> dict[tuple[str, int], dict[str, Any]]:
    out = {}
    for path in sorted((work / "runs").glob("*/seed*/rows.json")):
        doc = json.loads(path.read_text())
        out[(doc["method"], int(doc["seed"]))] = doc
    return out


def choose_lambda(s: Settings, runs: dict[tuple[str, int], dict[str, Any]]) -> tuple[float | None, dict[str, float]]:
    """λ with the best mean val top-1 after fine-tuning over the targets (seed 0); ``None`` until all ran."""
    scores = {}
    for x in s.lambdas:
        doc = runs.get((f"latency_l{lam(x)}", SWEEP_SEED))
        if doc is None:
            return None, scores
        scores[lam(x)] = float(np.mean([r["val_after"] for r in doc["rows"]]))
    best = max(s.lambdas, key=lambda x: (scores[lam(x)], -abs(np.log(x))))  # ties: the λ closest to 1
    return best, scores


def run_stage(args: argparse.Namespace, s: Settings) -> None:
    """Every (method, seed) run not cached yet; the chosen λ's other seeds once the sweep has run."""
    work = args.work
    while True:
        chosen, sweep = choose_lambda(s, load_rows(work))
        todo = [t for t in tasks(s, chosen) if not (work / "runs" / t[0] / f"seed{t[1]}" / "rows.json").is_file()]
        if not todo:
            log(f"all runs done (λ sweep on val: {sweep}; chosen λ = {chosen})")
            return
        log(f"{len(todo)} runs to do (chosen λ: {chosen})")
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn"),
                                 initializer=_worker_init) as pool:
            futures = [pool.submit(run_one, str(args.base), str(args.lut), s, str(work), m, seed) for m, seed in todo]
            for f in futures:
                f.result()


def _worker_init() -> None:
    sys.path.insert(0, str(Path(__file__).parent))


def measure_stage(args: argparse.Namespace, s: Settings) -> None:
    """Every fine-tuned variant and the base, measured in one interleaved session (two passes)."""
    from nvit.fileio import atomic_write_text
    from nvit.lut import load_table
    from nvit.models import load_variant
    from nvit.validation.compare import Variant, compare_with_table

    runs = load_rows(args.work)
    variants = [Variant(f"{m}/s{seed}/{r['target_ratio']:g}", (mod := load_variant(r["variant_path"])).spec,
                        mod.eval()) for (m, seed), doc in sorted(runs.items()) for r in doc["rows"] if m != "dense"]
    base = load_variant(args.base).eval()
    log(f"measuring {len(variants)} variants and the base in one session")
    started = time.perf_counter()
    report = compare_with_table(load_table(args.lut), Variant("base", base.spec, base), variants, passes=2)
    doc = {"seconds": time.perf_counter() - started, "context": report.context,
           "models": {r.name: {"measured_ms": r.measured_ms, "predicted_ms": r.predicted_ms,
                               "p10_ms": r.measured_ms_p10, "p90_ms": r.measured_ms_p90} for r in report.results}}
    from sessions import keep_earlier_session

    keep_earlier_session(args.work / "measured.json")
    atomic_write_text(args.work / "measured.json", json.dumps(doc, indent=1) + "\n")
    log(f"measured in {doc['seconds']:.0f} s")


def report_stage(args: argparse.Namespace, s: Settings) -> None:
    import prune_stats as st

    from nvit import __version__
    from nvit.fileio import atomic_write_text

    runs = load_rows(args.work)
    chosen, sweep = choose_lambda(s, runs)
    measured = json.loads((args.work / "measured.json").read_text())["models"]
    split = "val" if s.data == "digits" else "test"
    names = {"nvit": f"latency_l{lam(chosen)}", "latency_l1": "latency_l1", "saliency": "saliency",
             "flops_l1": "flops_l1", "knapsack": "knapsack", "uniform": "uniform", "l1": "l1", "random": "random"}
    comparison = {}
    for stage in ("after", "before"):
        curves = {}
        for shown, m in names.items():
            per_seed = {seed: st.curve([(measured[f"{m}/s{seed}/{r['target_ratio']:g}"]["measured_ms"],
                                         r[f"{split}_{stage}"]) for r in runs[(m, seed)]["rows"]])
                        for seed in s.seeds if (m, seed) in runs}
            if per_seed:
                curves[shown] = per_seed
        comparison[stage] = st.compare_methods(curves, "saliency")
    rows = [dict(r, measured_ms=measured[f"{m}/s{seed}/{r['target_ratio']:g}"]["measured_ms"])
            for (m, seed), doc in runs.items() if m != "dense" for r in doc["rows"]]
    base = load_base_eval(args, s)
    doc = {"kind": "nvit.benchmark.prune_fashion", "version": 1, "nvit_version": __version__,
           "host": platform.node(), "settings": asdict(s), "split": split, "lambda_sweep_val": sweep,
           "chosen_lambda": chosen, "base": {**base, "measured_ms": measured["base"]["measured_ms"]},
           "dense_control": runs.get(("dense", SWEEP_SEED), {}).get("rows"),
           "comparison": comparison, "rows": rows,
           "prune_steps_log": {f"{m}/s{seed}": doc["prune_steps_log"] for (m, seed), doc in runs.items()},
           "cpu_seconds": {f"{m}/s{seed}": doc["cpu_seconds"] for (m, seed), doc in runs.items()},
           "measure_seconds": json.loads((args.work / "measured.json").read_text())["seconds"]}
    atomic_write_text(args.out, json.dumps(doc, indent=1) + "\n")
    print(st.markdown(doc))
    log(f"wrote {args.out}")


def load_base_eval(args: argparse.Namespace, s: Settings) -> dict[str, Any]:
    path = args.work / "base_eval.json"
    if path.is_file():
        return json.loads(path.read_text())
    from nvit.fileio import atomic_write_text

    ctx = Context(str(args.base), str(args.lut), s)
    doc = {**ctx.evaluate(ctx.base), "predicted_ms": ctx.predictor.predict_ms(ctx.base.spec),
           "arch": ctx.base.spec.to_dict(), "params": ctx.base.spec.num_params()}
    atomic_write_text(path, json.dumps(doc, indent=1) + "\n")
    return doc


def space_stage(args: argparse.Namespace, s: Settings) -> None:
    """The table's search space for the base: every width down to one group (so pruning stays on the grid)."""
    from nvit.profiler.space import SearchSpace, aligned_span, arch_for_space, save_space

    spec = arch_for_space(str(args.base))
    b, g = spec.blocks[0], s.group_size
    space = SearchSpace(base=spec, embed_dims=aligned_span(2 * g, spec.embed_dim, 4, 2 * g),
                        heads=tuple(range(1, b.heads + 1)), qk_dims=tuple(range(g, b.qk_dim + 1, g)),
                        v_dims=tuple(range(g, b.v_dim + 1, g)), mlp_dims=aligned_span(g, b.mlp_dim, 6, g),
                        blocks_per_embed=2, name=f"{spec.name or 'base'}-prune")
    path = save_space(space, args.work / "space.json")
    log(f"wrote {path}: {space.counts()}")


def apply_overrides(s: Any, items: list[str]) -> Any:
    """``KEY=VALUE`` overrides of a settings dataclass (tuples as comma-separated values)."""
    for item in items:
        key, _, value = item.partition("=")
        current = getattr(s, key)
        if isinstance(current, tuple):  # an empty tuple default holds numbers
            parsed: Any = tuple((type(current[0]) if current else float)(v) for v in value.split(",") if v)
        else:
            parsed = type(current)(value)
        s = replace(s, **{key: parsed})
    return s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=("space", "run", "measure", "report"))
    parser.add_argument("--base", type=Path, required=True, help="The trained base (a variant folder; for the "
                        "space stage also its arch.json).")
    parser.add_argument("--lut", type=Path, help="Latency table of the base (run, measure, report).")
    parser.add_argument("--work", type=Path, default=Path("bench-prune-fashion"))
    parser.add_argument("--out", type=Path, default=Path("results/prune_fashion.json"))
    parser.add_argument("--jobs", type=int, default=1, help="Runs in parallel (one thread each).")
    parser.add_argument("--quick", action="store_true", help="Tiny budgets on digits: a smoke run.")
    parser.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    s = apply_overrides(QUICK if args.quick else Settings(), args.overrides)
    args.work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(Path(__file__).parent))
    {"space": space_stage, "run": run_stage, "measure": measure_stage, "report": report_stage}[args.stage](args, s)


if __name__ == "__main__":
    main()
