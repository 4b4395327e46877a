"""Compare two runs' evaluation metrics: deltas with intervals, and which are outside the noise.

A difference is called *outside the noise* when the two runs' 95 % bootstrap intervals do not
overlap — conservative (non-overlap implies a significant difference, not the converse), which
is the honest reading for the small test sets this pipeline often has.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cogalign_core.contract import METRICS as METRICS_PATH


@dataclass(frozen=True)
class MetricDelta:
    """One metric in both runs."""

    key: str
    old: float | None
    new: float | None
    old_ci: tuple[float | None, float | None]
    new_ci: tuple[float | None, float | None]

    @property
    def delta(self) -> float | None:
        return None if self.old is None or self.new is None else self.new - self.old

    @property
    def outside_noise(self) -> bool:
        (ol, oh), (nl, nh) = self.old_ci, self.new_ci
        if None in (ol, oh, nl, nh) or self.delta is None:
            return False
        return bool(nl > oh or nh < ol)  # type: ignore[operator]


def flatten_figures(metrics: dict[str, Any], prefix: str = "") -> dict[str, dict[str, Any]]:
    """Every ``{value, ci_low, ci_high, ...}`` leaf of a nested metrics dict, keyed by dotted path."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in metrics.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and "value" in value:
            out[path] = value
        elif isinstance(value, dict):
            out.update(flatten_figures(value, path))
    return out


def compare_metrics(old: dict[str, Any], new: dict[str, Any]) -> list[MetricDelta]:
    """Pair up the figures of two metrics documents (union of keys, sorted)."""
    a, b = flatten_figures(old), flatten_figures(new)
    rows = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key, {}), b.get(key, {})
        rows.append(MetricDelta(key, x.get("value"), y.get("value"), (x.get("ci_low"), x.get("ci_high")),
                                (y.get("ci_low"), y.get("ci_high"))))
    return rows


def read_metrics_at(workspace: str, revision: str, path: str = METRICS_PATH) -> dict[str, Any]:
    """The metrics document of a workspace revision (from git, or DVC's cache for cached outputs)."""
    import json

    import dvc.api

    return json.loads(dvc.api.read(path, repo=workspace, rev=revision))
