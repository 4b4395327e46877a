"""Metrics on hand-made prediction tables with answers worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from cogalign_core import metrics
from cogalign_core.answer_format import render_answer

NA = "not assessable"
POLYP = {"location": "colon, segment unknown", "morphology": "single small lesion", "microvascular": NA,
         "diagnosis": "polyp"}
NORMAL = {"location": "cecum", "morphology": "no lesion", "microvascular": NA, "diagnosis": "normal"}
CF_GOLD = {"location": "colon, segment unknown", "morphology": "no lesion", "microvascular": NA,
           "diagnosis": "normal"}
CONSTANT = {"location": NA, "morphology": "no lesion", "microvascular": NA, "diagnosis": "normal"}


def answer(labels: dict[str, str], **change: str) -> str:
    return render_answer({**labels, **change})


def row(condition: str, parent: str, completion: str, gold: dict[str, str] | None, group: str | None = None,
        dataset: str = "kvasir-seg", grounding: bool = False, boxes: list[tuple[int, int, int, int]] | None = None):
    r = {"model": "m", "section": "test", "condition": condition, "parent_sample_id": parent,
         "group_key": group or parent, "dataset": dataset, "grounding": grounding, "completion": completion,
         "gold_boxes": boxes}
    for level in ("location", "morphology", "microvascular", "diagnosis"):
        r[f"gold_{level}"] = None if gold is None else gold[level]
    return metrics.score_row(r)


def value(metric: metrics.Metric, rows):
    return metrics.metric_value(metric, rows)


def test_unparseable_completion_is_invalid_and_wrong_everywhere():
    r = row("lesion", "a", "I think this is a polyp.", POLYP)
    assert r["format_valid"] is False
    assert "missing:diagnosis" in r["problems"]
    assert r["pred_diagnosis"] is None
    assert r["correct_diagnosis"] is False and r["correct_location"] is False
    # microvascular gold is "not assessable": never scored
    assert r["correct_microvascular"] is None
    assert value(metrics.lesion_sensitivity(), [r]) == (0.0, 1)
    assert value(metrics.format_validity(), [r]) == (0.0, 1)


def test_level_accuracy_skips_unassessable_and_reports_never_assessable_as_null():
    rows = [
        row("lesion", "a", answer(POLYP), POLYP),
        row("lesion", "b", answer(POLYP, location="rectum"), POLYP),
        row("normal", "c", answer(NORMAL), NORMAL),
        row("normal", "d", answer(NORMAL, location="pylorus", diagnosis="polyp"), NORMAL),
    ]
    assert value(metrics.level_accuracy("location"), rows) == (0.5, 4)
    assert value(metrics.level_accuracy("diagnosis"), rows) == (0.75, 4)
    # microvascular is "not assessable" on every image: n = 0 and no value, not 0 % or 100 %
    assert value(metrics.level_accuracy("microvascular"), rows) == (None, 0)
    summary = metrics.summarise(rows, majority=POLYP, constant=CONSTANT, n_resamples=50)
    mv = summary["accuracy_microvascular"]
    assert mv["value"] is None and mv["n"] == 0 and mv["ci_low"] is None and mv["ci_high"] is None


def test_missing_levels_count_as_wrong_only_on_their_level():
    text = "<location>cecum</location>\n<morphology>no lesion</morphology>\n<diagnosis>normal</diagnosis>"
    r = row("normal", "a", text, NORMAL)
    assert r["format_valid"] is False and "missing:microvascular" in r["problems"]
    assert r["correct_location"] is True and r["correct_diagnosis"] is True
    assert r["pred_microvascular"] is None


def test_all_wrong_and_sensitivity_specificity_kept_separate():
    rows = [
        row("lesion", "a", answer(POLYP, diagnosis="normal"), POLYP),
        row("lesion", "b", answer(POLYP, diagnosis="normal"), POLYP),
        row("normal", "c", answer(NORMAL, diagnosis="polyp"), NORMAL),
        row("counterfactual_normal", "a", answer(CF_GOLD), CF_GOLD),
    ]
    assert value(metrics.level_accuracy("diagnosis"), rows) == (0.0, 3)
    assert value(metrics.lesion_sensitivity(), rows) == (0.0, 2)
    assert value(metrics.real_normal_specificity(), rows) == (0.0, 1)
    # the counterfactual normal was called normal: its specificity is 1, and is not pooled with real normals
    assert value(metrics.counterfactual_specificity(), rows) == (1.0, 1)
    assert value(metrics.diagnosis_macro_f1(metrics.diagnosis_labels(rows)), rows) == (0.0, 3)


def test_macro_f1_by_hand_with_tie_and_unparsed():
    # gold: polyp, polyp, normal, normal; pred: polyp, normal, normal, <unparsed>
    rows = [
        row("lesion", "a", answer(POLYP), POLYP),
        row("lesion", "b", answer(POLYP, diagnosis="normal"), POLYP),
        row("normal", "c", answer(NORMAL), NORMAL),
        row("normal", "d", "<diagnosis>normal", NORMAL),
    ]
    # polyp: tp1 fp0 fn1 -> 2/3; normal: tp1 fp1 fn1 -> 2/4 = 1/2; macro = 7/12
    v, n = value(metrics.diagnosis_macro_f1(metrics.diagnosis_labels(rows)), rows)
    assert n == 4 and v == pytest.approx(7 / 12)
    assert metrics.confusion_pairs(rows) == [("normal", "<unparsed>"), ("normal", "normal"),
                                             ("polyp", "normal"), ("polyp", "polyp")]


def test_majority_answer_breaks_ties_alphabetically():
    gold = [{"location": "cecum", "morphology": "no lesion", "microvascular": None, "diagnosis": "polyp"},
            {"location": "rectum", "morphology": "no lesion", "microvascular": None, "diagnosis": "normal"}]
    maj = metrics.majority_answer(gold)
    assert maj == {"location": "cecum", "morphology": "no lesion", "microvascular": NA, "diagnosis": "normal"}


def test_paired_flip_control_gap_and_probes():
    rows = [
        # parent a: real says polyp, cf says normal (flip), control says polyp (consistent)
        row("lesion", "a", answer(POLYP), POLYP),
        row("counterfactual_normal", "a", answer(CF_GOLD), CF_GOLD),
        row("control", "a", answer(POLYP), POLYP),
        row("blank", "a", answer(POLYP), None),
        row("shuffled", "a", answer(NORMAL), None),
        # parent b: real says polyp, cf polyp (no flip), control normal (flip)
        row("lesion", "b", answer(POLYP), POLYP),
        row("counterfactual_normal", "b", answer(POLYP), CF_GOLD),
        row("control", "b", answer(CF_GOLD), POLYP),
        row("blank", "b", answer(POLYP), None),
        row("shuffled", "b", answer(POLYP), None),
        # parent c: only a counterfactual (no control): counts for the flip rate, not for the gap;
        # two different unparseable answers are a change of answer
        row("lesion", "c", "garbage", POLYP),
        row("counterfactual_normal", "c", "other garbage", CF_GOLD),
        row("blank", "c", " garbage ", None),
        # parent d: the same unparseable text on both images is no change
        row("lesion", "d", "same", POLYP),
        row("counterfactual_normal", "d", "same", CF_GOLD),
    ]
    assert value(metrics.counterfactual_flip_rate(), rows) == (0.5, 4)
    assert value(metrics.control_consistency(), rows) == (0.5, 2)
    # gap per parent: a: 1 - 0 = 1, b: 0 - 1 = -1 -> mean 0 over 2 parents
    assert value(metrics.counterfactual_control_gap(), rows) == (0.0, 2)
    assert value(metrics.probe_agreement("blank"), rows) == (1.0, 3)
    assert value(metrics.probe_agreement("shuffled"), rows) == (0.5, 2)
    # probes carry no gold: they never enter accuracy
    assert value(metrics.level_accuracy("diagnosis"), rows) == (0.5, 4)
    # a constant answer agrees with itself everywhere and never flips
    const = metrics.summarise(rows, majority=POLYP, constant=CONSTANT, n_resamples=20)
    assert const["probe_agreement_blank"]["constant_baseline"] == 1.0
    assert const["counterfactual_flip_rate"]["constant_baseline"] == 0.0
    assert const["lesion_sensitivity"]["constant_baseline"] == 0.0
    assert const["lesion_sensitivity"]["majority_baseline"] == 1.0
    assert const["counterfactual_specificity"]["constant_baseline"] == 1.0
    assert const["counterfactual_specificity"]["majority_baseline"] == 0.0


def test_box_iou_when_grounded():
    gold = [(100, 100, 300, 300)]
    exact = row("lesion", "a", answer(POLYP) + "\n<box>100,100,300,300</box>", POLYP, grounding=True, boxes=gold)
    half = row("lesion", "b", answer(POLYP) + "\n<box>200,100,300,300</box>", POLYP, grounding=True, boxes=gold)
    nobox = row("lesion", "c", answer(POLYP) + "\n<box>none</box>", POLYP, grounding=True, boxes=gold)
    ungrounded = row("lesion", "d", answer(POLYP), POLYP, boxes=gold)
    assert exact["box_iou"] == 1.0 and half["box_iou"] == 0.5 and nobox["box_iou"] == 0.0
    assert ungrounded["box_iou"] is None
    assert value(metrics.mean_box_iou(), [exact, half, nobox, ungrounded]) == (0.5, 3)


def test_grouped_bootstrap_keeps_groups_whole_and_is_seeded():
    # two groups: g1 all correct (3 rows), g2 all wrong (1 row). Any resample of whole groups
    # gives accuracy in {0, 3/4, 3/5 ... } drawn from {0 + 0, 3/4, 1}: exactly 0, 0.75 or 1.
    rows = [row("lesion", f"a{i}", answer(POLYP), POLYP, group="g1") for i in range(3)]
    rows.append(row("lesion", "b", answer(POLYP, diagnosis="normal"), POLYP, group="g2"))
    m = metrics.level_accuracy("diagnosis")
    groups = metrics.group_rows(rows)
    weights = metrics.bootstrap_weights(len(groups), 400, seed=7)
    assert weights.shape == (400, 2) and (weights.sum(axis=1) == 2).all()
    sums = weights @ np.stack([m.stats(g) for g in groups])
    values = {m.finish(s)[0] for s in sums}
    assert values == {0.0, 0.75, 1.0}
    lo, hi = metrics.grouped_bootstrap_ci(m, groups, weights)
    assert (lo, hi) == (0.0, 1.0)
    again = metrics.grouped_bootstrap_ci(m, groups, metrics.bootstrap_weights(2, 400, seed=7))
    assert again == (lo, hi)


def test_bootstrap_single_group_has_zero_width_interval():
    rows = [row("lesion", "a", answer(POLYP), POLYP, group="g"),
            row("lesion", "b", answer(POLYP, diagnosis="normal"), POLYP, group="g")]
    out = metrics.summarise(rows, majority=POLYP, constant=CONSTANT, n_resamples=100, seed=1)
    d = out["accuracy_diagnosis"]
    assert (d["value"], d["ci_low"], d["ci_high"], d["n"]) == (0.5, 0.5, 0.5, 2)
    assert d["majority_baseline"] == 1.0 and d["constant_baseline"] == 0.0
