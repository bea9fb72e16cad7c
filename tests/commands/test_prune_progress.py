"""``nvit prune`` says how long it will take: the plan line, the many-epochs warning, the bar's total and ETA."""

from __future__ import annotations

import re

from cli_run import run_cli as cli

from nvit.commands.prune_progress import epochs_warning, eta_line, plan_line
from nvit.presets import preset
from nvit.pruning.runstate import read_run_summary
from nvit.pruning.schedule import PruneSchedule, steps_per_epoch

SPEC = preset("vit_test")


def test_plan_line_and_warning_for_the_default_pace_on_a_small_folder() -> None:
    plan = PruneSchedule(4.0, (2.8, 2.0), pace=0.001, interval_steps=100, steps_per_epoch=steps_per_epoch(4000, 128))
    assert plan_line(plan, 4000, 128, "ms") == (
        "plan: about 50,000 training steps (500 pruning steps every 100, pace 0.1% of 4 ms each) = 1,613 epochs "
        "of the training data (4,000 items, 31 batches of 128); ETA once a few steps are timed")
    assert epochs_warning(plan) == (
        "warning: the default pace (NViT's, set for ImageNet) needs about 50,000 training steps = 1,613 epochs of "
        "this data set; for a small data set raise --pace or lower --interval (README, 'How long pruning takes')")
    faster = PruneSchedule(4.0, (2.8, 2.0), pace=0.02, interval_steps=5, steps_per_epoch=31)
    assert faster.total_steps == 125 and epochs_warning(faster) is None  # 4.0 epochs
    assert "this pace needs about 125" in epochs_warning(PruneSchedule(4.0, (2.0,), 0.02, 5, 2))
    assert eta_line(0.5, 5, 50_000) == ("timed 5 steps: 0.5 s/step, about 6 h 57 min for the remaining ~50,000 "
                                        "steps here (an estimate: the bar's total and ETA follow the run)")


def test_prune_prints_its_plan_warns_of_many_epochs_and_its_bar_ends_at_the_total(prune_cli_inputs, tmp_path,
                                                                                  capsys) -> None:
    out = tmp_path / "run"
    code, _, err = cli(["prune", "--checkpoint", str(prune_cli_inputs / "base.pth"), "--arch", "vit_test", "--lut",
                        str(prune_cli_inputs / "lut.parquet"), "--data", "digits", "--interval", "4", "--pace", "0.05",
                        "--min-embed-dim", "32", "--batch-size", "512", "--target-ratio", "0.7", "--no-eval",
                        "--out", str(out)], capsys)
    assert code == 0, err
    text = " ".join(err.split())  # rich wraps long lines at the console's width
    # 0.3 / 0.05 = 6 pruning steps of 4 training steps; 1,438 digits at batch 512 are 2 batches per epoch
    assert "plan: about 24 training steps (6 pruning steps every 4, pace 5% of" in text
    assert "= 12 epochs of the training data (1,438 items, 2 batches of 512)" in text
    assert "warning: this pace needs about 24 training steps = 12 epochs of this data set" in text
    assert re.search(r"timed 5 steps: [0-9.e-]+ s/step, about \d+ (s|min) for the remaining ~\d+ steps", text)
    steps = read_run_summary(out)["steps"]
    assert steps <= 24
    bars = re.findall(r"(\d+)/(\d+) ETA", err)
    assert bars and bars[-1] == (str(steps), str(steps))  # the bar's last total is the run's length
