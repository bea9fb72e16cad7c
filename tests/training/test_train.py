"""Training helpers: schedule values, parameter groups, the step hook, evaluate, learning digits, resume."""

from __future__ import annotations

import math
import time

import pytest
import torch
from torch import nn
from torch.utils.data import Subset, TensorDataset

from nvit.data import DigitsDataset, build_dataset, build_loader
from nvit.models import build_model
from nvit.presets import preset
from nvit.training.checkpoint import TrainError, load_checkpoint
from nvit.training.distill import ClassificationLoss, DistillationLoss, DistillConfig
from nvit.training.fit import TrainConfig, build_optimizer, evaluate, fit, lr_factor, parameter_groups, train_step

VIT_TEST = preset("vit_test")


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: faster than two on a shared 2-core machine, and timings are steadier."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_lr_factor_warmup_then_cosine() -> None:
    f = lambda step: lr_factor(step, total_steps=10, warmup_steps=2, min_ratio=0.1)  # noqa: E731
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(2) == pytest.approx(1.0)
    assert f(6) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # halfway: 0.55
    assert f(6) == pytest.approx(0.55)
    assert f(10) == pytest.approx(0.1) and f(50) == pytest.approx(0.1)
    assert lr_factor(0, total_steps=4, warmup_steps=0, min_ratio=0.0) == pytest.approx(1.0)


def test_parameter_groups_skip_gates_and_decay_only_matrices() -> None:
    model = build_model(VIT_TEST, seed=0)
    model.enable_gates()
    decay, no_decay = parameter_groups(model, 0.05)
    gate_ids = {id(g) for g in model.gate_parameters()}
    grouped = decay["params"] + no_decay["params"]
    assert not gate_ids & {id(p) for p in grouped}
    assert len(grouped) == len(model.weight_parameters())
    assert all(p.ndim >= 2 for p in decay["params"])
    assert id(model.pos_embed) in {id(p) for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0


def test_train_step_runs_hook_after_backward_and_leaves_gates_alone() -> None:
    torch.manual_seed(0)
    model = build_model(VIT_TEST, seed=0)
    model.enable_gates()
    config = TrainConfig(epochs=1, lr=1e-2)
    optimizer = build_optimizer(model, config)
    seen = []
    before = model.blocks[0].mlp.fc1.weight.detach().clone()
    images, labels = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    result = train_step(model, images, labels, optimizer, ClassificationLoss(),
                        after_backward=lambda: seen.append(model.emb_gate.grad.abs().sum().item()))
    assert len(seen) == 1 and seen[0] > 0
    assert torch.equal(model.emb_gate.detach(), torch.ones(VIT_TEST.embed_dim))
    assert not torch.equal(before, model.blocks[0].mlp.fc1.weight)
    assert result.count == 4 and 0 <= result.correct <= 4 and result.lr == pytest.approx(1e-2)
    assert result.loss == pytest.approx(math.log(10), rel=0.05)  # near-uniform logits at init


class _ConstantClass(nn.Module):
    def __init__(self, label: int) -> None:
        super().__init__()
        self.label = label
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(torch.full((len(x),), self.label), 10).float() + self.dummy


def test_evaluate_gives_the_exact_fraction() -> None:
    labels = torch.tensor([3, 3, 1, 0, 3, 2, 3])
    loader = build_loader(TensorDataset(torch.zeros(7, 1, 8, 8), labels), batch_size=3, train=False)
    assert evaluate(_ConstantClass(3), loader) == pytest.approx(4 / 7)
    assert evaluate(_ConstantClass(9), loader) == 0.0


def test_vit_test_learns_digits_well_above_chance() -> None:
    """Measured: 3 epochs, batch 16, lr 1e-3 -> 57.7% val top-1 (chance 10%) in ~7 s on a busy 2-core CPU."""
    model = build_model(VIT_TEST, seed=0)
    config = TrainConfig(epochs=3, batch_size=16, lr=1e-3, min_lr=1e-5, warmup_epochs=1.0)
    train = build_loader(build_dataset("digits", "train", VIT_TEST, augment=False), batch_size=16, train=True)
    val = build_loader(build_dataset("digits", "val", VIT_TEST), batch_size=256, train=False)
    started = time.perf_counter()
    result = fit(model, train, ClassificationLoss(), config, val_loader=val)
    print(f"digits: 3 epochs in {time.perf_counter() - started:.1f} s, val top-1 "
          f"{[round(s.val_top1, 3) for s in result.history]}")
    assert result.val_top1 > 0.35  # 3.5x chance
    assert result.history[-1].loss < result.history[0].loss < math.log(10)


def _small_run(tmp_path, *, stop_after: int | None, seed: int = 0, teacher=None):
    data = Subset(DigitsDataset("train", shift_px=1), range(256))  # random shifts: resume must replay them
    loader = build_loader(data, batch_size=32, train=True, seed=3)
    config = TrainConfig(epochs=3, batch_size=32, lr=2e-3, warmup_epochs=0.5, seed=3)
    model = build_model(VIT_TEST, seed=seed)
    loss = ClassificationLoss() if teacher is None else DistillationLoss(teacher, DistillConfig(weight=0.5))

    def on_epoch(stats) -> None:
        if stop_after is not None and stats.epoch + 1 == stop_after:
            raise KeyboardInterrupt

    try:
        return fit(model, loader, loss, config, checkpoint_path=tmp_path / "ckpt.pt", on_epoch=on_epoch,
                   extra={"data": "digits[:256]"})
    except KeyboardInterrupt:
        return None


def test_resume_continues_with_the_same_losses(tmp_path) -> None:
    teacher = build_model(VIT_TEST, seed=9)
    full = _small_run(tmp_path / "a", stop_after=None, teacher=teacher)
    assert _small_run(tmp_path / "b", stop_after=2, teacher=teacher) is None  # interrupted after epoch 2
    resumed = _small_run(tmp_path / "b", stop_after=None, seed=123, teacher=teacher)  # other init: all restored
    assert resumed.resumed_at_epoch == 2
    assert [s.epoch for s in resumed.history] == [0, 1, 2]
    assert resumed.history[2].losses == full.history[2].losses  # bit-identical
    assert resumed.history[1].loss == pytest.approx(full.history[1].loss)
    assert len(full.history[2].losses) == 8


def test_resume_refuses_other_settings_and_foreign_files(tmp_path) -> None:
    _small_run(tmp_path, stop_after=1)
    data = build_dataset("digits", "train", VIT_TEST)
    loader = build_loader(Subset(data, range(64)), batch_size=32, train=True)
    other = TrainConfig(epochs=3, batch_size=32, lr=1e-3, warmup_epochs=0.5, seed=3)
    with pytest.raises(TrainError, match=r"other settings \(lr\)"):
        fit(build_model(VIT_TEST, seed=0), loader, ClassificationLoss(), other,
            checkpoint_path=tmp_path / "ckpt.pt", extra={"data": "digits[:256]"})
    junk = tmp_path / "junk.pt"
    torch.save({"a": torch.zeros(1)}, junk)
    model = build_model(VIT_TEST, seed=0)
    optimizer = build_optimizer(model, other)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    with pytest.raises(TrainError, match="not an nvit training checkpoint"):
        load_checkpoint(junk, model, optimizer, scheduler)
    with pytest.raises(TrainError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt", model, optimizer, scheduler)


def test_config_is_strict() -> None:
    with pytest.raises(TrainError, match="unknown training key"):
        TrainConfig.from_dict({"epochs": 1, "learning_rate": 1.0})
    with pytest.raises(TrainError, match="min_lr"):
        TrainConfig(epochs=1, lr=1e-3, min_lr=1e-2)
    assert TrainConfig.from_dict(TrainConfig(epochs=2).to_dict()) == TrainConfig(epochs=2)


def test_a_second_run_on_the_same_checkpoint_is_refused(tmp_path) -> None:
    from nvit.training.checkpoint import run_lock

    with run_lock(tmp_path / "ckpt.pt"), pytest.raises(TrainError, match="another run is writing"), \
            run_lock(tmp_path / "ckpt.pt"):
        pass
    with run_lock(tmp_path / "ckpt.pt"):  # released
        pass


# ---- CLI ------------------------------------------------------------------------------------------
def _cli(argv: list[str], capsys) -> tuple[int, str]:
    from nvit.cli import main

    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_cli_train_then_finetune_a_sliced_variant(tmp_path, capsys) -> None:
    import json

    from nvit.models import BlockKeep, KeepIndices, load_variant, save_variant, slice_model

    base = tmp_path / "base"
    code, out = _cli(["train", "--arch", "vit_test", "--data", "digits", "--epochs", "2", "--batch-size", "16",
                      "--lr", "1e-3", "--out", str(base), "--device", "cpu"], capsys)
    assert code == 0, out
    doc = json.loads((base / "arch.json").read_text())
    assert doc["provenance"]["command"] == "train" and doc["provenance"]["train"]["epochs"] == 2
    assert 0.25 < doc["provenance"]["top1"] <= 1.0  # measured 44% after 2 epochs; chance is 10%
    log_lines = (base / "train_log.csv").read_text().splitlines()
    assert log_lines[0].startswith("epoch,loss,train_top1,val_top1") and len(log_lines) == 3

    model = load_variant(base)
    full = KeepIndices.full(model.spec)
    keep = KeepIndices(emb=full.emb[:48], blocks=tuple(BlockKeep(b.heads[:2], b.qk, b.v[:8], b.mlp[:64])
                                                       for b in full.blocks))
    save_variant(slice_model(model, keep), tmp_path / "small", {"note": "sliced by hand"})
    tuned = tmp_path / "tuned"
    args = ["finetune", "--variant", str(tmp_path / "small"), "--teacher", str(base), "--data", "digits",
            "--epochs", "1", "--batch-size", "32", "--out", str(tuned), "--kd-temperature", "2", "--device", "cpu"]
    code, out = _cli(args, capsys)
    assert code == 0, out
    prov = json.loads((tuned / "arch.json").read_text())["provenance"]
    assert prov["note"] == "sliced by hand" and prov["teacher"] == str(base)
    assert prov["distill"] == {"weight": 0.5, "temperature": 2.0, "mode": "auto", "label_smoothing": 0.0}
    assert prov["top1"] > prov["top1_before_finetune"]
    assert load_variant(tuned).spec == load_variant(tmp_path / "small").spec

    code, out = _cli([*args[:-2], "--lr", "1e-3", "--device", "cpu"], capsys)  # same --out, other lr
    assert code == 1 and "other settings (lr)" in out and "Traceback" not in out


def test_cli_errors_are_one_line(tmp_path, capsys) -> None:
    code, out = _cli(["train", "--data", str(tmp_path / "none"), "--epochs", "1", "--out", str(tmp_path / "o")],
                     capsys)
    assert code == 1 and "neither a known name" in out
    code, out = _cli(["train", "--arch", "deit_tiny", "--epochs", "1", "--out", str(tmp_path / "o")], capsys)
    assert code == 1 and "expects in_chans=3" in out
    code, out = _cli(["finetune", "--variant", str(tmp_path), "--teacher", str(tmp_path / "t"), "--epochs", "1",
                      "--out", str(tmp_path / "o")], capsys)
    assert code == 1 and "teacher not found" in out
    code, out = _cli(["train", "--epochs", "1", "--out", str(tmp_path / "o"), "--device", "tpu"], capsys)
    assert code == 1 and "unknown device" in out
