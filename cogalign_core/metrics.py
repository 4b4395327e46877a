"""Evaluation metrics: pure functions over prediction rows, grouped bootstrap, trivial baselines.

A *prediction row* is a dict describing one prompt put to one model (see
:data:`cogalign_core.evaluate.PREDICTIONS` for the stored schema). The keys this module reads:

- ``model`` (str), ``section`` (``test`` | ``external_test``), ``condition`` (one of
  :data:`CONDITIONS`), ``dataset`` (source dataset id, for the per-source breakdown);
- ``parent_sample_id``: the real test sample the prompt belongs to (itself for real images; the
  lesion image a counterfactual / control was derived from; the sample whose question a probe asks);
- ``group_key``: the bootstrap resampling unit (the parent's sequence / near-duplicate group), so a
  real image, its counterfactual, its control and its probes always stay together;
- ``grounding`` (bool): whether the prompt asked for a ``<box>``;
- ``completion`` (str): the raw model output;
- ``gold_<level>`` (str | None) for each level of :data:`taxonomy.LEVELS`; ``None`` = no gold
  (probes), ``"not assessable"`` = the level cannot be judged on this image;
- ``gold_boxes``: list of ``(x1, y1, x2, y2)`` int boxes in the 0-1000 canvas frame, or ``None``.

:func:`score_row` parses the completion (only with :func:`answer_format.parse_answer`) and adds the
parsed fields and per-level correctness; every metric reads those. A metric is defined by additive
per-group sufficient statistics plus a finaliser, so the grouped bootstrap is one matrix product
(resampled group counts x per-group statistics) instead of recomputing Python loops per resample.

Over 400 lines on purpose: every metric with its two baselines and the grouped bootstrap in one module, so the
report, ``cogalign compare`` and the promotion gate score rows in exactly the same way.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cogalign_core import answer_format, taxonomy
from cogalign_core.canvas import union_box
from cogalign_core.rewards import box_iou

Row = Mapping[str, Any]

LESION = "lesion"
NORMAL = "normal"
COUNTERFACTUAL = "counterfactual_normal"
CONTROL = "control"
BOTH = "both"
BLANK = "blank"
SHUFFLED = "shuffled"
CONDITIONS: tuple[str, ...] = (LESION, NORMAL, COUNTERFACTUAL, CONTROL, BOTH, BLANK, SHUFFLED)
REAL_CONDITIONS: tuple[str, ...] = (LESION, NORMAL)
PROBE_CONDITIONS: tuple[str, ...] = (BLANK, SHUFFLED)

UNPARSED = "<unparsed>"
"""Stand-in predicted label (confusion matrices, macro-F1) when a level's term could not be parsed."""


# --------------------------------------------------------------------------------------------
# Per-row scoring
# --------------------------------------------------------------------------------------------

def score_row(row: Row) -> dict[str, Any]:
    """Parse ``row["completion"]`` and return a copy with parsed fields and correctness added.

    Added keys: ``format_valid`` (bool), ``problems`` (list[str]), ``pred_<level>`` (known term or
    ``None``), ``pred_box`` (canvas-frame tuple or ``None``), ``box_given`` (bool),
    ``correct_<level>`` (``None`` where the gold is missing or ``not assessable``, else whether the
    parsed term equals the gold; an unparseable term is wrong), ``box_iou`` (best IoU of the
    predicted box against each gold box and their union box, ``0.0`` when no/invalid box was predicted; ``None`` when
    the prompt did not ask for a box or there is no gold box).
    """
    grounding = bool(row.get("grounding", False))
    parsed = answer_format.parse_answer(str(row.get("completion") or ""), grounding=grounding)
    out = dict(row)
    out["format_valid"] = parsed.valid
    out["problems"] = list(parsed.problems)
    for level in taxonomy.LEVELS:
        pred = parsed.term(level)
        gold = row.get(f"gold_{level}")
        out[f"pred_{level}"] = pred
        out[f"correct_{level}"] = None if gold is None or gold == taxonomy.NOT_ASSESSABLE else pred == gold
    out["box_given"] = parsed.box_given
    out["pred_box"] = parsed.box
    gold_boxes = [tuple(g) for g in row.get("gold_boxes") or []]
    if grounding and gold_boxes:
        # Training targets the union box of all lesions; a box around any single lesion is also fair.
        union = union_box(gold_boxes)
        box = parsed.box
        out["box_iou"] = max(box_iou(box, g) for g in [*gold_boxes, union]) if box else 0.0
    else:
        out["box_iou"] = None
    return out


def substitute_answer(rows: Iterable[Row], labels: Mapping[str, str]) -> list[dict[str, Any]]:
    """Rows re-scored as if every completion had been the fixed answer ``labels`` (no box).

    This is how baselines are scored: an image-blind predictor run through the very same metric
    code as the model, so paired and probe metrics get their trivial values too.
    """
    out = []
    for row in rows:
        text = answer_format.render_answer(dict(labels), None, grounding=bool(row.get("grounding", False)))
        out.append(score_row({**row, "completion": text}))
    return out


def majority_answer(gold_rows: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """Most frequent term per level among ``gold_rows`` (keys = level names); ties -> alphabetical.

    Levels with no term at all fall back to ``not assessable`` (location, morphology,
    microvascular) or ``normal`` (diagnosis), so the answer always renders.
    """
    counts: dict[str, dict[str, int]] = {level: defaultdict(int) for level in taxonomy.LEVELS}
    for r in gold_rows:
        for level in taxonomy.LEVELS:
            term = r.get(level)
            if term is not None:
                counts[level][term] += 1
    out = {}
    for level in taxonomy.LEVELS:
        c = counts[level]
        fallback = taxonomy.NORMAL if level == "diagnosis" else taxonomy.NOT_ASSESSABLE
        out[level] = min(c, key=lambda t, c=c: (-c[t], t)) if c else fallback
    return out


# --------------------------------------------------------------------------------------------
# Metric definitions (additive per-group statistics + finaliser)
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Metric:
    """One metric: ``stats(rows)`` -> additive statistics vector, ``finish(vector)`` -> value.

    ``stats`` is applied to the rows of one resampling group (or to all rows); sums of group
    vectors are the statistics of the union, which is what makes the grouped bootstrap exact.
    ``finish`` returns ``(value, n)``; ``value`` is ``None`` when ``n == 0`` (nothing scorable).
    """

    name: str
    description: str
    stats: Callable[[Sequence[Row]], np.ndarray]
    finish: Callable[[np.ndarray], tuple[float | None, int]]


def _ratio_finish(v: np.ndarray) -> tuple[float | None, int]:
    n = round(float(v[1]))
    return (float(v[0] / v[1]) if n > 0 else None), n


def _ratio(name: str, description: str, select: Callable[[Row], bool],
           success: Callable[[Row], bool]) -> Metric:
    def stats(rows: Sequence[Row]) -> np.ndarray:
        chosen = [r for r in rows if select(r)]
        return np.array([sum(1 for r in chosen if success(r)), len(chosen)], dtype=np.float64)
    return Metric(name, description, stats, _ratio_finish)


def _lesion_call(row: Row) -> bool | None:
    """Predicted lesion (True), predicted normal (False), or unparseable diagnosis (None)."""
    d = row.get("pred_diagnosis")
    return None if d is None else taxonomy.is_lesion_diagnosis(d)


def format_validity() -> Metric:
    """Share of all prompts (every condition) answered in the exact tag format."""
    return _ratio("format_validity", "share of all prompts answered in the exact format",
                  lambda r: True, lambda r: bool(r["format_valid"]))


def level_accuracy(level: str) -> Metric:
    """Accuracy of ``level`` on real test images, only where that level's gold is assessable."""
    return _ratio(f"accuracy_{level}", f"{level} accuracy on real images where the gold {level} is assessable",
                  lambda r: r["condition"] in REAL_CONDITIONS and r.get(f"correct_{level}") is not None,
                  lambda r: bool(r[f"correct_{level}"]))


def lesion_sensitivity() -> Metric:
    """Share of real lesion images whose predicted diagnosis is a lesion (unparseable = missed)."""
    return _ratio("lesion_sensitivity", "real lesion images called a lesion",
                  lambda r: r["condition"] == LESION, lambda r: _lesion_call(r) is True)


def real_normal_specificity() -> Metric:
    """Share of real normal images called ``normal``. Never pooled with counterfactual specificity."""
    return _ratio("real_normal_specificity", "real normal images called normal",
                  lambda r: r["condition"] == NORMAL, lambda r: _lesion_call(r) is False)


def balanced_accuracy() -> Metric:
    """Mean of lesion sensitivity and real-normal specificity (both need n > 0); n = both conditions' prompts.

    Both trivial baselines (a constant answer, the majority class) score 0.5 here whatever the class mix.
    """
    def stats(rows: Sequence[Row]) -> np.ndarray:
        lesion = [r for r in rows if r["condition"] == LESION]
        normal = [r for r in rows if r["condition"] == NORMAL]
        return np.array([sum(1 for r in lesion if _lesion_call(r) is True), len(lesion),
                         sum(1 for r in normal if _lesion_call(r) is False), len(normal)], dtype=np.float64)

    def finish(v: np.ndarray) -> tuple[float | None, int]:
        n = round(float(v[1] + v[3]))
        if v[1] <= 0 or v[3] <= 0:
            return None, n
        return float((v[0] / v[1] + v[2] / v[3]) / 2), n
    return Metric("balanced_accuracy", "mean of lesion sensitivity and real-normal specificity", stats, finish)


def counterfactual_specificity() -> Metric:
    """Share of counterfactual normals (lesion inpainted away) called ``normal``."""
    return _ratio("counterfactual_specificity", "counterfactual normals called normal",
                  lambda r: r["condition"] == COUNTERFACTUAL, lambda r: _lesion_call(r) is False)


def both_diagnosis_accuracy() -> Metric:
    """Diagnosis accuracy on ``both`` images (lesion and control region edited), where they exist."""
    return _ratio("both_diagnosis_accuracy", "diagnosis accuracy on 'both' edited images",
                  lambda r: r["condition"] == BOTH and r.get("correct_diagnosis") is not None,
                  lambda r: bool(r["correct_diagnosis"]))


def mean_box_iou() -> Metric:
    """Mean best-match IoU on grounded real lesion prompts with a gold box (no box predicted = 0)."""
    def stats(rows: Sequence[Row]) -> np.ndarray:
        ious = [r["box_iou"] for r in rows if r["condition"] == LESION and r.get("box_iou") is not None]
        return np.array([sum(ious), len(ious)], dtype=np.float64)
    return Metric("box_iou", "mean box IoU on grounded lesion prompts", stats, _ratio_finish)


def _raw_key(row: Row) -> str:
    return "raw:" + " ".join(str(row.get("completion") or "").split())


def _diagnosis_key(row: Row) -> str:
    """The parsed diagnosis term, or the whitespace-normalised raw completion when none parsed.

    So two different unparseable completions count as different answers, and identical ones as equal.
    """
    d = row.get("pred_diagnosis")
    return d if d is not None else _raw_key(row)


def _real_by_parent(rows: Sequence[Row]) -> dict[str, Row]:
    return {r["parent_sample_id"]: r for r in rows if r["condition"] in REAL_CONDITIONS}


def _flip_stats(rows: Sequence[Row], condition: str, flipped: bool) -> np.ndarray:
    """[events, pairs] over (real image, derived image) pairs of the same parent.

    An event is a changed diagnosis answer (``flipped``) or an unchanged one (not ``flipped``),
    compared with :func:`_diagnosis_key` (an unparseable answer is compared by its raw text).
    """
    real = _real_by_parent(rows)
    events = pairs = 0
    for r in rows:
        if r["condition"] != condition or r["parent_sample_id"] not in real:
            continue
        changed = _diagnosis_key(r) != _diagnosis_key(real[r["parent_sample_id"]])
        events += int(changed == flipped)
        pairs += 1
    return np.array([events, pairs], dtype=np.float64)


def counterfactual_flip_rate() -> Metric:
    """Share of (real lesion, its counterfactual normal) pairs whose diagnosis answer changed."""
    return Metric("counterfactual_flip_rate", "pairs whose diagnosis changed when the lesion was removed",
                  lambda rows: _flip_stats(rows, COUNTERFACTUAL, True), _ratio_finish)


def control_consistency() -> Metric:
    """Share of (real lesion, its matched control) pairs whose diagnosis answer did NOT change.

    A control gets the same inpainting away from the lesion: a model that changes its answer on
    it reacts to editing artefacts, not to the lesion.
    """
    return Metric("control_consistency", "pairs whose diagnosis stayed the same under a control edit",
                  lambda rows: _flip_stats(rows, CONTROL, False), _ratio_finish)


def counterfactual_control_gap() -> Metric:
    """Paired gap: mean over parents with both a counterfactual and a control of (cf flip - control flip).

    Per parent, the flip indicator of each kind is averaged over that kind's images; the metric is
    in [-1, 1]; high = the answer follows the lesion, not the edit.
    """
    def stats(rows: Sequence[Row]) -> np.ndarray:
        real = _real_by_parent(rows)
        flips: dict[str, dict[str, list[int]]] = defaultdict(lambda: {COUNTERFACTUAL: [], CONTROL: []})
        for r in rows:
            if r["condition"] in (COUNTERFACTUAL, CONTROL) and r["parent_sample_id"] in real:
                changed = _diagnosis_key(r) != _diagnosis_key(real[r["parent_sample_id"]])
                flips[r["parent_sample_id"]][r["condition"]].append(int(changed))
        diffs = [np.mean(f[COUNTERFACTUAL]) - np.mean(f[CONTROL]) for f in flips.values()
                 if f[COUNTERFACTUAL] and f[CONTROL]]
        return np.array([float(sum(diffs)), len(diffs)], dtype=np.float64)
    return Metric("counterfactual_control_gap", "paired counterfactual flip rate minus control flip rate",
                  stats, _ratio_finish)


def _answer_key(row: Row) -> tuple[str | None, ...]:
    """The four parsed terms; when none parsed at all, the raw completion (see :func:`_diagnosis_key`)."""
    terms = tuple(row.get(f"pred_{level}") for level in taxonomy.LEVELS)
    return terms if any(t is not None for t in terms) else (_raw_key(row),)


def probe_agreement(condition: str) -> Metric:
    """Share of probe prompts (blank / shuffled image) whose answer equals the real image's answer.

    Answers are compared as their four parsed terms, or as raw text when nothing parsed.
    High agreement means the answer does not depend on the image: the model is not looking.
    """
    def stats(rows: Sequence[Row]) -> np.ndarray:
        real = _real_by_parent(rows)
        probes = [r for r in rows if r["condition"] == condition and r["parent_sample_id"] in real]
        same = sum(1 for r in probes if _answer_key(r) == _answer_key(real[r["parent_sample_id"]]))
        return np.array([same, len(probes)], dtype=np.float64)
    return Metric(f"probe_agreement_{condition}", f"{condition}-image answers equal to the real-image answer",
                  stats, _ratio_finish)


def diagnosis_macro_f1(labels: Sequence[str]) -> Metric:
    """Macro-F1 of the diagnosis on real images over ``labels`` (fixed class list).

    Per class c: TP = gold c & pred c; FP = gold not c & pred c; FN = gold c & pred not c. An
    unparseable prediction is a false negative for its gold class and a false positive for no
    class. Classes with no support and no prediction in a (re)sample are left out of the mean.
    """
    index = {c: i for i, c in enumerate(labels)}

    def stats(rows: Sequence[Row]) -> np.ndarray:
        v = np.zeros(1 + 3 * len(labels), dtype=np.float64)
        for r in rows:
            if r["condition"] not in REAL_CONDITIONS or r.get("correct_diagnosis") is None:
                continue
            gold, pred = r["gold_diagnosis"], r.get("pred_diagnosis")
            v[0] += 1
            if pred == gold and gold in index:
                v[1 + 3 * index[gold]] += 1
                continue
            if gold in index:
                v[1 + 3 * index[gold] + 2] += 1
            if pred in index:
                v[1 + 3 * index[pred] + 1] += 1
        return v

    def finish(v: np.ndarray) -> tuple[float | None, int]:
        n = round(float(v[0]))
        tp, fp, fn = v[1::3], v[2::3], v[3::3]
        active = (tp + fp + fn) > 0
        if n == 0 or not active.any():
            return None, n
        f1 = 2 * tp[active] / (2 * tp[active] + fp[active] + fn[active])
        return float(f1.mean()), n

    return Metric("diagnosis_macro_f1", "macro-F1 of the diagnosis on real images", stats, finish)


def diagnosis_labels(rows: Iterable[Row]) -> list[str]:
    """Sorted class list for macro-F1: gold diagnoses of real images plus any predicted terms."""
    labels: set[str] = set()
    for r in rows:
        if r["condition"] in REAL_CONDITIONS and r.get("gold_diagnosis") is not None:
            labels.add(r["gold_diagnosis"])
            if r.get("pred_diagnosis") is not None:
                labels.add(r["pred_diagnosis"])
    return sorted(labels)


def standard_metrics(rows: Sequence[Row]) -> list[Metric]:
    """The metric set reported for every model, section and source, in report order."""
    return [
        format_validity(),
        *(level_accuracy(level) for level in taxonomy.LEVELS),
        diagnosis_macro_f1(diagnosis_labels(rows)),
        lesion_sensitivity(),
        real_normal_specificity(),
        balanced_accuracy(),
        counterfactual_specificity(),
        control_consistency(),
        counterfactual_flip_rate(),
        counterfactual_control_gap(),
        both_diagnosis_accuracy(),
        mean_box_iou(),
        *(probe_agreement(c) for c in PROBE_CONDITIONS),
    ]


# --------------------------------------------------------------------------------------------
# Values, grouped bootstrap, baselines
# --------------------------------------------------------------------------------------------

def metric_value(metric: Metric, rows: Sequence[Row]) -> tuple[float | None, int]:
    """``(value, n)`` of ``metric`` on ``rows`` (scored rows, one model)."""
    return metric.finish(metric.stats(rows))


def group_rows(rows: Sequence[Row]) -> list[list[Row]]:
    """Rows grouped by ``group_key`` (sorted keys, so the grouping is deterministic)."""
    groups: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        groups[str(r["group_key"])].append(r)
    return [groups[k] for k in sorted(groups)]


def bootstrap_weights(n_groups: int, n_resamples: int, seed: int) -> np.ndarray:
    """``(n_resamples, n_groups)`` int matrix: how often each group is drawn in each resample.

    Each resample draws ``n_groups`` groups with replacement (a multinomial count vector).
    """
    rng = np.random.default_rng(seed)
    if n_groups == 0:
        return np.zeros((n_resamples, 0), dtype=np.int64)
    return rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=n_resamples)


def grouped_bootstrap_ci(metric: Metric, groups: Sequence[Sequence[Row]], weights: np.ndarray,
                         level: float = 0.95) -> tuple[float | None, float | None]:
    """Percentile interval of ``metric`` over group resamples given by ``weights``.

    Resamples where the metric is undefined (nothing scorable drawn) are dropped; when none is
    defined the interval is ``(None, None)``.
    """
    if not groups:
        return None, None
    per_group = np.stack([metric.stats(g) for g in groups])      # (G, k)
    sums = weights @ per_group                                    # (B, k)
    values = [v for v in (metric.finish(s)[0] for s in sums) if v is not None]
    if not values:
        return None, None
    alpha = (1 - level) / 2
    lo, hi = np.quantile(np.asarray(values), [alpha, 1 - alpha])
    return float(lo), float(hi)


def _round(v: float | None, digits: int = 6) -> float | None:
    # Rounded so metrics.json bytes do not depend on last-bit float noise across BLAS builds.
    return None if v is None else round(float(v), digits)


def summarise(rows: Sequence[Row], majority: Mapping[str, str], constant: Mapping[str, str],
              n_resamples: int = 1000, seed: int = 0, level: float = 0.95,
              metrics: Sequence[Metric] | None = None) -> dict[str, dict[str, Any]]:
    """Every metric of ``rows`` (scored rows of ONE model) with interval, n and baselines.

    Returns ``{metric_name: {value, ci_low, ci_high, n, constant_baseline, majority_baseline}}``
    where the baselines are the metric's value when every completion is replaced by the fixed
    ``constant`` answer or by the ``majority`` answer (see :func:`substitute_answer`). Values are
    ``None`` where ``n == 0``. The bootstrap resamples whole ``group_key`` groups, seeded by ``seed``.
    """
    const_rows = substitute_answer(rows, constant)
    major_rows = substitute_answer(rows, majority)
    # One class list for the model and both baselines, so a baseline's always-predicted class
    # counts as a (zero-F1) class exactly as the model's own stray predictions do.
    metrics = list(metrics) if metrics is not None else standard_metrics([*rows, *const_rows, *major_rows])
    groups = group_rows(rows)
    weights = bootstrap_weights(len(groups), n_resamples, seed)
    out: dict[str, dict[str, Any]] = {}
    for m in metrics:
        value, n = metric_value(m, rows)
        lo, hi = grouped_bootstrap_ci(m, groups, weights, level) if value is not None else (None, None)
        out[m.name] = {
            "value": _round(value), "ci_low": _round(lo), "ci_high": _round(hi), "n": n,
            "constant_baseline": _round(metric_value(m, const_rows)[0]),
            "majority_baseline": _round(metric_value(m, major_rows)[0]),
        }
    return out


def confusion_pairs(rows: Iterable[Row], level: str = "diagnosis") -> list[tuple[str, str]]:
    """``(actual, predicted)`` pairs of ``level`` on real images with assessable gold, sorted.

    An unparseable prediction appears as :data:`UNPARSED`.
    """
    pairs = [(r[f"gold_{level}"], r.get(f"pred_{level}") or UNPARSED) for r in rows
             if r["condition"] in REAL_CONDITIONS and r.get(f"correct_{level}") is not None]
    return sorted(pairs)
