"""Clinical-cognition rewards for GRPO, pure functions with TRL's reward signature.

Each reward is ``fn(completions, **columns) -> list[float | None]``: ``completions`` is a list of
strings or of chat completions (``[{"role": "assistant", "content": str}]``), ``columns`` holds the
dataset's columns as lists of the same length (TRL passes every non-prompt column). ``None`` means
"not applicable to this row" (TRL turns it into NaN and leaves it out of that reward's mean).

Columns read (see :mod:`cogalign_core.train.data`):
    ``location``, ``morphology``, ``microvascular``, ``diagnosis``: gold taxonomy terms;
    ``gold_boxes``: list of lesion boxes ``[x1, y1, x2, y2]`` in the 0-1000 canvas frame (empty on normals);
    ``grounding``: whether the prompt asked for a ``<box>``.

Every reward is scored in [0, 1] and designed against a known hack (tests/test_rewards.py):
    format: anything but exactly one known term per tag, in order, with nothing outside scores < 1;
    cognition: a level is skipped only when the *gold* label is "not assessable"; answering "not
        assessable" or several terms earns nothing on that level;
    diagnosis: the label ("normal" on counterfactual normals) plus consistency of the described
        lesion with the diagnosis; "not assessable" morphology is never consistent for free;
    grounding: IoU with the gold box; "none" is right only on normals; near-full-frame boxes and
        IoU < 0.1 score 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from cogalign_core import answer_format, taxonomy

Completion = str | Sequence[dict[str, Any]]
RewardFn = Callable[..., list[float | None]]

COGNITION_LEVELS: tuple[str, ...] = ("location", "morphology", "microvascular")
# Problems that break the answer's structure: no per-level credit is given on top of them.
STRUCTURAL_PROBLEMS: tuple[str, ...] = ("order", "duplicate:", "unclosed", "outside_text", "unknown_tag:")
FORMAT_PARTIAL_MAX = 0.5
FORMAT_PENALTY_PER_PROBLEM = 0.1
DIAGNOSIS_MATCH_WEIGHT = 0.7
DIAGNOSIS_CONSISTENCY_WEIGHT = 0.3
FULL_FRAME_AREA_FRACTION = 0.8
MIN_IOU = 0.1
NON_LESION_MORPHOLOGY = frozenset({taxonomy.NO_LESION})


def completion_text(completion: Completion) -> str:
    """The assistant text of one completion (plain string or TRL chat completion)."""
    if isinstance(completion, str):
        return completion
    return "".join(str(m.get("content", "")) for m in completion if m.get("role", "assistant") == "assistant")


def _grounding_flags(n: int, kwargs: dict[str, Any]) -> list[bool]:
    flags = kwargs.get("grounding")
    return [bool(f) for f in flags] if flags is not None else [False] * n


def _structurally_broken(parsed: answer_format.ParsedAnswer) -> bool:
    return any(p == s or (s.endswith(":") and p.startswith(s)) for p in parsed.problems for s in STRUCTURAL_PROBLEMS)


def format_reward(completions: Sequence[Completion], **kwargs: Any) -> list[float | None]:
    """1.0 for an exactly well-formed answer; otherwise at most 0.5, minus 0.1 per problem (floor 0)."""
    grounding = _grounding_flags(len(completions), kwargs)
    out: list[float | None] = []
    for completion, g in zip(completions, grounding, strict=True):
        parsed = answer_format.parse_answer(completion_text(completion), grounding=g)
        if parsed.valid:
            out.append(1.0)
        else:
            out.append(max(0.0, FORMAT_PARTIAL_MAX - FORMAT_PENALTY_PER_PROBLEM * len(parsed.problems)))
    return out


def cognition_reward(completions: Sequence[Completion], location: Sequence[str], morphology: Sequence[str],
                     microvascular: Sequence[str], **kwargs: Any) -> list[float | None]:
    """Mean per-level agreement over the levels the gold label can assess (None when it can assess none).

    A level counts only with exactly one known term equal to the gold term; a structurally broken
    answer (wrong order, duplicate, prose outside tags, unclosed) earns 0.
    """
    grounding = _grounding_flags(len(completions), kwargs)
    golds = {"location": location, "morphology": morphology, "microvascular": microvascular}
    out: list[float | None] = []
    for i, completion in enumerate(completions):
        assessable = [lv for lv in COGNITION_LEVELS if golds[lv][i] != taxonomy.NOT_ASSESSABLE]
        if not assessable:
            out.append(None)
            continue
        parsed = answer_format.parse_answer(completion_text(completion), grounding=grounding[i])
        if _structurally_broken(parsed):
            out.append(0.0)
            continue
        hits = sum(parsed.term(lv) == golds[lv][i] for lv in assessable)
        out.append(hits / len(assessable))
    return out


def _describes_lesion(morphology: str | None) -> bool | None:
    """True/False when the morphology term commits to lesion/no lesion; None when it does not commit."""
    if morphology is None or morphology == taxonomy.NOT_ASSESSABLE:
        return None
    return morphology not in NON_LESION_MORPHOLOGY


def diagnosis_reward(completions: Sequence[Completion], diagnosis: Sequence[str], **kwargs: Any
                     ) -> list[float | None]:
    """0.7 x (diagnosis equals the label) + 0.3 x diagnostic consistency; 0 for a broken answer.

    Consistency: the predicted morphology commits to a lesion exactly when the predicted diagnosis
    is not normal, and (when a box is asked for) a box is given exactly when it is not normal.
    """
    grounding = _grounding_flags(len(completions), kwargs)
    out: list[float | None] = []
    for i, completion in enumerate(completions):
        parsed = answer_format.parse_answer(completion_text(completion), grounding=grounding[i])
        pred = parsed.term("diagnosis")
        if pred is None or _structurally_broken(parsed):
            out.append(0.0)
            continue
        lesion = taxonomy.is_lesion_diagnosis(pred)
        consistent = _describes_lesion(parsed.term("morphology")) == lesion
        if grounding[i]:
            box_ok = parsed.box_given and "bad_box" not in parsed.problems
            consistent = consistent and box_ok and ((parsed.box is not None) == lesion)
        score = DIAGNOSIS_MATCH_WEIGHT * (pred == diagnosis[i]) + DIAGNOSIS_CONSISTENCY_WEIGHT * consistent
        out.append(float(score))
    return out


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two ``(x1, y1, x2, y2)`` boxes in the same frame (exclusive max)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def grounding_reward(completions: Sequence[Completion], gold_boxes: Sequence[Sequence[Sequence[int]] | None],
                     **kwargs: Any) -> list[float | None]:
    """Box quality when a box was asked for (None otherwise), in [0, 1].

    Normal (no gold box): ``none`` scores 1, any box 0. Lesion: best IoU over the gold boxes, 0 for
    ``none``, a missing or malformed box, a box covering >= 80 % of the canvas, or IoU < 0.1.
    """
    grounding = _grounding_flags(len(completions), kwargs)
    full = float(answer_format.BOX_SCALE) ** 2
    out: list[float | None] = []
    for i, completion in enumerate(completions):
        if not grounding[i]:
            out.append(None)
            continue
        parsed = answer_format.parse_answer(completion_text(completion), grounding=True)
        golds = list(gold_boxes[i] or [])
        broken_box = "bad_box" in parsed.problems or f"duplicate:{answer_format.BOX_TAG}" in parsed.problems
        if not parsed.box_given or broken_box:
            out.append(0.0)
            continue
        if not golds:
            out.append(1.0 if parsed.box is None else 0.0)
            continue
        box = parsed.box
        if box is None or (box[2] - box[0]) * (box[3] - box[1]) >= FULL_FRAME_AREA_FRACTION * full:
            out.append(0.0)
            continue
        iou = max(box_iou(box, g) for g in golds)
        out.append(iou if iou >= MIN_IOU else 0.0)
    return out


REWARDS: dict[str, RewardFn] = {
    "format": format_reward,
    "cognition": cognition_reward,
    "diagnosis": diagnosis_reward,
    "grounding": grounding_reward,
}
"""Reward functions by the names recipes use for their weights."""
