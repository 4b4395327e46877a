"""The study table (pooling over seeds, seed spread, per-source scopes, held-out sources) on scored
prediction rows whose answers are known, so every pooled figure can be checked by hand.

The end-to-end study (DVC experiments, resume, reload) is ``test_study.py``; this is its arithmetic.
"""

from __future__ import annotations

import math

import pytest

from cogalign_core import answer_format, metrics, taxonomy
from cogalign_core.evaluate import Prompt, prediction_rows
from cogalign_core.study import render_markdown, study_table

NA = taxonomy.NOT_ASSESSABLE
POLYP = {"location": "colon, segment unknown", "morphology": "sessile or flat lesion", "microvascular": NA,
         "diagnosis": "polyp"}
CECUM = {"location": "cecum", "morphology": "no lesion", "microvascular": NA, "diagnosis": "normal"}
LESION_SOURCES = ("kvasir-seg", "cvc-clinicdb")


def _prompts(section: str = "test") -> list[Prompt]:
    """Six lesion images per lesion source and six real normals, each its own group."""
    out = []
    for ds in (*LESION_SOURCES, "kvasir-v2"):
        condition, gold = (metrics.NORMAL, CECUM) if ds == "kvasir-v2" else (metrics.LESION, POLYP)
        for i in range(6):
            sid = f"{ds}-{i}"
            out.append(Prompt(section, condition, sid, sid, f"g-{sid}", ds, f"data/ingest/images/{sid}.jpg", gold))
    return out


def _answers(arm: str, prompts: list[Prompt], answer: dict[str, str] | None) -> list[dict]:
    """``arm``'s scored rows answering ``answer`` to every prompt (None: the gold answer)."""
    completions = [answer_format.render_answer(dict(answer or p.gold)) for p in prompts]
    return prediction_rows(arm, prompts, completions, grounding=False)


@pytest.fixture(scope="module")
def table() -> dict:
    prompts = _prompts()
    # "sft" calls everything a polyp under seed 0 and everything normal under seed 1; "rl" is always right.
    # A validation-section row per seed must not count.
    by_seed = {seed: [*_answers("sft", prompts, POLYP if seed == 0 else CECUM), *_answers("rl", prompts, None),
                      *_answers("sft", _prompts("validation"), POLYP)] for seed in (0, 1)}
    rows = {"standard": by_seed, "cross-kvasir-seg": by_seed}
    held_out = {"standard": (), "cross-kvasir-seg": ("kvasir-seg",)}
    return study_table(rows, held_out, ["sft", "rl"], n_resamples=200, seed=0)


def test_pooled_value_is_the_seed_mean_with_its_spread_and_interval(table: dict) -> None:
    sft = table["conditions"]["standard"]["arms"]["sft"]["all"]
    sens = sft["lesion_sensitivity"]
    assert sens["seeds"]["values"] == {"0": 1.0, "1": 0.0} and sens["n"] == [12, 12]
    assert sens["pooled"]["value"] == 0.5 and sens["seeds"]["mean"] == 0.5
    assert sens["seeds"]["sd"] == pytest.approx(math.sqrt(0.5), abs=1e-6)
    assert (sens["seeds"]["min"], sens["seeds"]["max"]) == (0.0, 1.0)
    # The grouped bootstrap draws whole groups with every seed's rows: each drawn lesion counts once
    # as hit and once as missed, so every resample gives exactly 0.5.
    assert sens["pooled"]["ci_low"] == sens["pooled"]["ci_high"] == 0.5
    spec = sft["real_normal_specificity"]
    assert spec["seeds"]["values"] == {"0": 0.0, "1": 1.0} and spec["n"] == [6, 6]
    assert sft["balanced_accuracy"]["pooled"]["value"] == 0.5

    rl = table["conditions"]["standard"]["arms"]["rl"]["all"]
    assert rl["balanced_accuracy"]["pooled"] == {"value": 1.0, "ci_low": 1.0, "ci_high": 1.0}
    assert rl["balanced_accuracy"]["seeds"]["sd"] == 0.0
    assert set(rl) <= set(table["metrics"])


def test_scopes_per_source_and_held_out_sources(table: dict) -> None:
    standard, cross = table["conditions"]["standard"], table["conditions"]["cross-kvasir-seg"]
    assert standard["held_out"] == [] and cross["held_out"] == ["kvasir-seg"] and cross["seeds"] == [0, 1]
    for cond in (standard, cross):
        assert list(cond["arms"]) == ["sft", "rl"]
        for scopes in cond["arms"].values():
            assert list(scopes) == ["all", "cvc-clinicdb", "kvasir-seg", "kvasir-v2"]
    per_source = cross["arms"]["sft"]["kvasir-seg"]
    assert per_source["lesion_sensitivity"]["n"] == [6, 6]
    assert per_source["real_normal_specificity"]["n"] == [0, 0]  # no normal in a lesion source: no value
    assert per_source["real_normal_specificity"]["pooled"]["value"] is None
    assert cross["arms"]["sft"]["kvasir-v2"]["real_normal_specificity"]["n"] == [6, 6]


def test_markdown_has_one_row_per_arm_and_scope_and_marks_the_held_out_source(table: dict) -> None:
    md = render_markdown(table, "t")
    assert "## Condition `cross-kvasir-seg` (held out of training: kvasir-seg)" in md
    assert "### source kvasir-seg (held out)" in md and "### source cvc-clinicdb (held out)" not in md
    assert md.count("| sft |") == md.count("| rl |") == 2 * 4
    assert "0.500 [0.500, 0.500]<br>0.500 ± 0.707 (n=12)" in md  # sft lesion sensitivity, pooled and spread
    assert "n=0" in md  # a metric with no prompt in scope (counterfactuals) is shown as such, not as 0
