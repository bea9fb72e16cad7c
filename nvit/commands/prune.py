"""``nvit prune``: global structural pruning with Hessian-aware saliency and a LUT latency regularizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from nvit.commands.options import REQUIRE_PRECISION
from nvit.commands.prune_progress import PruneProgress, epochs_warning, plan_line
from nvit.commands.train import AUGMENT_HELP, DATA_HELP, augment_choice
from nvit.errors import NvitError
from nvit.fileio import output_folder


def _choice(enum_type: Any, value: str, option: str) -> Any:
    try:
        return enum_type(value)
    except ValueError:
        known = " | ".join(str(m.value) for m in enum_type)
        raise NvitError(f"unknown {option} {value!r}; use {known}") from None


def variants_table(result: Any, accuracies: dict[str, float], unit: str) -> Table:
    from nvit.swin import SwinSpec

    table = Table(title=f"pruned variants (dense {result.dense_latency_ms:.4g} {unit}, "
                        f"smallest reachable {result.min_latency_ms:.4g} {unit})")
    measured = result.measured_targets is not None
    for col in ("variant", f"target {unit}", f"predicted {unit}", *((f"measured {unit}", "met") if measured else ()),
                "step", "embed", "heads", "qk", "v", "mlp", "params M", "val top-1"):
        table.add_column(col, justify="left" if col == "variant" else "right", no_wrap=col == "variant")
    for v in result.variants:
        blocks = v.arch.blocks  # a Swin: every stage's blocks
        embed = ("/".join(str(s.embed_dim) for s in v.arch.stages) if isinstance(v.arch, SwinSpec)
                 else str(v.arch.embed_dim))
        acc = accuracies.get(v.label)
        extra = (("" if v.measured_ms is None else f"{v.measured_ms:.4g}",
                  {True: "[green]yes[/]", False: "[red]no[/]", None: ""}[v.target_met_measured]) if measured else ())
        table.add_row(
            v.label, f"{v.target_ms:.4g}", f"{v.predicted_latency_ms:.4g}", *extra, str(v.step), embed,
            "/".join(str(b.heads) for b in blocks), "/".join(str(b.qk_dim) for b in blocks),
            "/".join(str(b.v_dim) for b in blocks), "/".join(str(b.mlp_dim) for b in blocks),
            f"{v.arch.num_params() / 1e6:.3f}", "" if acc is None else f"{100 * acc:.1f}%",
        )
    if measured:
        m = result.measured_targets
        table.caption = (f"measured = drift-corrected median with the table's backend; {m['measurements']} "
                         f"measurement(s), {m['seconds']:.1f} s; final correction measured/predicted "
                         f"{m['correction']:.3f}")
    return table


def prune(
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: one variant folder per target, the log, "
                             "the resumable checkpoint and prune_run.json."),
    target_latency: list[str] = typer.Option([], "--target-latency", help="Predicted latency to reach, in the "
                                             "LUT's unit, e.g. 5ms or 800us (repeat for a Pareto family)."),
    target_ratio: list[float] = typer.Option([], "--target-ratio", help="Fraction of the base model's predicted "
                                             "latency, e.g. 0.5 (repeatable)."),
    lut: str = typer.Option(..., "--lut", help="Latency table (Parquet) of the target device, a service URL "
                            "(http://HOST:PORT/v1/luts/<sha256>: downloaded once, sha256 checked), or 'flops' "
                            "for a FLOPs-proportional stand-in (ratio targets only)."),
    checkpoint: Path | None = typer.Option(None, "--checkpoint", help="Base model: timm/DeiT/nvit .pth or "
                                           ".safetensors file."),
    variant: Path | None = typer.Option(None, "--variant", help="Base model: an nvit variant folder."),
    arch: str | None = typer.Option(None, "--arch", help="Preset or arch.json of --checkpoint (default: inferred)."),
    data: str = typer.Option("digits", "--data", help=DATA_HELP),
    augment: str = typer.Option("auto", "--augment", help=AUGMENT_HELP),
    ranking: str | None = typer.Option(None, "--ranking", help="How groups are chosen at each pruning step: "
                                       "knapsack (the least saliency whose ΔLat from the table meets the step's "
                                       "pace), latency (saliency − η·ΔLat), saliency (saliency alone), flops "
                                       "(saliency − η·ΔFLOPs). Default: knapsack where whole sub-layers may go "
                                       "(measured best in BENCHMARKS.md §2b, §2c), saliency when pruning widths "
                                       "only (an older table, or --remove none: there the knapsack measured worst)."),
    no_latency: bool = typer.Option(False, "--no-latency", help="Same as --ranking saliency: rank by saliency "
                                    "alone; the LUT still decides when each target is met."),
    latency_weight: float | None = typer.Option(None, "--latency-weight", help="Unit-free weight λ of the latency "
                                                "term: η = λ·median(saliency)/median(ΔLat) over the groups of the "
                                                "first pruning step, then fixed for the run (default 3.0, chosen "
                                                "on validation in BENCHMARKS.md §2)."),
    interval: int = typer.Option(100, "--interval", help="Training steps between pruning steps: the recovery "
                                 "training and the saliency window of each (small data sets: see README, 'How long "
                                 "pruning takes')."),
    pace: float = typer.Option(0.001, "--pace", help="Fraction of the base model's predicted latency removed at "
                               "each pruning step (0.001 with --interval 100 is NViT's pace: about two groups per "
                               "100 batches on DeiT-B). Reaching a ratio r takes about (1 − r)/pace pruning steps; "
                               "the run prints the training steps this implies, in epochs of the data, and its bar "
                               "an ETA (both estimates)."),
    group_size: int = typer.Option(8, "--group-size", help="Channels per EMB/QK/V/MLP group (heads go one by one); "
                                   "groups are re-formed at every step from the lowest-scoring channels."),
    saliency_window: int | None = typer.Option(None, "--saliency-window", help="Steps before each pruning step "
                                               "whose gradients form the saliency (default: the whole interval)."),
    saliency_ema: float = typer.Option(0.9, "--saliency-ema", help="Momentum of the saliency scores across pruning "
                                       "steps (NViT: 0.9; 0: each window alone)."),
    saliency_norm: str = typer.Option("none", "--saliency-norm", help="Normalisation across structure types: "
                                      "none | tensor-count (divide by the tensors a unit spans; not NViT's)."),
    remove: str | None = typer.Option(None, "--remove", help="Whole sub-layers pruning may remove, priced by the "
                                      "table's measured attention-only and MLP-only blocks: attn,mlp | attn | mlp | "
                                      "none (widths only). A block that loses both is dropped; one attention is always "
                                      "kept. Default: attn,mlp where the table measured those blocks (BENCHMARKS.md "
                                      "§2b), widths only with a table that did not."),
    min_heads: int = typer.Option(1, "--min-heads", help="Fewest heads a block may keep (at least the table's "
                                  "smallest measured)."),
    min_embed_dim: int | None = typer.Option(None, "--min-embed-dim", help="Narrowest embedding width pruning may "
                                             "leave (default: the smallest the table measured)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Training batch size."),
    lr: float = typer.Option(1e-4, "--lr", help="AdamW learning rate while pruning."),
    weight_decay: float = typer.Option(0.05, "--weight-decay", help="AdamW weight decay."),
    kd_weight: float = typer.Option(0.5, "--kd-weight", help="Weight of distillation from the dense model (0: CE)."),
    kd_temperature: float = typer.Option(1.0, "--kd-temperature", help="Distillation temperature τ."),
    seed: int = typer.Option(0, "--seed", help="Seed of batch order and augmentation."),
    device: str | None = typer.Option(None, "--device", help="Torch device to train on: auto, cpu, cuda, cuda:N "
                                      "(default: auto; under torchrun each rank takes its local GPU)."),
    lut_device: str | None = typer.Option(None, "--lut-device", help="Require a table measured on this device "
                                          "kind (cpu | gpu)."),
    precision: str | None = REQUIRE_PRECISION,
    lut_batch_size: int | None = typer.Option(None, "--lut-batch-size", help="Require a table of this batch size."),
    num_workers: int = typer.Option(0, "--num-workers", help="Data loading worker processes (default 0: augmentation "
                                    "then runs in this process, seeded by the step, so --resume is exact)."),
    evaluate: bool = typer.Option(True, "--eval/--no-eval", help="Report val top-1 of each variant at the end."),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run in --out."),
    measure_targets: str = typer.Option("auto", "--measure-targets", help="Meet targets at measured latency: "
                                        "time each variant where it crosses its target (the table's backend, "
                                        "beside its own rows) and keep pruning while it misses. auto: when the "
                                        "table's device is this machine, or, for a table fetched from a service, "
                                        "an agent of its device is registered there (a measure job per variant); "
                                        "on: require one; off: predicted only."),
) -> None:
    """Prune a trained ViT globally (EMB, heads, QK, V, MLP) until its predicted latency meets every target,
    saving one sliced variant per target."""
    from nvit.commands.service_access import local_lut
    from nvit.data import build_dataset
    from nvit.pruning.config import (
        DEFAULT_LATENCY_WEIGHT,
        DEFAULT_RANKING,
        WIDTH_ONLY_RANKING,
        PruneConfig,
        RankingMethod,
        Target,
        parse_remove,
    )
    from nvit.pruning.limits import sublayers_that_may_go
    from nvit.pruning.recipe import load_base, load_latency_predictor, record_top1
    from nvit.pruning.saliency import SaliencyNorm
    from nvit.training.distributed import collective_errors, init_distributed, shutdown
    from nvit.training.fit import top1

    output_folder(out)
    if not target_latency and not target_ratio:
        raise NvitError("give at least one --target-latency (e.g. 5ms) or --target-ratio (e.g. 0.5)")
    if no_latency and ranking not in (None, "saliency"):
        raise NvitError(f"--no-latency and --ranking {ranking} contradict each other; choose one")
    method = None if ranking is None and not no_latency else \
        _choice(RankingMethod, "saliency" if no_latency else ranking, "--ranking")
    if latency_weight is not None and method not in (None, RankingMethod.LATENCY, RankingMethod.FLOPS):
        what = "--no-latency" if no_latency else f"--ranking {ranking}"
        raise NvitError(f"{what} and --latency-weight contradict each other; choose one")
    removes = None if remove is None else parse_remove(remove)
    targets = [Target.latency(t) for t in target_latency] + [Target.ratio(r) for r in target_ratio]
    norm = _choice(SaliencyNorm, saliency_norm, "--saliency-norm")
    base = load_base(checkpoint=checkpoint, variant=variant, arch=arch)
    spec = base.model.spec
    loaded = load_latency_predictor(local_lut(lut), spec, device=lut_device, precision=precision,
                                    batch_size=lut_batch_size)
    if method is None:  # the default: what the benchmarks measured best for what this run may remove
        method = DEFAULT_RANKING if sublayers_that_may_go(removes, loaded.predictor) else WIDTH_ONLY_RANKING
        if latency_weight is not None and method not in (RankingMethod.LATENCY, RankingMethod.FLOPS):
            raise NvitError(f"--latency-weight needs --ranking latency or flops (the default here is {method.value})")
    from nvit.validation.targets import MeasureTargets, choose_measurer

    measurer, measuring = choose_measurer(_choice(MeasureTargets, measure_targets, "--measure-targets"),
                                          getattr(loaded.predictor, "table", None), remote=_remote_of(lut, loaded))
    if target_latency and not loaded.has_time_unit:
        raise NvitError("--lut flops has no time unit; use --target-ratio, or give a latency table")
    config = PruneConfig(
        targets=tuple(targets), group_size=group_size, interval=interval, pace=pace,
        saliency_window=saliency_window, ranking=method, saliency_ema=saliency_ema,
        latency_weight=DEFAULT_LATENCY_WEIGHT if latency_weight is None else latency_weight, saliency_norm=norm,
        min_heads=min_heads, min_embed_dim=min_embed_dim, remove=removes,
        batch_size=batch_size, lr=lr,
        weight_decay=weight_decay, seed=seed,
        extra={"kd_weight": kd_weight, "kd_temperature": kd_temperature, "data": data,
               "augment": augment_choice(augment, False)},
    )
    # refuse a model outside the table's grid and unreachable targets before reading any data
    from nvit.pruning.limits import pruning_layout
    from nvit.pruning.targets import resolve_targets

    resolve_targets(config.targets, loaded.predictor, pruning_layout(spec, config, loaded.predictor))
    ctx = init_distributed(device or "auto")  # a single process unless launched by torchrun
    try:
        with collective_errors(ctx):
            result = _run(ctx, base, loaded, config, data, batch_size, seed, num_workers, kd_weight,
                          kd_temperature, out, resume, (measurer, measuring))
    finally:
        shutdown()
    if not ctx.is_main:
        return
    # rank 0 alone, outside the process group: no collective can wait on a rank that has already finished
    accuracies: dict[str, float] = {}
    if evaluate:
        from nvit.models import load_variant

        val_set = build_dataset(data, "val", spec, augment=False)
        for v in result.variants:
            accuracies[v.label] = top1(load_variant(v.path).to(ctx.device), val_set, rank=0, world_size=1)
            record_top1(v.path, accuracies[v.label], split="val", stage="pruned, before fine-tuning")
    unit = "ms" if loaded.has_time_unit else "x dense"
    console = Console(width=max(Console().width, 120))  # the table is wide; pipes and logs get 120 columns
    console.print(variants_table(result, accuracies, unit))
    console.print(f"variants in {result.out_dir}/<variant>; per-step log: {result.log_path}")


def _run(ctx: Any, base: Any, loaded: Any, config: Any, data: str, batch_size: int, seed: int, num_workers: int,
         kd_weight: float, kd_temperature: float, out: Path, resume: bool, measuring: tuple[Any, str]) -> Any:
    from nvit.data import build_dataset
    from nvit.lut.accuracy import trust_warnings
    from nvit.pruning.loop import prune as run_prune
    from nvit.pruning.schedule import plan_schedule
    from nvit.training.batches import StepBatches
    from nvit.training.distill import distillation_loss_fn, frozen_teacher

    spec = base.model.spec
    train_set = build_dataset(data, "train", spec, augment=config.extra["augment"])
    batches = StepBatches(train_set, batch_size=batch_size, seed=seed, num_workers=num_workers, rank=ctx.rank,
                          world_size=ctx.world_size)
    teacher = frozen_teacher(base.model).to(ctx.device) if kd_weight > 0 else None
    loss_fn = distillation_loss_fn(teacher, weight=kd_weight, temperature=kd_temperature)
    unit = "ms" if loaded.has_time_unit else "x dense"
    measurer, measuring_line = measuring
    provenance = {"base": base.provenance, "lut": loaded.provenance, "data": data, "world_size": ctx.world_size,
                  "targets_measured": measurer is not None}
    console = Console(stderr=True, quiet=not ctx.is_main)
    meta = getattr(loaded.predictor, "meta", None)  # the FLOPs predictor has none
    for warning in trust_warnings(meta, loaded.predictor) if meta is not None else ():
        console.print(f"[yellow]warning:[/] {warning}")
    schedule = plan_schedule(spec, config, loaded.predictor, batches.steps_per_epoch)
    console.print(plan_line(schedule, len(train_set), batch_size * ctx.world_size, unit))
    console.print(measuring_line)
    console.print(ranking_line(config, loaded.predictor))
    warning = epochs_warning(schedule)
    if warning:
        console.print(f"[yellow]{warning}[/]")
    with PruneProgress(schedule, console, unit, disable=not ctx.is_main) as bar:
        return run_prune(base.model, config=config, predictor=loaded.predictor, data=batches, out_dir=out,
                         loss_fn=loss_fn, resume=resume, provenance=provenance, on_step=bar.on_step,
                         device=ctx.device, distributed=ctx, measurer=measurer)


def ranking_line(config: Any, predictor: Any) -> str:
    """Which ranking the run uses and what may go, one line."""
    from nvit.pruning.config import RankingMethod
    from nvit.pruning.limits import sublayers_that_may_go

    removable = sublayers_that_may_go(config.remove, predictor)
    what = f"widths and whole {' and '.join(w.value for w in removable)} sub-layers" if removable else "widths only"
    weight = f" (λ {config.latency_weight:g})" if config.ranking in (RankingMethod.LATENCY, RankingMethod.FLOPS) else ""
    return f"ranking {config.ranking.value}{weight}; pruning {what}"


def _remote_of(lut: str, loaded: Any) -> Any:
    """For a ``--lut`` URL, what offers a measurer on the service's agent of the table's device, for the table
    already fetched into ``loaded`` (its sha256 names it on the service); ``None`` for a local file."""
    if not lut.startswith(("http://", "https://")):
        return None
    from nvit.service.client import split_lut_url
    from nvit.service.remote_measure import remote_measurer

    base_url, sha = split_lut_url(lut)[0], loaded.provenance["sha256"]
    return lambda: remote_measurer(base_url, sha)


def register(app: typer.Typer) -> None:
    app.command("prune")(prune)
