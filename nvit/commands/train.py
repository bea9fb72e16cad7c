"""``nvit train`` and ``nvit finetune``: train a base model from scratch, fine-tune a variant with KD.

Both run alone or under ``torchrun --nproc_per_node N`` (DDP: NCCL on GPUs, gloo on CPU); ``--batch-size``
is per process. Only rank 0 shows progress and writes files. An interrupted run resumes from the
checkpoint in ``--out`` when the same command is given again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from nvit.errors import NvitError

DATA_HELP = ("'digits' (bundled 8x8), 'fashion-mnist' (the Debian package's IDX files; 'fashion-mnist:FOLDER' "
             "for another folder), 'synthetic', or an ImageNet-layout folder (ROOT/train, ROOT/val).")
# The thresholds are nvit.data.transforms.TINY_IMAGE_PX and SMALL_IMAGE_PX (kept here: --help imports no torch).
AUGMENT_HELP = ("Train-time augmentation: auto | none | shift | imagenet. auto picks by image size: none up to "
                "16 px (8x8 digits), shift (random translation by 1/14 of the side, 2 px at 28, no flip) up to "
                "64 px (Fashion-MNIST), imagenet (DeiT: random resized crop 8-100%, flip) above.")
NO_AUGMENT_HELP = "Same as --augment none."

CHECKPOINT_FILE = "train_checkpoint.pt"
HISTORY_FILE = "train_log.csv"
EVAL_BATCH_SIZE = 256

# The rule is nvit.data.workers.default_workers (kept here: --help imports no torch).
WORKERS_HELP = ("Data loading processes per training process (default: 0 for named data sets, held in memory; "
                "for folders one fewer than the cores available to each process, at most 4: 1 on a 2-core "
                "machine, 0 on one core).")
DEVICE_HELP = "auto (cuda if available), cpu, cuda or cuda:N; under torchrun each rank takes its LOCAL_RANK GPU."


def _run(
    *, model: Any, data: str, out: Path, epochs: int, batch_size: int, lr: float, min_lr: float,
    weight_decay: float, warmup_epochs: float, seed: int, augment: str, workers: int | None, device: str,
    restart: bool, loss_factory: Any, provenance: dict[str, Any], title: str, teacher: Any = None,
) -> None:
    """Build data and loaders, train (resumably) with ``loss_factory(teacher)``, save the variant on rank 0."""
    from nvit.data import build_dataset, build_loader, in_memory
    from nvit.data.workers import default_workers
    from nvit.models import save_variant
    from nvit.training.distributed import (
        configure_rank_logging,
        init_distributed,
        raise_if_lost_peer,
        shutdown,
        unwrap,
        wrap_ddp,
    )
    from nvit.training.fit import TrainConfig, evaluate, fit, save_history

    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, min_lr=min(min_lr, lr),
                         weight_decay=weight_decay, warmup_epochs=warmup_epochs, seed=seed)
    ctx = init_distributed(device)
    configure_rank_logging(ctx)
    console = Console(stderr=True, quiet=not ctx.is_main)
    try:
        spec = model.spec
        train_set = build_dataset(data, "train", spec, augment=augment)
        val_set = build_dataset(data, "val", spec, augment=False)
        n_workers = workers if workers is not None else (0 if in_memory(data) else default_workers())
        train_loader = build_loader(train_set, batch_size=batch_size, train=True, seed=seed, num_workers=n_workers)
        val_loader = build_loader(val_set, batch_size=EVAL_BATCH_SIZE, train=False, num_workers=n_workers)
        model = wrap_ddp(model, ctx)
        if teacher is not None:
            teacher = teacher.to(ctx.device)
        loss_fn = loss_factory(teacher)
        # the model as loaded from disk (a resumed run restores its checkpoint only inside fit)
        before = evaluate(model, val_loader) if teacher is not None else None
        if before is not None:
            console.print(f"val top-1 before fine-tuning: {100 * before:.2f}%")
        console.print(f"{title}: {len(train_set)} train / {len(val_set)} val images, {ctx.world_size} "
                      f"process(es) on {ctx.device}, global batch {batch_size * ctx.world_size}")
        columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[status]}"), TimeElapsedColumn())
        with Progress(*columns, console=console, disable=not ctx.is_main) as bar:
            task = bar.add_task(title, total=epochs * len(train_loader), status="")

            def on_step(p: Any) -> None:
                status = f"epoch {p.epoch + 1}/{p.epochs}  loss {p.loss:.4f}  lr {p.lr:.2e}"
                bar.update(task, completed=p.epoch * p.steps + p.step, status=status)

            def on_epoch(s: Any) -> None:
                bar.console.print(f"epoch {s.epoch + 1}/{epochs}: loss {s.loss:.4f}, train top-1 "
                                  f"{100 * s.train_top1:.2f}%, val top-1 {100 * s.val_top1:.2f}%, {s.seconds:.1f} s")

            result = fit(model, train_loader, loss_fn, config, val_loader=val_loader,
                         checkpoint_path=out / CHECKPOINT_FILE, resume=not restart, on_step=on_step,
                         on_epoch=on_epoch, extra={"data": data, "world_size": ctx.world_size, **provenance})
            bar.update(task, completed=epochs * len(train_loader))
        top1 = result.val_top1 if result.val_top1 is not None else evaluate(model, val_loader)
        if ctx.is_main:
            record = {**provenance, "data": data, "train": config.to_dict(), "world_size": ctx.world_size,
                      "top1": top1, "top1_split": "val", "top1_stage": title}
            if before is not None:
                record["top1_before_finetune"] = before
            save_history(result.history, out / HISTORY_FILE)
            save_variant(unwrap(model), out, record)
        console.print(f"[green]saved[/] {out} (val top-1 {100 * top1:.2f}%; per-epoch log {out / HISTORY_FILE})")
    except RuntimeError as exc:
        raise_if_lost_peer(ctx, exc)
        raise
    finally:
        shutdown()


def augment_choice(augment: str, no_augment: bool) -> str:
    """The augmentation preset named by ``--augment`` and ``--no-augment`` (checked)."""
    from nvit.data import Augment

    if no_augment and augment not in ("auto", "none"):
        raise NvitError(f"--no-augment and --augment {augment} contradict each other; choose one")
    try:
        return Augment.parse("none" if no_augment else augment).value
    except ValueError as exc:
        raise NvitError(str(exc)) from None


def _check_out(out: Path, restart: bool) -> None:
    from nvit.fileio import output_folder

    output_folder(out)
    if restart and (out / CHECKPOINT_FILE).exists():
        (out / CHECKPOINT_FILE).unlink()


# Options ``train`` and ``finetune`` share (one definition each).
_DATA = typer.Option("digits", "--data", help=DATA_HELP)
_BATCH = typer.Option(16, "--batch-size", help="Batch size per process.")
_MIN_LR = typer.Option(1e-5, "--min-lr", help="Final learning rate of the cosine schedule.")
_WEIGHT_DECAY = typer.Option(0.05, "--weight-decay", help="AdamW weight decay (matrices only).")
_AUGMENT = typer.Option("auto", "--augment", help=AUGMENT_HELP)
_NO_AUGMENT = typer.Option(False, "--no-augment", help=NO_AUGMENT_HELP)
_WORKERS = typer.Option(None, "--workers", help=WORKERS_HELP)
_DEVICE = typer.Option("auto", "--device", help=DEVICE_HELP)
_RESTART = typer.Option(False, "--restart", help="Ignore the checkpoint in --out and start again.")


def train(
    arch: str = typer.Option("vit_test", "--arch", help="Preset name (a ViT, DeiT, ReViT or Swin: nvit arch list) "
                             "or arch.json of the model to train."),
    data: str = _DATA,
    epochs: int = typer.Option(..., "--epochs", help="Training epochs."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the trained model (arch.json + weights)."),
    batch_size: int = _BATCH,
    lr: float = typer.Option(1e-3, "--lr", help="Peak AdamW learning rate."),
    min_lr: float = _MIN_LR,
    weight_decay: float = _WEIGHT_DECAY,
    warmup_epochs: float = typer.Option(1.0, "--warmup-epochs", help="Linear warm-up length in epochs."),
    seed: int = typer.Option(0, "--seed", help="Seed of the initial weights, data order and augmentation."),
    augment: str = _AUGMENT,
    no_augment: bool = _NO_AUGMENT,
    workers: int | None = _WORKERS,
    device: str = _DEVICE,
    restart: bool = _RESTART,
) -> None:
    """Train a ViT or a Swin from scratch (e.g. the small base model on the bundled digits) and save it as a
    variant."""
    from nvit.models.checkpoint import build_any
    from nvit.swin import resolve_any_arch
    from nvit.training.distill import ClassificationLoss

    spec = resolve_any_arch(arch)
    _check_out(out, restart)
    _run(model=build_any(spec, seed=seed), data=data, out=out, epochs=epochs, batch_size=batch_size, lr=lr,
         min_lr=min_lr, weight_decay=weight_decay, warmup_epochs=warmup_epochs, seed=seed,
         augment=augment_choice(augment, no_augment),
         workers=workers, device=device, restart=restart, loss_factory=lambda _teacher: ClassificationLoss(),
         provenance={"command": "train", "arch_source": arch}, title="train")


def finetune(
    variant: Path = typer.Option(..., "--variant", help="Variant folder to fine-tune (e.g. one from nvit prune)."),
    teacher: Path = typer.Option(..., "--teacher", help="Dense teacher: a variant folder or checkpoint file."),
    data: str = _DATA,
    epochs: int = typer.Option(..., "--epochs", help="Fine-tuning epochs."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the fine-tuned variant."),
    kd_weight: float = typer.Option(0.5, "--kd-weight", help="Weight α of the distillation term (0: CE only)."),
    kd_temperature: float = typer.Option(1.0, "--kd-temperature", help="Soft distillation temperature τ."),
    kd_mode: str = typer.Option("auto", "--kd-mode", help="auto (hard for distilled students, else soft), "
                                "soft or hard."),
    batch_size: int = _BATCH,
    lr: float = typer.Option(5e-4, "--lr", help="Peak AdamW learning rate."),
    min_lr: float = _MIN_LR,
    weight_decay: float = _WEIGHT_DECAY,
    warmup_epochs: float = typer.Option(0.5, "--warmup-epochs", help="Linear warm-up length in epochs."),
    seed: int = typer.Option(0, "--seed", help="Seed of data order and augmentation."),
    augment: str = _AUGMENT,
    no_augment: bool = _NO_AUGMENT,
    workers: int | None = _WORKERS,
    device: str = _DEVICE,
    restart: bool = _RESTART,
) -> None:
    """Fine-tune a pruned variant with knowledge distillation from the dense teacher."""
    from nvit.models import load_model, load_variant, variant_provenance
    from nvit.training.distill import ClassificationLoss, DistillationLoss, DistillConfig

    config = DistillConfig(weight=kd_weight, temperature=kd_temperature, mode=kd_mode)
    if not teacher.exists():
        raise NvitError(f"teacher not found: {teacher} (give a variant folder or a checkpoint file)")
    student = load_variant(variant).train()
    teacher_model = load_model(teacher)
    if teacher_model.spec.num_classes != student.spec.num_classes:
        raise NvitError(f"the teacher has {teacher_model.spec.num_classes} classes, the variant "
                        f"{student.spec.num_classes}")
    _check_out(out, restart)

    def loss_factory(t: Any) -> Any:
        return DistillationLoss(t, config) if config.weight > 0 else ClassificationLoss(config.label_smoothing)

    provenance = {**variant_provenance(variant), "command": "finetune", "finetuned_from": str(variant),
                  "teacher": str(teacher), "distill": config.to_dict()}
    _run(model=student, data=data, out=out, epochs=epochs, batch_size=batch_size, lr=lr, min_lr=min_lr,
         weight_decay=weight_decay, warmup_epochs=warmup_epochs, seed=seed,
         augment=augment_choice(augment, no_augment), workers=workers,
         device=device, restart=restart, loss_factory=loss_factory, provenance=provenance, title="finetune",
         teacher=teacher_model)


def register(app: typer.Typer) -> None:
    app.command("train")(train)
    app.command("finetune")(finetune)
