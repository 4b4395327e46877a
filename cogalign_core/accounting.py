"""Row accounting: every data stage counts what went in, what came out and what it dropped, by reason.

Each such stage's ``summary.json`` carries an ``accounting`` block (:func:`block`): ``unit``, ``in``,
``out`` and ``dropped`` (reason -> count), with ``in = out + sum(dropped)`` checked when written.
:func:`run_report` reads the blocks of the stages a run selected and says, at the end of every
``cogalign run``, one line per stage, plus warnings for a batch that yields no usable sample and for
a stage that drops more than the ``drop_warning_fraction`` execution setting of its input. Nothing is
dropped silently.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cogalign_core import contract

KEY = "accounting"
BY_BATCH = "by_batch"  # annotate's per-batch blocks: usable samples per raw batch


def block(unit: str, n_in: int, n_out: int, dropped: Mapping[str, int]) -> dict[str, Any]:
    """An accounting block; raises when ``n_in != n_out + sum(dropped)`` (a lost row is a bug)."""
    dropped = {str(k): int(v) for k, v in sorted(dropped.items()) if v}
    if n_in != n_out + sum(dropped.values()):
        raise AssertionError(f"accounting broken: {n_in} {unit} in, {n_out} out, dropped {dropped}")
    return {"unit": unit, "in": int(n_in), "out": int(n_out), "dropped": dropped}


@dataclass(frozen=True)
class StageCount:
    """One stage's accounting as read back from its summary."""

    stage: str
    unit: str
    n_in: int
    n_out: int
    dropped: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_block(cls, stage: str, b: Mapping[str, Any]) -> StageCount:
        return cls(stage, str(b["unit"]), int(b["in"]), int(b["out"]), dict(b.get("dropped") or {}))

    @property
    def n_dropped(self) -> int:
        return sum(self.dropped.values())

    def line(self) -> str:
        reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(self.dropped.items(), key=lambda kv: -kv[1]))
        return (f"{self.stage}: {self.n_in} {self.unit} in, {self.n_out} out, {self.n_dropped} dropped"
                + (f" ({reasons})" if reasons else ""))


class UnreadableSummary(ValueError):
    """A stage's ``summary.json`` exists but is not a JSON object (e.g. truncated by hand)."""


def _summary(workspace: Path, stage: str) -> dict[str, Any] | None:
    rel = contract.summary_path(stage)
    path = Path(workspace) / rel if rel else None
    if path is None or not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UnreadableSummary(f"{rel}: {exc}") from None
    if not isinstance(summary, dict):
        raise UnreadableSummary(f"{rel}: not a JSON object")
    return summary


def read_count(workspace: Path, stage: str) -> StageCount | None:
    """The accounting of ``stage`` (e.g. ``masks``, ``ingest_batch@b0002``), or None when it has none."""
    summary = _summary(workspace, stage)
    return StageCount.from_block(stage, summary[KEY]) if summary and KEY in summary else None


@dataclass
class RunReport:
    """What the end of a run says: one line per stage and the warnings."""

    lines: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def batch_warnings(workspace: Path, batches: Iterable[str]) -> list[str]:
    """Batches that yield no usable sample: none annotated (or, before annotation, none ingested)."""
    try:
        annotate = _summary(workspace, "annotate") or {}
    except UnreadableSummary:
        annotate = {}  # run_report already warned
    per_batch = annotate.get(BY_BATCH, {})
    out = []
    for batch in batches:
        if batch in per_batch:
            count = StageCount.from_block(f"annotate[{batch}]", per_batch[batch])
            stage = "annotate"
        else:
            try:
                count = read_count(workspace, f"ingest_batch@{batch}")  # type: ignore[assignment]
            except UnreadableSummary:
                continue
            stage = "ingest"
            if count is None:
                continue
        if count.n_out == 0:
            reasons = ", ".join(f"{r} {n}" for r, n in sorted(count.dropped.items())) or "nothing in it"
            hint = (" Give the batch its labels at ingest (`cogalign ingest SOURCE --diagnosis ...`), a manifest "
                    "with diagnosis/location columns, or clinician labels." if "unmapped_label" in count.dropped
                    else "")
            out.append(f"batch {batch} yields no usable sample: {count.n_in} {count.unit} in, 0 usable after "
                       f"{stage} ({reasons}).{hint}")
    return out


def run_report(workspace: Path, stages: Iterable[str], batches: Iterable[str], drop_warning_fraction: float
               ) -> RunReport:
    """Lines and warnings for ``stages`` (DVC stage names) of a workspace holding ``batches``."""
    report = RunReport()
    for stage in stages:
        try:
            count = read_count(workspace, stage)
        except UnreadableSummary as exc:  # the run itself succeeded: say so rather than crash its report
            report.warnings.append(f"{stage}: no counts, its summary is unreadable ({exc})")
            continue
        if count is None:
            continue
        report.lines.append(count.line())
        if count.n_in and count.n_dropped / count.n_in > drop_warning_fraction:
            report.warnings.append(f"{stage} dropped {count.n_dropped} of {count.n_in} {count.unit} "
                                   f"({count.n_dropped / count.n_in:.0%}, more than {drop_warning_fraction:.0%}): "
                                   + ", ".join(f"{r} {n}" for r, n in sorted(count.dropped.items())))
    report.warnings += batch_warnings(workspace, batches)
    return report
