"""Live progress of a running stage: a small JSON file the stage rewrites, the orchestrator reads.

The orchestrator names the file in ``COGALIGN_PROGRESS_FILE`` (DVC passes the environment through
to the stage command); without it every writer here does nothing, so a stage run by hand or by
``dvc repro`` behaves as before. The file holds one JSON object, replaced atomically (temp +
rename), so a reader never sees half of it::

    {"unit": "step", "desc": "sft", "done": 120, "total": 300, "metrics": {"loss": 1.23},
     "started_unix": 1700000000.0, "updated_unix": 1700000042.5, "done_at_start": 0}

``unit`` is ``step`` (optimisation steps) or ``item`` (per-item work, e.g. images); ``started_unix``
is when this phase's counting began (model loading is not part of it) and ``done_at_start`` what was
already done then (a training run resumed from a checkpoint), so a reader can derive a rate and an
ETA. A stage with several phases (segment, then QC) rewrites the file per phase.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cogalign_core.io import atomic_write_text

PROGRESS_ENV = "COGALIGN_PROGRESS_FILE"


@dataclass
class ProgressRecord:
    """One snapshot of a stage's progress (the file's content)."""

    unit: str
    desc: str
    done: int
    total: int | None
    started_unix: float
    updated_unix: float
    metrics: dict[str, float] = field(default_factory=dict)
    done_at_start: int = 0

    @classmethod
    def from_json(cls, text: str) -> ProgressRecord:
        data = json.loads(text)
        return cls(unit=str(data["unit"]), desc=str(data.get("desc", "")), done=int(data["done"]),
                   total=None if data.get("total") is None else int(data["total"]),
                   started_unix=float(data["started_unix"]), updated_unix=float(data["updated_unix"]),
                   metrics={str(k): float(v) for k, v in (data.get("metrics") or {}).items()},
                   done_at_start=int(data.get("done_at_start") or 0))

    def eta_seconds(self) -> float | None:
        """Seconds left at the rate so far (None before the first unit or without a total)."""
        if not self.total:
            return None
        if self.done >= self.total:
            return 0.0
        counted, elapsed = self.done - self.done_at_start, self.updated_unix - self.started_unix
        return elapsed / counted * (self.total - self.done) if counted > 0 and elapsed > 0 else None


class ProgressWriter:
    """Writes :class:`ProgressRecord` snapshots to one file, at most every ``min_interval`` seconds.

    ``path=None`` (no ``COGALIGN_PROGRESS_FILE``) makes every call a no-op.
    """

    def __init__(self, path: str | os.PathLike[str] | None, unit: str, desc: str = "",
                 total: int | None = None, min_interval: float = 0.5) -> None:
        self.path = Path(path) if path else None
        self.unit, self.desc, self.total, self.min_interval = unit, desc, total, min_interval
        self.started = time.time()
        self.done = self.done_at_start = 0
        self.metrics: dict[str, float] = {}
        self._written = 0.0

    @classmethod
    def from_env(cls, unit: str, desc: str = "", total: int | None = None) -> ProgressWriter:
        return cls(os.environ.get(PROGRESS_ENV) or None, unit, desc, total)

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def start(self, total: int | None = None, done: int = 0) -> None:
        """(Re)start counting now, e.g. when training begins after the model has loaded (``done``: the
        units already done, e.g. the step a resumed training run starts from)."""
        self.started, self.done, self.done_at_start = time.time(), done, done
        if total is not None:
            self.total = total
        self._write()

    def update(self, done: int, total: int | None = None, force: bool = False, **metrics: float) -> None:
        """Record ``done`` units (and the latest metrics); written when ``min_interval`` has passed."""
        self.done = done
        if total is not None:
            self.total = total
        self.metrics.update({k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)})
        if self.path is not None and (force or time.monotonic() - self._written >= self.min_interval
                                      or (self.total is not None and done >= self.total)):
            self._write()

    def _write(self) -> None:
        if self.path is None:
            return
        record = ProgressRecord(self.unit, self.desc, self.done, self.total, self.started, time.time(),
                                dict(self.metrics), self.done_at_start)
        try:
            atomic_write_text(self.path, json.dumps(asdict(record), sort_keys=True))
        except OSError:  # progress is best effort: never fail a stage for it
            self.path = None
        self._written = time.monotonic()


def read_progress(path: str | os.PathLike[str]) -> ProgressRecord | None:
    """The latest snapshot in ``path``, or None when there is none (yet) or it cannot be read."""
    try:
        return ProgressRecord.from_json(Path(path).read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return None


def format_progress(record: ProgressRecord, stage: str | None = None) -> str:
    """One plain line: ``120/300 steps (40%)  loss 1.234  ETA 1m05s`` (the metrics the stage reported).

    The phase (``desc``) leads the line when it says more than the stage name.
    """
    count = f"{record.done}/{record.total}" if record.total else f"{record.done}"
    pct = f" ({100 * record.done / record.total:.0f}%)" if record.total else ""
    phase = f"{record.desc}: " if record.desc and record.desc != stage else ""
    parts = [f"{phase}{count} {record.unit}s{pct}"]
    parts += [f"{name} {value:.4g}" for name, value in sorted(record.metrics.items())]
    eta = record.eta_seconds()
    if eta is not None:
        parts.append(f"ETA {format_seconds(eta)}")
    return "  ".join(parts)


def format_seconds(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h03m``."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def progress_metrics(logs: dict[str, Any], names: tuple[str, ...] = ("loss", "reward")) -> dict[str, float]:
    """The numbers worth showing from a Trainer log dict: training loss, or GRPO's mean reward."""
    return {k: float(logs[k]) for k in names if isinstance(logs.get(k), int | float)}
