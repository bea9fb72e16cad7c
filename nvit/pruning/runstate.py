"""What a pruning run keeps on disk: the resumable checkpoint, the per-step log, and the run summary.

``OUT/prune_state.pt`` holds everything needed to continue exactly (weights and gates, optimizer, group
mask, partial saliency window, RNG, step); it is written atomically and read back with
``weights_only=True``. ``OUT/prune_log.parquet`` is rewritten atomically before each checkpoint, so rows
past the checkpoint's step are dropped on resume. ``OUT/prune_run.json`` is written last, when the run ends.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from nvit.errors import NvitError
from nvit.fileio import atomic_path, atomic_write_text

STATE_FILE = "prune_state.pt"
LOG_FILE = "prune_log.parquet"
RUN_FILE = "prune_run.json"
STATE_KIND = "nvit.prune_state"
RUN_KIND = "nvit.prune_run"
STATE_VERSION = 2


class ResumeError(NvitError):
    """An output folder cannot be used to start or resume a pruning run."""


def check_out_dir(out_dir: Path, resume: bool) -> bool:
    """Whether there is a run to resume in ``out_dir``; refuses to overwrite one unless resuming."""
    has_state = (out_dir / STATE_FILE).is_file()
    if resume and not has_state:
        raise ResumeError(f"nothing to resume: {out_dir / STATE_FILE} does not exist")
    if not resume and (has_state or (out_dir / RUN_FILE).is_file()):
        raise ResumeError(f"{out_dir} already holds a pruning run; pass --resume to continue it, or use another --out")
    return has_state


def save_state(out_dir: Path, state: Mapping[str, Any], log_rows: Sequence[Mapping[str, Any]]) -> None:
    """Write the log, then the checkpoint (the checkpoint is the commit point)."""
    write_log(out_dir / LOG_FILE, log_rows)
    with atomic_path(out_dir / STATE_FILE) as tmp:
        torch.save({"kind": STATE_KIND, "version": STATE_VERSION, **state}, tmp)


def load_state(out_dir: Path) -> dict[str, Any]:
    path = out_dir / STATE_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or foreign file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ResumeError(f"cannot read pruning checkpoint {path}: {first}") from None
    if not isinstance(state, dict) or state.get("kind") != STATE_KIND:
        raise ResumeError(f"{path} is not an nvit pruning checkpoint")
    if state.get("version") != STATE_VERSION:
        raise ResumeError(f"{path}: unsupported checkpoint version {state.get('version')!r}")
    return state


def config_mismatch(saved: Mapping[str, Any], current: Mapping[str, Any]) -> str | None:
    """A one-line description of how two config dicts differ, or ``None`` when they agree."""
    keys = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if not keys:
        return None
    return ", ".join(f"{k}: {saved.get(k)!r} in the checkpoint vs {current.get(k)!r} now" for k in keys[:3])


def write_log(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    import pandas as pd

    with atomic_path(path) as tmp:
        pd.DataFrame(list(rows)).to_parquet(tmp, index=False)


def read_log(path: Path, before_step: int) -> list[dict[str, Any]]:
    """Rows of a previous run's log with ``step < before_step`` (later rows are replayed on resume)."""
    if not path.is_file():
        return []
    import pandas as pd

    frame = pd.read_parquet(path)
    if "step" not in frame.columns:
        raise ResumeError(f"{path} is not a pruning log (no 'step' column)")
    return frame[frame["step"] < before_step].to_dict("records")


def write_run_summary(out_dir: Path, summary: Mapping[str, Any]) -> Path:
    path = out_dir / RUN_FILE
    atomic_write_text(path, json.dumps({"kind": RUN_KIND, "version": STATE_VERSION, **summary}, indent=2) + "\n")
    return path


def read_run_summary(out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(out_dir) / RUN_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ResumeError(f"{path} does not exist (the run has not finished)") from None
    except json.JSONDecodeError as exc:
        raise ResumeError(f"{path} is not valid JSON: {exc.msg}") from None
    if data.get("kind") != RUN_KIND:
        raise ResumeError(f"{path} is not an nvit pruning run summary")
    return data
