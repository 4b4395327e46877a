"""Rewards, table-driven on real completion strings: every known hack scores below the honest answer."""

from __future__ import annotations

import math

import pytest

from cogalign_core import answer_format, rewards

POLYP = {"location": "colon, segment unknown", "morphology": "single small lesion",
         "microvascular": "not assessable", "diagnosis": "polyp"}
NORMAL = {"location": "cecum", "morphology": "no lesion", "microvascular": "not assessable", "diagnosis": "normal"}
CF_NORMAL = {"location": "colon, segment unknown", "morphology": "no lesion", "microvascular": "not assessable",
             "diagnosis": "normal"}
GOLD_BOX = [400, 300, 600, 500]


def render(labels: dict[str, str], box: tuple[int, int, int, int] | None) -> str:
    return answer_format.render_answer(labels, box, grounding=True)


HONEST_POLYP = render(POLYP, (410, 310, 600, 490))
HONEST_NORMAL = render(NORMAL, None)
HONEST_CF = render(CF_NORMAL, None)


def lines(text: str) -> list[str]:
    return text.split("\n")


# (case, gold labels, gold boxes, completion)
HACKS: list[tuple[str, dict[str, str], list[list[int]], str]] = [
    ("wrong order", POLYP, [GOLD_BOX], "\n".join([lines(HONEST_POLYP)[i] for i in (1, 0, 2, 3, 4)])),
    ("missing tag", POLYP, [GOLD_BOX], "\n".join(lines(HONEST_POLYP)[:2] + lines(HONEST_POLYP)[3:])),
    ("empty tag", POLYP, [GOLD_BOX], HONEST_POLYP.replace("<location>colon, segment unknown</location>",
                                                          "<location> </location>")),
    ("duplicated tag", POLYP, [GOLD_BOX], HONEST_POLYP.replace(
        "</diagnosis>", "</diagnosis>\n<diagnosis>normal</diagnosis>")),
    ("prose around tags", POLYP, [GOLD_BOX], "Sure! Here is my answer:\n" + HONEST_POLYP + "\nHope this helps."),
    ("every level not assessable", POLYP, [GOLD_BOX], render(
        {"location": "not assessable", "morphology": "not assessable", "microvascular": "not assessable",
         "diagnosis": "polyp"}, (410, 310, 600, 490))),
    ("several terms in one tag", POLYP, [GOLD_BOX], HONEST_POLYP.replace(
        "<morphology>single small lesion</morphology>",
        "<morphology>single small lesion, single medium lesion, multiple lesions</morphology>")),
    ("wrong level", POLYP, [GOLD_BOX], HONEST_POLYP.replace("<location>colon, segment unknown</location>",
                                                            "<location>stomach</location>")),
    ("counterfactual answered polyp", CF_NORMAL, [], render(POLYP, (410, 310, 600, 490))),
    ("control answered normal", POLYP, [GOLD_BOX], render(CF_NORMAL, None)),
    ("full-frame box", POLYP, [GOLD_BOX], render(POLYP, (0, 0, 1000, 1000))),
    ("box on a normal", NORMAL, [], render(NORMAL, (400, 300, 600, 500))),
    ("malformed box", POLYP, [GOLD_BOX], HONEST_POLYP.replace("410,310,600,490", "410;310;600")),
    ("inverted box", POLYP, [GOLD_BOX], HONEST_POLYP.replace("410,310,600,490", "600,490,410,310")),
    ("far-away box", POLYP, [GOLD_BOX], render(POLYP, (0, 0, 100, 100))),
    ("empty completion", POLYP, [GOLD_BOX], ""),
    ("unclosed tag", POLYP, [GOLD_BOX], HONEST_POLYP.replace("</location>", "")),
    ("unknown tag", POLYP, [GOLD_BOX], HONEST_POLYP + "\n<confidence>high</confidence>"),
    ("lesion described, diagnosis normal", POLYP, [GOLD_BOX], HONEST_POLYP.replace(
        "<diagnosis>polyp</diagnosis>", "<diagnosis>normal</diagnosis>")),
]

HONEST: dict[str, str] = {"POLYP": HONEST_POLYP, "NORMAL": HONEST_NORMAL, "CF": HONEST_CF}


def score(completion: str, labels: dict[str, str], boxes: list[list[int]], chat: bool = False) -> dict[str, float]:
    c: object = [{"role": "assistant", "content": completion}] if chat else completion
    cols = {**{k: [v] for k, v in labels.items()}, "gold_boxes": [boxes], "grounding": [True]}
    out = {}
    for name, fn in rewards.REWARDS.items():
        v = fn([c], **cols)[0]
        out[name] = float("nan") if v is None else v
    return out


def total(s: dict[str, float]) -> float:
    return sum(0.0 if math.isnan(v) else v for v in s.values())


def honest_for(labels: dict[str, str]) -> str:
    if labels is POLYP:
        return HONEST_POLYP
    return HONEST_NORMAL if labels is NORMAL else HONEST_CF


@pytest.mark.parametrize(("labels", "boxes", "text"), [(POLYP, [GOLD_BOX], HONEST_POLYP), (NORMAL, [], HONEST_NORMAL),
                                                       (CF_NORMAL, [], HONEST_CF)])
def test_honest_answer_scores_full_marks(labels: dict[str, str], boxes: list[list[int]], text: str) -> None:
    s = score(text, labels, boxes)
    assert s["format"] == 1.0 and s["cognition"] == 1.0 and s["diagnosis"] == 1.0
    assert s["grounding"] == (1.0 if not boxes else pytest.approx(rewards.box_iou((410, 310, 600, 490), GOLD_BOX)))
    assert s["grounding"] > 0.8


@pytest.mark.parametrize(("case", "labels", "boxes", "text"), HACKS, ids=[h[0] for h in HACKS])
def test_every_hack_scores_below_the_honest_answer(case: str, labels: dict[str, str], boxes: list[list[int]],
                                                   text: str) -> None:
    honest = score(honest_for(labels), labels, boxes)
    hacked = score(text, labels, boxes)
    assert total(hacked) < total(honest), (case, hacked, honest)
    # No single reward is higher for the hack than for the honest answer.
    for name in rewards.REWARDS:
        if not math.isnan(hacked[name]):
            assert hacked[name] <= honest[name] + 1e-9, (case, name, hacked, honest)


def test_targeted_rewards_catch_their_hacks() -> None:
    assert score(HACKS[5][3], POLYP, [GOLD_BOX])["cognition"] == 0.0          # all "not assessable"
    assert score(HACKS[6][3], POLYP, [GOLD_BOX])["cognition"] == 0.5          # several terms: that level earns 0
    assert score(HACKS[8][3], CF_NORMAL, [])["diagnosis"] <= 0.3              # counterfactual answered polyp
    assert score(HACKS[9][3], POLYP, [GOLD_BOX])["diagnosis"] <= 0.3          # control answered normal
    assert score(HACKS[10][3], POLYP, [GOLD_BOX])["grounding"] == 0.0         # full-frame box
    assert score(HACKS[11][3], NORMAL, [])["grounding"] == 0.0                # box on a normal
    assert score(HACKS[12][3], POLYP, [GOLD_BOX])["grounding"] == 0.0         # malformed box
    assert score(HACKS[14][3], POLYP, [GOLD_BOX])["grounding"] == 0.0         # IoU < 0.1
    assert score(HACKS[18][3], POLYP, [GOLD_BOX])["diagnosis"] == 0.0         # wrong and inconsistent
    assert all(v == 0.0 for v in score("", POLYP, [GOLD_BOX]).values())


def test_chat_completions_and_whitespace_tolerance() -> None:
    spaced = HONEST_POLYP.replace("<location>", "<location>  ").replace("\n", "\n\n  ")
    assert score(spaced, POLYP, [GOLD_BOX], chat=True) == score(HONEST_POLYP, POLYP, [GOLD_BOX])


def test_not_applicable_rows_return_none() -> None:
    all_na = {"location": "not assessable", "morphology": "not assessable", "microvascular": "not assessable"}
    assert rewards.cognition_reward([HONEST_POLYP], **{k: [v] for k, v in all_na.items()}) == [None]
    assert rewards.grounding_reward([HONEST_POLYP], gold_boxes=[[GOLD_BOX]], grounding=[False]) == [None]


def test_trl_signature_batches() -> None:
    n = 5
    cols = {**{k: [v] * n for k, v in POLYP.items()}, "gold_boxes": [[GOLD_BOX]] * n, "grounding": [True] * n,
            "trainer_state": None, "prompts": ["p"] * n, "completion_ids": [[1]] * n}
    for fn in rewards.REWARDS.values():
        out = fn([HONEST_POLYP] * n, **cols)
        assert len(out) == n and all(isinstance(v, float) for v in out)
