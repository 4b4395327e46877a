"""The promotion gate, table-driven: better, worse, margin, guarded drops, missing values."""

from __future__ import annotations

import pytest

from cogalign_core.config import PipelineParams
from cogalign_core.config.registry import PromotionParams
from cogalign_core.promotion import decide


def _m(**values: float | None) -> dict[str, dict[str, object]]:
    """A metric set as in metrics.json (only ``value`` matters to the gate)."""
    return {k: {"value": v, "ci_low": None, "ci_high": None, "n": 20} for k, v in values.items()}


CHAMPION = _m(accuracy_diagnosis=0.60, lesion_sensitivity=0.80, counterfactual_specificity=0.70,
              real_normal_specificity=0.90)
PARAMS = PromotionParams(primary_metric="accuracy_diagnosis", margin=0.02,
                         guarded={"lesion_sensitivity": 0.05, "counterfactual_specificity": 0.05,
                                  "real_normal_specificity": 0.0})


def _challenger(**changes: float | None) -> dict[str, dict[str, object]]:
    base = {k: v["value"] for k, v in CHAMPION.items()}
    base.update(changes)
    return _m(**base)


@pytest.mark.parametrize(("case", "challenger", "promote", "reason_part"), [
    ("clearly better", _challenger(accuracy_diagnosis=0.70), True, "improved by +0.1000 (0.6000 -> 0.7000"),
    ("better by exactly the margin", _challenger(accuracy_diagnosis=0.62), True, "improved"),
    ("better but inside the margin", _challenger(accuracy_diagnosis=0.61), False, "needs at least"),
    ("equal", _challenger(), False, "needs at least"),
    ("worse", _challenger(accuracy_diagnosis=0.50), False, "changed by -0.1000"),
    ("better, guarded drop within tolerance", _challenger(accuracy_diagnosis=0.70, lesion_sensitivity=0.76),
     True, "improved"),
    ("better, guarded drop beyond tolerance", _challenger(accuracy_diagnosis=0.70, counterfactual_specificity=0.60),
     False, "guarded counterfactual_specificity dropped by 0.1000"),
    ("better, zero-tolerance guard drops a little", _challenger(accuracy_diagnosis=0.70, real_normal_specificity=0.89),
     False, "guarded real_normal_specificity"),
    ("better, guarded metric not measurable", _challenger(accuracy_diagnosis=0.70, lesion_sensitivity=None),
     False, "cannot be measured"),
    ("primary not measurable", _challenger(accuracy_diagnosis=None), False, "not measurable for the challenger"),
])
def test_gate_table(case: str, challenger: dict, promote: bool, reason_part: str) -> None:
    d = decide(CHAMPION, challenger, PARAMS)
    assert d.promote is promote, (case, d.reasons)
    assert any(reason_part in r for r in d.reasons), (case, d.reasons)
    primary = next(c for c in d.checks if c.role == "primary")
    assert primary.metric == "accuracy_diagnosis"
    assert {c.metric for c in d.checks if c.role == "guarded"} == set(PARAMS.guarded)


def test_zero_margin_still_needs_a_strict_improvement() -> None:
    p = PARAMS.model_copy(update={"margin": 0.0})
    assert not decide(CHAMPION, _challenger(), p).promote
    assert decide(CHAMPION, _challenger(accuracy_diagnosis=0.601), p).promote


def test_lower_is_better_flips_the_direction() -> None:
    p = PromotionParams(primary_metric="counterfactual_control_gap", margin=0.05, guarded={},
                        lower_is_better=["counterfactual_control_gap"])
    champ = _m(counterfactual_control_gap=0.30)
    assert decide(champ, _m(counterfactual_control_gap=0.20), p).promote
    d = decide(champ, _m(counterfactual_control_gap=0.40), p)
    assert not d.promote and d.checks[0].delta == pytest.approx(-0.10)


def test_first_champion_and_guard_the_champion_never_had() -> None:
    d = decide(None, _challenger(), PARAMS)
    assert d.promote and "first champion" in d.reasons[0]
    assert not decide(None, _challenger(accuracy_diagnosis=None), PARAMS).promote
    champ = {k: v for k, v in CHAMPION.items() if k != "counterfactual_specificity"}
    d = decide(champ, _challenger(accuracy_diagnosis=0.70, counterfactual_specificity=0.0), PARAMS)
    assert d.promote
    note = next(c.note for c in d.checks if c.metric == "counterfactual_specificity")
    assert "not judged" in note


def test_decision_serialises_and_params_validate() -> None:
    import json

    d = decide(CHAMPION, _challenger(accuracy_diagnosis=0.70), PARAMS)
    assert json.loads(json.dumps(d.to_dict()))["promote"] is True
    with pytest.raises(ValueError, match="not a model stage"):
        PromotionParams(candidate="gpt")
    with pytest.raises(ValueError, match=">= 0"):
        PromotionParams(guarded={"lesion_sensitivity": -0.1})
    # The section sits in params.yaml under `registry`, with help texts on every field.
    reg = PipelineParams.model_fields["registry"]
    assert reg.description
    assert all(f.description for f in PromotionParams.model_fields.values())
