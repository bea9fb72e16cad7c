"""The whole pipeline on the CPU with the bundled digits data: profile → train → prune → fine-tune → export →
measure → compare. Every stage writes its artifact into one folder and is skipped when the artifact is
already there, so an interrupted demo resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from nvit.fileio import atomic_write_text
from nvit.models import load_variant, save_variant, variant_provenance
from nvit.models.vit import VisionTransformer, build_model
from nvit.presets import preset

logger = logging.getLogger(__name__)

DEMO_ARCH = "vit_test"
DATA = "digits"
REPORT_FILE = "demo_report.json"


@dataclass(frozen=True)
class DemoConfig:
    """Budgets of each stage; ``quick()`` is the reduced setting used by the test suite."""

    out_dir: Path
    target_ratios: tuple[float, ...] = (0.7, 0.5)
    train_epochs: int = 30
    finetune_epochs: int = 8
    prune_interval: int = 10
    prune_pace: float = 0.05  # of the dense predicted latency per pruning step: 0.5 is reached in ~10 steps
    group_size: int = 8  # the vit_test table's smallest QK/V/MLP widths
    min_embed_dim: int = 32
    calibration_models: int = 6  # dense, small uniform, both at half depth, then pruned shapes
    check_models: int = 4  # held-out whole models the table checks itself on (nvit lut show prints them)
    profile_passes: int = 2  # each row (and calibration model) keeps its fastest pass: survives a stalled host
    reduced_space: bool = False
    threads: int = 1  # intra-op threads of ONNX Runtime and torch: one is steadiest on a shared CPU
    harness: dict[str, float] = field(default_factory=dict)  # overrides of the CPU timing protocol
    measure_targets: bool = True  # time each variant where it crosses its target; prune on while it misses
    seed: int = 0

    @classmethod
    def quick(cls, out_dir: Path) -> DemoConfig:
        # Only the work shrinks; the timing protocol stays the full one: at vit_test's size a model's latency
        # is mostly per-call overhead, and a briefly timed table can put a 0.7 target out of reach.
        return cls(out_dir=out_dir, train_epochs=6, finetune_epochs=1, prune_interval=4, reduced_space=True,
                   check_models=2)


class Reporter:
    """What the demo tells its caller; the CLI draws progress bars from these calls."""

    def stage(self, name: str, total: float | None = None) -> None: ...

    def advance(self, completed: float, status: str = "") -> None: ...

    def note(self, text: str) -> None: ...


# ---- stages ---------------------------------------------------------------------------------------
def demo_space(config: DemoConfig) -> Any:
    from nvit.profiler.space import preset_space

    space = preset_space(DEMO_ARCH)
    if config.reduced_space:
        space = replace(space, embed_dims=(32, 64), heads=(1, 2, 4), qk_dims=(8, 16), v_dims=(8, 16),
                        mlp_dims=(8, 64, 256), blocks_per_embed=1, name="vit_test-quick")
    return space


def profile_stage(config: DemoConfig, report: Reporter) -> Any:
    from nvit.lut.accuracy import summary_line
    from nvit.profiler.base import get_backend
    from nvit.profiler.device import fingerprint
    from nvit.profiler.sweep import SweepOptions, run_sweep
    from nvit.vocab import DeviceKind, Precision

    space = demo_space(config)
    options: dict[str, Any] = {"intra_op_threads": config.threads}
    if config.harness:
        options["harness"] = {**_default_cpu_harness(), **config.harness}
    backend = get_backend("onnxruntime")(device=DeviceKind.CPU, precision=Precision.FP32, batch_size=1, **options)
    report.stage("profile", total=None)
    with backend:
        device = fingerprint(DeviceKind.CPU, threads_used=config.threads)

        def on_progress(p: Any) -> None:
            report.advance(p.done / max(p.total, 1), f"{p.phase.value} {p.name}")

        # Every separately timed part carries its own per-call overhead, which a whole model pays once: the
        # calibration's offset and per-block term (fitted on models of two depths) take it out; no scale.
        result = run_sweep(space, backend, config.out_dir / "lut.parquet", device=device, progress=on_progress,
                           options=SweepOptions(seed=config.seed, calibration_models=config.calibration_models,
                                                fit_scale=False, passes=config.profile_passes,
                                                check_models=config.check_models))
    how = "reused" if result.already_complete else "measured"
    check = result.table.meta.self_check
    accuracy = f"; self-check {summary_line(check.figures())}" if check is not None else ""
    report.note(f"latency table: {len(result.table)} configurations ({how}){accuracy}")
    return result.table


def _default_cpu_harness() -> dict[str, Any]:
    from nvit.profiler.harness import HarnessConfig
    from nvit.vocab import DeviceKind

    return HarnessConfig.for_device(DeviceKind.CPU).to_dict()


def train_stage(config: DemoConfig, report: Reporter) -> tuple[VisionTransformer, float]:
    """Train the dense base on digits (reused when ``base/`` exists; resumable through its checkpoint)."""
    from nvit.data import build_dataset, build_loader
    from nvit.training.distill import ClassificationLoss
    from nvit.training.fit import TrainConfig, evaluate, fit

    folder = config.out_dir / "base"
    if (folder / "arch.json").is_file():
        model = load_variant(folder)
        return model, float(_provenance(folder)["top1"])
    spec = preset(DEMO_ARCH)
    model = build_model(spec, seed=config.seed)
    train_set, val_set = build_dataset(DATA, "train", spec), build_dataset(DATA, "val", spec)
    train_loader = build_loader(train_set, batch_size=16, train=True, seed=config.seed)
    val_loader = build_loader(val_set, batch_size=256, train=False)
    train_config = TrainConfig(epochs=config.train_epochs, batch_size=16, lr=1e-3, min_lr=1e-5, warmup_epochs=1,
                               seed=config.seed)
    report.stage("train", total=config.train_epochs)
    fit(model, train_loader, ClassificationLoss(), train_config, checkpoint_path=config.out_dir / "base_train.pt",
        on_epoch=lambda s: report.advance(s.epoch + 1, f"loss {s.loss:.3f}  train top-1 {100 * s.train_top1:.1f}%"))
    top1 = evaluate(model, val_loader)
    save_variant(model.eval(), folder, provenance={"stage": "trained from scratch", "data": DATA, "top1": top1,
                                                   "epochs": config.train_epochs})
    (config.out_dir / "base_train.pt").unlink(missing_ok=True)
    report.note(f"base model: val top-1 {100 * top1:.1f}%")
    return model.eval(), top1


def prune_stage(config: DemoConfig, base: VisionTransformer, table: Any, report: Reporter) -> Any:
    from nvit.data import build_dataset
    from nvit.lut.predictor import LatencyPredictor
    from nvit.pruning.config import PruneConfig, Target
    from nvit.pruning.loop import prune
    from nvit.pruning.runstate import STATE_FILE
    from nvit.training.batches import StepBatches
    from nvit.training.distill import distillation_loss_fn, frozen_teacher

    out = config.out_dir / "prune"
    prune_config = PruneConfig(
        targets=tuple(Target.ratio(r) for r in config.target_ratios), group_size=config.group_size,
        interval=config.prune_interval, pace=config.prune_pace, min_embed_dim=config.min_embed_dim,
        batch_size=64, lr=5e-4, seed=config.seed, extra={"kd_weight": 0.5, "kd_temperature": 2.0, "data": DATA},
    )
    loss_fn = distillation_loss_fn(frozen_teacher(base), weight=0.5, temperature=2.0)
    batches = StepBatches(build_dataset(DATA, "train", base.spec), batch_size=64, seed=config.seed)
    report.stage("prune", total=1.0)
    measurer = None
    if config.measure_targets:
        from nvit.validation.targets import TableMeasurer

        measurer = TableMeasurer(table)
    result = prune(
        _fresh_copy(base), config=prune_config, predictor=LatencyPredictor(table), data=batches, out_dir=out,
        loss_fn=loss_fn, resume=(out / STATE_FILE).is_file(),
        provenance={"base": "demo base (vit_test on digits)", "lut": str(config.out_dir / "lut.parquet")},
        on_step=lambda r: report.advance(r.progress, f"step {r.step}  pred {r.predicted_latency_ms:.4f} ms"
                                         f"  acc {100 * r.accuracy:.0f}%"),
        measurer=measurer,
    )
    if result.measured_targets is not None:
        m = result.measured_targets
        def verdict(v: Any) -> str:
            if not v.target_met_measured:
                return f"{v.measured_ms:.4f} > {v.target_ms:.4f} ms (missed)"
            within = "" if v.measured_ms <= v.target_ms else ", within the measurement's noise"
            return f"{v.measured_ms:.4f} vs {v.target_ms:.4f} ms (met{within})"

        met = ", ".join(f"{v.label} {verdict(v)}" for v in result.variants)
        report.note(f"targets at measured latency (drift-corrected): {met}; {m['measurements']} measurements, "
                    f"{m['seconds']:.1f} s, measured/predicted {m['correction']:.3f}")
    return result


def _fresh_copy(model: VisionTransformer) -> VisionTransformer:
    import copy

    return copy.deepcopy(model).train()


def finetune_stage(config: DemoConfig, base: VisionTransformer, pruned: Any, report: Reporter
                   ) -> list[tuple[str, Path, float, float]]:
    """Fine-tune each pruned variant with KD from the base; returns (label, folder, top1 before, after)."""
    from nvit.data import build_dataset, build_loader
    from nvit.training.distill import distillation_loss_fn, frozen_teacher
    from nvit.training.fit import TrainConfig, evaluate, fit

    spec = base.spec
    train_loader = build_loader(build_dataset(DATA, "train", spec), batch_size=64, train=True, seed=config.seed)
    val_loader = build_loader(build_dataset(DATA, "val", spec), batch_size=256, train=False)
    loss_fn = distillation_loss_fn(frozen_teacher(base), weight=0.5, temperature=2.0)
    out = []
    for v in pruned.variants:
        folder = config.out_dir / "variants" / v.label
        if (folder / "arch.json").is_file():
            prov = _provenance(folder)
            out.append((v.label, folder, float(prov["top1_before_finetune"]), float(prov["top1"])))
            continue
        model = load_variant(v.path).train()
        before = evaluate(model, val_loader)
        report.stage(f"fine-tune {v.label}", total=config.finetune_epochs)
        fit(model, train_loader, loss_fn,
            TrainConfig(epochs=config.finetune_epochs, batch_size=64, lr=5e-4, warmup_epochs=0, seed=config.seed),
            checkpoint_path=config.out_dir / f"finetune_{v.label}.pt",
            on_epoch=lambda s: report.advance(s.epoch + 1, f"loss {s.loss:.3f}"))
        after = evaluate(model, val_loader)
        prov = {**_provenance(Path(v.path)), "top1_before_finetune": before, "top1": after,
                "finetune_epochs": config.finetune_epochs}
        save_variant(model.eval(), folder, provenance=prov)
        (config.out_dir / f"finetune_{v.label}.pt").unlink(missing_ok=True)
        out.append((v.label, folder, before, after))
    return out


def _provenance(folder: Path) -> dict[str, Any]:
    return dict(variant_provenance(folder))


# ---- the whole demo -------------------------------------------------------------------------------
@dataclass(frozen=True)
class DemoRow:
    variant: str
    embed_dim: int
    heads: tuple[int, ...]
    mlp_dims: tuple[int, ...]
    params: int
    macs: int
    top1: float
    top1_before_finetune: float | None
    predicted_ms: float
    measured_ms: float
    error_pct: float
    speedup_measured: float
    speedup_predicted: float
    onnx_max_abs_error: float
    noise: tuple[str, ...] = ()  # why this row's measurement stayed noisy (empty: it did not)
    error_pct_drift_corrected: float | None = None  # against the measurement corrected for drift since profiling


@dataclass(frozen=True)
class DemoResult:
    rows: list[DemoRow]
    trust: Any  # nvit.validation.trust.Trust: how far the measured figures can be trusted


def run_demo(config: DemoConfig, report: Reporter | None = None) -> DemoResult:
    """Run (or resume) every stage and write ``demo_report.json``, the compare files and the plots."""
    import torch

    report = report or Reporter()
    started = time.perf_counter()
    config.out_dir.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)  # a tiny model trains no faster on more threads, and far slower if shared
    try:
        return _run_stages(config, report, started)
    finally:
        torch.set_num_threads(threads)


def _run_stages(config: DemoConfig, report: Reporter, started: float) -> DemoResult:
    from nvit.export.pipeline import ExportOptions, export_model
    from nvit.plots import plot_pareto, plot_widths, save_compare
    from nvit.validation.compare import Variant, compare_with_table

    table = profile_stage(config, report)
    base, base_top1 = train_stage(config, report)
    pruned = prune_stage(config, base, table, report)
    tuned = finetune_stage(config, base, pruned, report)

    report.stage("export + verify", total=len(tuned) + 1)
    models = [("base", config.out_dir / "base", None, base_top1)] + [(lbl, f, b, a) for lbl, f, b, a in tuned]
    verify_err = {}
    for i, (label, folder, _, _) in enumerate(models):
        res = export_model(load_variant(folder), ExportOptions(out_dir=folder / "export"))
        verify_err[label] = res.verify.max_abs_error
        report.advance(i + 1, f"{label}: max abs error {res.verify.max_abs_error:.2e}")

    report.stage("measure", total=None)
    targets = {v.label: v.target_ms for v in pruned.variants}
    variants = [Variant(label, load_variant(folder).spec, load_variant(folder), str(folder),
                        target_ms=targets.get(label), top1=top1) for label, folder, _, top1 in models]
    comparison = compare_with_table(table, variants[0], variants[1:], same_device=True,
                                    progress=lambda m: report.advance(0.5, m))
    report_dir = config.out_dir / "report"
    save_compare(comparison, report_dir)
    dropped = {label: variant_provenance(folder).get("dropped_blocks", []) for label, folder, _, _ in models}
    plot_widths(base.spec, [(v.name, v.spec) for v in variants[1:]], report_dir / "widths.png", dropped=dropped)
    plot_pareto([(r.name, r.measured_ms, r.top1) for r in comparison.results], report_dir / "pareto.png")

    before = {label: b for label, _, b, _ in models}
    rows = [DemoRow(r.name, r.embed_dim, r.heads, r.mlp_dims, r.params, r.macs, r.top1, before[r.name],
                    r.predicted_ms, r.measured_ms, r.error_pct, r.speedup_measured, r.speedup_predicted,
                    verify_err[r.name], r.noise, r.error_pct_drift_corrected) for r in comparison.results]
    trust = comparison.trust()
    doc = {"schema_version": 2, "kind": "nvit.demo", "trust": trust.to_dict(),
           "config": {**asdict(config), "out_dir": str(config.out_dir)},
           "seconds": time.perf_counter() - started, "rows": [asdict(r) for r in rows],
           "lut": {"path": str(config.out_dir / "lut.parquet"), "identity": table.meta.identity()},
           "prune_log": pruned.log_path}
    atomic_write_text(report_dir / REPORT_FILE, json.dumps(doc, indent=2, default=str) + "\n")
    return DemoResult(rows, trust)


def arch_of(row: DemoRow) -> str:
    return f"e={row.embed_dim} h={'/'.join(map(str, row.heads))} m={'/'.join(map(str, row.mlp_dims))}"
