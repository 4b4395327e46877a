"""The study table: every arm over N seeds, pooled with a grouped bootstrap, per condition and source.

Input per (condition, seed): the evaluation's scored prediction rows (``predictions.parquet`` of
that experiment, re-scored by :func:`cogalign_core.metrics.score_row`). Per (condition, arm, scope)
the table holds, for each metric in :data:`STUDY_METRICS`:

- ``pooled``: the metric on all seeds' rows together (with equal n per seed, the mean over seeds)
  and its 95 % grouped-bootstrap interval. A resample draws whole test groups and takes every
  seed's rows of each drawn group, so the interval is that of the seed-averaged figure; pairings
  (an image with its counterfactual, control and probes) stay within their seed;
- ``seeds``: the per-seed values, their mean and standard deviation (the seed spread);
- ``n``: scored prompts per seed (a list; equal unless parsing differs).

Scopes: ``all`` (the test section) and one per source dataset. A condition may name held-out
sources (``held_out``): training never saw them, so their scope is the cross-source result.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from cogalign_core import metrics

Row = Mapping[str, Any]

STUDY_METRICS: tuple[str, ...] = (
    "lesion_sensitivity", "real_normal_specificity", "balanced_accuracy", "counterfactual_specificity",
    "control_consistency", "counterfactual_control_gap", "probe_agreement_blank", "probe_agreement_shuffled",
    "box_iou", "accuracy_location", "accuracy_morphology", "accuracy_microvascular", "accuracy_diagnosis",
)
SECTION = "test"


def _seeded(rows: Sequence[Row], seed: int) -> list[dict[str, Any]]:
    """Rows with parent ids made seed-specific (pairings stay within a seed; groups stay shared)."""
    return [{**r, "parent_sample_id": f"s{seed}:{r['parent_sample_id']}"} for r in rows]


def _spread(values: Sequence[float | None]) -> dict[str, float | None]:
    known = [v for v in values if v is not None]
    if not known:
        return {"mean": None, "sd": None, "min": None, "max": None}
    mean = sum(known) / len(known)
    sd = math.sqrt(sum((v - mean) ** 2 for v in known) / (len(known) - 1)) if len(known) > 1 else 0.0
    return {"mean": round(mean, 6), "sd": round(sd, 6), "min": round(min(known), 6), "max": round(max(known), 6)}


def arm_scope_summary(rows_by_seed: Mapping[int, Sequence[Row]], n_resamples: int, seed: int,
                      names: Sequence[str] = STUDY_METRICS) -> dict[str, dict[str, Any]]:
    """``{metric: {pooled: {value, ci_low, ci_high}, seeds: {...}, n: [...]}}`` for one arm and scope."""
    wanted = {m.name: m for m in metrics.standard_metrics([r for rs in rows_by_seed.values() for r in rs])
              if m.name in names}
    pooled_rows = [r for s, rs in sorted(rows_by_seed.items()) for r in _seeded(rs, s)]
    groups = metrics.group_rows(pooled_rows)
    weights = metrics.bootstrap_weights(len(groups), n_resamples, seed)
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        m = wanted.get(name)
        if m is None:
            continue
        value, _ = metrics.metric_value(m, pooled_rows)
        lo, hi = metrics.grouped_bootstrap_ci(m, groups, weights) if value is not None else (None, None)
        per_seed = {s: metrics.metric_value(m, rs) for s, rs in sorted(rows_by_seed.items())}
        out[name] = {
            "pooled": {"value": _r(value), "ci_low": _r(lo), "ci_high": _r(hi)},
            "seeds": {"values": {str(s): _r(v) for s, (v, _) in per_seed.items()},
                      **_spread([v for v, _ in per_seed.values()])},
            "n": [n for _, n in per_seed.values()],
        }
    return out


def _r(v: float | None) -> float | None:
    return None if v is None else round(float(v), 6)


def study_table(rows: Mapping[str, Mapping[int, Sequence[Row]]], held_out: Mapping[str, Sequence[str]],
                arms: Sequence[str], n_resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The whole table.

    Args:
        rows: ``{condition: {seed: scored prediction rows of every arm}}`` (rows carry ``model``,
            ``section``, ``dataset``, ``group_key``, ``parent_sample_id`` and the scored fields).
        held_out: ``{condition: source datasets no arm trained on}`` (empty for the standard one).
        arms: model stages in display order.
    Returns:
        ``{"conditions": {condition: {"held_out": [...], "seeds": [...], "arms": {arm: {scope: summary}}}},
        "metrics": [...], "section": "test"}`` where scope is ``all`` or a dataset name.
    """
    out: dict[str, Any] = {"section": SECTION, "metrics": list(STUDY_METRICS), "conditions": {}}
    for condition, by_seed in rows.items():
        test = {s: [r for r in rs if r["section"] == SECTION] for s, rs in by_seed.items()}
        sources = sorted({r["dataset"] for rs in test.values() for r in rs})
        cond: dict[str, Any] = {"held_out": list(held_out.get(condition, ())), "seeds": sorted(by_seed),
                                "arms": {}}
        for arm in arms:
            per_arm = {s: [r for r in rs if r["model"] == arm] for s, rs in test.items()}
            if not any(per_arm.values()):
                continue
            scopes = {"all": arm_scope_summary(per_arm, n_resamples, seed)}
            for ds in sources:
                scopes[ds] = arm_scope_summary({s: [r for r in rs if r["dataset"] == ds] for s, rs in per_arm.items()},
                                               n_resamples, seed)
            cond["arms"][arm] = scopes
        out["conditions"][condition] = cond
    return out


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


def render_markdown(table: Mapping[str, Any], title: str = "CogAlign study") -> str:
    """Markdown: per condition and scope, one row per arm, one column per metric.

    Each cell: pooled value [95 % CI] and, below, the seed mean ± sd.
    """
    lines = [f"# {title}", "",
             "Cells: pooled value over seeds [95 % grouped-bootstrap CI]; then seed mean ± sd (n per seed). "
             f"Section: {table['section']}.", ""]
    names = list(table["metrics"])
    for condition, cond in table["conditions"].items():
        held = cond["held_out"]
        lines += [f"## Condition `{condition}`" + (f" (held out of training: {', '.join(held)})" if held else ""),
                  "", f"Seeds: {', '.join(map(str, cond['seeds']))}.", ""]
        scopes = list(dict.fromkeys(sc for arm in cond["arms"].values() for sc in arm))
        for scope in scopes:
            label = "all sources" if scope == "all" else f"source {scope}" + (" (held out)" if scope in held else "")
            lines += [f"### {label}", "", "| arm | " + " | ".join(names) + " |",
                      "| --- |" + " --- |" * len(names)]
            for arm, by_scope in cond["arms"].items():
                cells = []
                for name in names:
                    s = by_scope.get(scope, {}).get(name)
                    if s is None or s["pooled"]["value"] is None:
                        cells.append("n=0")
                        continue
                    p, sd = s["pooled"], s["seeds"]
                    n = sorted(set(s["n"]))
                    cells.append(f"{_fmt(p['value'])} [{_fmt(p['ci_low'])}, {_fmt(p['ci_high'])}]<br>"
                                 f"{_fmt(sd['mean'])} ± {_fmt(sd['sd'])} (n={'/'.join(map(str, n))})")
                lines.append(f"| {arm} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines) + "\n"
