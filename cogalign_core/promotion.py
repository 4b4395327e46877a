"""Promotion gate: does a challenger model replace the champion? A pure function of two metric sets.

Inputs are metric dicts as in ``metrics.json`` (``{metric: {"value": float | None, "ci_low": ...,
"n": int, ...}}``), both computed on the same prompts. The rule:

1. no champion -> the challenger is promoted as the first champion when its primary metric is
   measurable;
2. otherwise the primary metric must improve by at least ``margin`` (strictly, when the margin is 0);
3. and no guarded metric may get worse by more than its tolerance. A guarded metric the champion
   did not have (``value`` None) is not judged; one the challenger cannot measure while the champion
   could blocks promotion (the guard cannot be verified).

Every comparison is returned as a :class:`Check` so the decision record shows exactly why.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from cogalign_core.config.registry import PromotionParams

MetricSet = Mapping[str, Mapping[str, Any]]


@dataclass(frozen=True)
class Check:
    """One metric comparison. ``delta`` is challenger - champion, sign-flipped for lower-is-better
    metrics (so positive always means better); ``required`` is the smallest acceptable ``delta``."""

    metric: str
    role: str                      # primary | guarded
    champion: float | None
    challenger: float | None
    delta: float | None
    required: float
    passed: bool
    note: str = ""


@dataclass(frozen=True)
class Decision:
    """Outcome of the gate: ``promote`` and the reasons, with every check."""

    promote: bool
    reasons: list[str]
    checks: list[Check] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"promote": self.promote, "reasons": list(self.reasons), "checks": [asdict(c) for c in self.checks]}


def _value(metrics: MetricSet | None, name: str) -> float | None:
    if metrics is None or name not in metrics:
        return None
    v = metrics[name].get("value")
    return None if v is None else float(v)


def _signed_delta(name: str, champion: float, challenger: float, params: PromotionParams) -> float:
    d = challenger - champion
    return -d if name in params.lower_is_better else d


# Comparisons carry float noise from JSON round trips (0.7 - 0.69 != 0.01 exactly).
_EPS = 1e-9


def decide(champion: MetricSet | None, challenger: MetricSet, params: PromotionParams) -> Decision:
    """Apply the promotion rule (module docstring) to ``challenger`` vs ``champion`` (None = no champion)."""
    primary = params.primary_metric
    ch_primary = _value(challenger, primary)
    if champion is None:
        if ch_primary is None:
            return Decision(False, [f"no champion yet, but the challenger's {primary} is not measurable"])
        return Decision(True, ["no champion yet: the challenger becomes the first champion"],
                        [Check(primary, "primary", None, ch_primary, None, 0.0, True, "first champion")])

    checks: list[Check] = []
    reasons: list[str] = []
    cp_primary = _value(champion, primary)
    if ch_primary is None or cp_primary is None:
        who = "challenger" if ch_primary is None else "champion"
        checks.append(Check(primary, "primary", cp_primary, ch_primary, None, params.margin, False,
                            f"{who} value missing"))
        reasons.append(f"{primary} is not measurable for the {who}")
    else:
        delta = _signed_delta(primary, cp_primary, ch_primary, params)
        ok = delta >= params.margin - _EPS if params.margin > 0 else delta > _EPS
        checks.append(Check(primary, "primary", cp_primary, ch_primary, delta, params.margin, ok))
        if not ok:
            reasons.append(f"{primary} changed by {delta:+.4f}; promotion needs at least "
                           f"{'+' if params.margin else '>'}{params.margin:.4f}")

    for name, tolerance in sorted(params.guarded.items()):
        old, new = _value(champion, name), _value(challenger, name)
        if old is None:
            checks.append(Check(name, "guarded", old, new, None, -tolerance, True, "champion has no value: not judged"))
            continue
        if new is None:
            checks.append(Check(name, "guarded", old, new, None, -tolerance, False, "challenger value missing"))
            reasons.append(f"guarded {name} cannot be measured for the challenger")
            continue
        delta = _signed_delta(name, old, new, params)
        ok = delta >= -tolerance - _EPS
        checks.append(Check(name, "guarded", old, new, delta, -tolerance, ok))
        if not ok:
            reasons.append(f"guarded {name} dropped by {-delta:.4f} (tolerance {tolerance:.4f})")

    promote = not reasons
    if promote:
        gain = checks[0].delta or 0.0
        reasons = [f"{primary} improved by {gain:+.4f} ({cp_primary:.4f} -> {ch_primary:.4f}; promotion needs "
                   f"{'+' if params.margin else '>'}{params.margin:.4f}) and no guarded metric dropped beyond "
                   "tolerance"]
    return Decision(promote, reasons, checks)
