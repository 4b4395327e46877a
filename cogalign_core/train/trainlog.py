"""Per-step training logs: a Trainer callback that keeps every logged scalar, a CSV writer, and a
callback that feeds the stage's live progress file (step / total, loss or mean reward).

``log.csv`` has one row per optimisation step (``step`` first, then the requested columns in a
fixed order; empty cells where a value was not logged at that step), readable by ``dvc plots``.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Sequence
from typing import Any

from transformers import TrainerCallback

from cogalign_core.io import atomic_write_text
from cogalign_core.progress import ProgressWriter, progress_metrics


class StepLog(TrainerCallback):
    """Collects ``{step: {name: value}}`` from every ``on_log`` call (train and eval logs merge per step)."""

    def __init__(self) -> None:
        self.rows: dict[int, dict[str, float]] = {}

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not logs:
            return
        row = self.rows.setdefault(int(state.global_step), {})
        for k, v in logs.items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                row[k] = float(v)

    def series(self, name: str) -> list[tuple[int, float]]:
        """(step, value) pairs of one logged scalar, in step order, skipping NaN."""
        return [(s, r[name]) for s, r in sorted(self.rows.items()) if name in r and not math.isnan(r[name])]


class ProgressCallback(TrainerCallback):
    """Writes step / max_steps and the latest loss (SFT) or mean reward (GRPO) to the stage's progress
    file (``COGALIGN_PROGRESS_FILE``); does nothing without one, and only the main process writes
    under ``accelerate launch``. Counting starts at ``on_train_begin``, so the ETA leaves out model
    loading."""

    def __init__(self, writer: ProgressWriter | None = None) -> None:
        self.writer = writer or ProgressWriter.from_env("step")

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self.writer.start(total=int(state.max_steps) or None, done=int(state.global_step))

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self.writer.update(int(state.global_step), **progress_metrics(logs or {}))

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self.writer.update(int(state.global_step), total=int(state.max_steps) or None)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self.writer.update(int(state.global_step), force=True)


def write_log_csv(path: str | os.PathLike[str], log: StepLog, columns: Sequence[str],
                  rename: dict[str, str] | None = None) -> None:
    """Write ``step`` + ``columns`` (renamed via ``rename``) for every step with a train-time value."""
    rename = rename or {}
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["step", *[rename.get(c, c) for c in columns]])
    for step, row in sorted(log.rows.items()):
        if step <= 0 or not any(c in row for c in columns):
            continue
        writer.writerow([step, *[_fmt(row.get(c)) for c in columns]])
    atomic_write_text(path, buf.getvalue())


def _fmt(v: float | None) -> str:
    if v is None or math.isnan(v):
        return ""
    return f"{v:.6g}"
