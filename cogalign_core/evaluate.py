"""Evaluation stage: every model on every test condition, metrics with intervals, plots and a report.

Conditions per test section (``test``; ``external_test`` is its own section):

- ``lesion`` / ``normal``: the real test images (gold = their annotation);
- ``counterfactual_normal`` / ``control`` / ``both``: the derived images of the chosen real lesion
  images (gold = the counterfactual table's levels), so every derived image has its real parent;
- ``blank``: a uniform grey image under each chosen real image's question (no gold);
- ``shuffled``: another chosen real image of the same section under this image's question (no gold);
  the pairing is a seeded derangement over both classes, so a model that sees the class but nothing
  else agrees at about the class-match rate, a blind one always.

Every image goes through the model's square canvas (:mod:`cogalign_core.canvas`); decoding is
greedy, batched, capped at ``evaluate.max_new_tokens``. Completions are parsed and scored by
:mod:`cogalign_core.metrics` only. Outputs under ``data/evaluate/``: ``predictions.parquet``
(:data:`PREDICTIONS`), ``metrics.json``, ``plots/*.csv``, ``report.html``, ``summary.json``
(counts: in = prompts + skipped), ``provenance.json``, ``model_cards/<model>/README.md`` (each model's
card with these metrics, :mod:`cogalign_core.train.model_card`). Nothing time- or run-dependent is written.

Over 400 lines on purpose: the stage owns the prediction table's schema, prompt selection, the prediction rows and
the report's inputs (plots, gallery); scoring lives in :mod:`metrics`, HTML in :mod:`report`.
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
from PIL import Image

from cogalign_core import accounting, answer_format, cf_coverage, contract, metrics, report, tables, taxonomy
from cogalign_core.canvas import CanvasSpec, box_to_canvas, load_canvas, to_canvas
from cogalign_core.config import PipelineParams
from cogalign_core.io import atomic_write_json, atomic_write_text
from cogalign_core.provenance import write_provenance
from cogalign_core.settings import load_settings
from cogalign_core.train.recipe import ARM_METHODS

STAGE = "evaluate"
OUT_DIR = Path(contract.EVALUATE)
ANNOTATIONS_PATH = Path(contract.ANNOTATIONS)
COUNTERFACTUALS_PATH = Path(contract.COUNTERFACTUALS)
SECTIONS: tuple[str, ...] = ("test", "external_test")
RECIPE_METHOD: dict[str, str] = {"base_model": "sft", **ARM_METHODS}
BLANK_ID = "blank"

CANVAS_BOX = pa.struct([("x1", pa.int32()), ("y1", pa.int32()), ("x2", pa.int32()), ("y2", pa.int32())])
"""A box in the 0-1000 canvas frame of ``answer_format`` (exclusive max)."""

PREDICTIONS = pa.schema(
    [
        ("model", tables.enum()),              # model stage: sft | rl_no_cf | rl | base_model
        ("section", tables.enum()),            # test | external_test
        ("condition", tables.enum()),          # metrics.CONDITIONS
        ("parent_sample_id", pa.string()),     # real test sample the prompt belongs to
        ("sample_id", pa.string()),            # sample shown (derived id, other sample for shuffled, "blank")
        ("group_key", pa.string()),            # bootstrap unit (parent's group)
        ("dataset", tables.enum()),            # parent's source dataset
        ("image_path", pa.string()),           # workspace-relative; null for the blank probe
        ("grounding", pa.bool_()),
        ("prompt", tables.enum()),             # system prompt + question text
        ("completion", pa.string()),           # raw decoded completion (special tokens skipped)
        ("format_valid", pa.bool_()),
        ("problems", pa.list_(pa.string())),   # answer_format problem codes
    ]
    + [(f"gold_{lv}", tables.enum()) for lv in taxonomy.LEVELS]
    + [(f"pred_{lv}", tables.enum()) for lv in taxonomy.LEVELS]
    + [(f"correct_{lv}", pa.bool_()) for lv in taxonomy.LEVELS]     # null = gold missing / not assessable
    + [
        ("gold_boxes", pa.list_(CANVAS_BOX)),  # canvas frame; lesion prompts only
        ("box_given", pa.bool_()),
        ("pred_box", CANVAS_BOX),              # canvas frame; null = none / not given / invalid
        ("box_iou", pa.float64()),             # null = not grounded or no gold box
    ]
)

_CONDITION_ORDER = {c: i for i, c in enumerate(metrics.CONDITIONS)}


@dataclass(frozen=True)
class Prompt:
    """One question put to every model: which image, whose question, what gold.

    ``image_path`` is workspace-relative (``None`` = the blank probe); ``gold`` maps level -> term
    (empty for probes); ``gold_boxes`` are canvas-frame boxes (lesion prompts only).
    """

    section: str
    condition: str
    parent_sample_id: str
    sample_id: str
    group_key: str
    dataset: str
    image_path: str | None
    gold: Mapping[str, str]
    gold_boxes: tuple[tuple[int, int, int, int], ...] = ()


def _order_key(seed: int, sample_id: str) -> str:
    # Seeded, content-independent order: the cap picks the same samples on every rerun.
    return hashlib.sha256(f"{seed}|{sample_id}".encode()).hexdigest()


def _gold(row: Mapping[str, Any]) -> dict[str, str]:
    return {lv: row[lv] for lv in taxonomy.LEVELS if row.get(lv) is not None}


def _canvas_boxes(row: Mapping[str, Any], spec: CanvasSpec) -> tuple[tuple[int, int, int, int], ...]:
    out = []
    for b in row.get("boxes") or []:
        try:
            out.append(box_to_canvas((b["xmin"], b["ymin"], b["xmax"], b["ymax"]), row["width"], row["height"], spec))
        except (ValueError, TypeError):
            continue  # malformed box: the prompt is then simply not scored for IoU
    return tuple(out)


def _by_source_in_turn(rows: Sequence[Mapping[str, Any]],
                       source: Any = lambda r: r["dataset"]) -> list[Mapping[str, Any]]:
    """``rows`` (already in seeded order) reordered to take one row of each source in turn, keeping the
    order within a source: any prefix covers every source as evenly as it can."""
    rank: Counter[str] = Counter()
    keyed = []
    for i, r in enumerate(rows):
        src = str(source(r))
        keyed.append((rank[src], i, r))
        rank[src] += 1
    return [r for _, _, r in sorted(keyed, key=lambda k: (k[0], k[1]))]


def build_prompts(annotations: Sequence[Mapping[str, Any]], counterfactuals: Sequence[Mapping[str, Any]],
                  cap: int | None, seed: int, spec: CanvasSpec) -> tuple[list[Prompt], dict[str, Any]]:
    """All prompts of all test sections, plus counts of what was available, chosen and left out.

    ``cap`` limits each section's conditions to that many samples, taken in turn from each source dataset
    (seeded hash order within a source), so a capped evaluation still scores every source; None takes all.

    Returns ``(prompts, counts)``; prompts are sorted by section, condition, parent, sample.
    """
    prompts: list[Prompt] = []
    counts: dict[str, Any] = {}
    by_id = {r["sample_id"]: r for r in annotations}
    for section in SECTIONS:
        real = sorted((r for r in annotations if r["split"] == section), key=lambda r: _order_key(seed, r["sample_id"]))
        if not real:
            continue
        c: dict[str, Any] = {}
        chosen: list[Mapping[str, Any]] = []
        for cond, rows in ((metrics.LESION, [r for r in real if taxonomy.is_lesion_diagnosis(r["diagnosis"])]),
                           (metrics.NORMAL, [r for r in real if not taxonomy.is_lesion_diagnosis(r["diagnosis"])])):
            picked = _by_source_in_turn(rows)[:cap]
            c[cond] = {"available": len(rows), "chosen": len(picked)}
            chosen += picked
            prompts += [Prompt(section, cond, r["sample_id"], r["sample_id"], r["group_key"], r["dataset"],
                               r["image_path"], _gold(r), _canvas_boxes(r, spec) if cond == metrics.LESION else ())
                        for r in picked]
        lesion_ids = {p.parent_sample_id for p in prompts if p.section == section and p.condition == metrics.LESION}
        derived = [d for d in counterfactuals if d["split"] == section]
        for kind in (metrics.COUNTERFACTUAL, metrics.CONTROL, metrics.BOTH):
            rows = [d for d in derived if d["kind"] == kind]
            excluded = Counter(str(d.get("exclusion_reason") or "unspecified") for d in rows if d.get("excluded"))
            usable = [d for d in rows if not d.get("excluded")]
            orphan = [d for d in usable if d["parent_sample_id"] not in by_id]
            paired = sorted((d for d in usable if d["parent_sample_id"] in lesion_ids),
                            key=lambda d: _order_key(seed, d["sample_id"]))
            picked = _by_source_in_turn(paired, lambda d: by_id[d["parent_sample_id"]]["dataset"])[:cap]
            c[kind] = {"available": len(rows), "excluded": dict(sorted(excluded.items())),
                       "parent_missing": len(orphan), "parent_not_chosen": len(usable) - len(orphan) - len(paired),
                       "chosen": len(picked)}
            for d in picked:
                parent = by_id[d["parent_sample_id"]]
                prompts.append(Prompt(section, kind, parent["sample_id"], d["sample_id"], parent["group_key"],
                                      parent["dataset"], d["image_path"], _gold(d)))
        for r in chosen:
            prompts.append(Prompt(section, metrics.BLANK, r["sample_id"], BLANK_ID, r["group_key"], r["dataset"],
                                  None, {}))
        # Shuffled probe: a derangement of the chosen real images (each gets its successor's picture) in a
        # seeded order over both classes, so the picture shown is another class at about the class-mix rate
        # (successors in the lesions-then-normals order were almost always the same class).
        ring = sorted(chosen, key=lambda r: _order_key(seed + 1, r["sample_id"]))
        if len(ring) >= 2:
            for i, r in enumerate(ring):
                other = ring[(i + 1) % len(ring)]
                prompts.append(Prompt(section, metrics.SHUFFLED, r["sample_id"], other["sample_id"], r["group_key"],
                                      r["dataset"], other["image_path"], {}))
        c[metrics.BLANK] = {"chosen": len(chosen)}
        c[metrics.SHUFFLED] = {"chosen": len(chosen) if len(chosen) >= 2 else 0,
                               "skipped_single_image": 1 if len(chosen) == 1 else 0}
        counts[section] = c
    prompts.sort(key=lambda p: (SECTIONS.index(p.section), _CONDITION_ORDER[p.condition], p.parent_sample_id,
                                p.sample_id))
    return prompts, counts


def load_prompt_images(prompts: Sequence[Prompt], workspace: Path, spec: CanvasSpec, blank_gray: int,
                       blank_side: int) -> tuple[list[Prompt], list[Image.Image], list[dict[str, str]]]:
    """Canvas images for the prompts; unreadable images become skip records with a reason."""
    blank = to_canvas(Image.new("RGB", (blank_side, blank_side), (blank_gray,) * 3), spec)
    kept: list[Prompt] = []
    images: list[Image.Image] = []
    skipped: list[dict[str, str]] = []
    cache: dict[str, Image.Image] = {}
    for p in prompts:
        if p.image_path is None:
            kept.append(p)
            images.append(blank)
            continue
        if p.image_path not in cache:
            try:
                cache[p.image_path] = load_canvas(workspace / p.image_path, spec)
            except (OSError, ValueError) as exc:
                skipped.append({"section": p.section, "condition": p.condition, "sample_id": p.sample_id,
                                "reason": "image_unreadable", "detail": f"{type(exc).__name__}: {exc}"[:200]})
                continue
        kept.append(p)
        images.append(cache[p.image_path])
    return kept, images, skipped


def _box_dict(b: Sequence[int] | None) -> dict[str, int] | None:
    return None if b is None else {"x1": int(b[0]), "y1": int(b[1]), "x2": int(b[2]), "y2": int(b[3])}


def prediction_rows(model_name: str, prompts: Sequence[Prompt], completions: Sequence[str],
                    grounding: bool) -> list[dict[str, Any]]:
    """Scored prediction rows (in-memory form used by :mod:`metrics`: boxes as tuples)."""
    prompt_text = answer_format.system_prompt(grounding) + "\n" + answer_format.QUESTION
    rows = []
    for p, completion in zip(prompts, completions, strict=True):
        row: dict[str, Any] = {
            "model": model_name, "section": p.section, "condition": p.condition,
            "parent_sample_id": p.parent_sample_id, "sample_id": p.sample_id, "group_key": p.group_key,
            "dataset": p.dataset, "image_path": p.image_path, "grounding": grounding, "prompt": prompt_text,
            "completion": completion, "gold_boxes": list(p.gold_boxes) or None,
        }
        row.update({f"gold_{lv}": p.gold.get(lv) for lv in taxonomy.LEVELS})
        rows.append(metrics.score_row(row))
    return rows


def scored_rows(table_rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows read back from ``predictions.parquet``, in :mod:`metrics`' form (boxes as tuples), re-scored."""
    out = []
    for r in table_rows:
        gold = [(b["x1"], b["y1"], b["x2"], b["y2"]) for b in r["gold_boxes"]] if r.get("gold_boxes") else None
        out.append(metrics.score_row({**r, "gold_boxes": gold}))
    return out


def _to_table_row(r: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(r)
    out["gold_boxes"] = [_box_dict(b) for b in r["gold_boxes"]] if r.get("gold_boxes") else None
    out["pred_box"] = _box_dict(r.get("pred_box"))
    return out


def compute_metrics(rows: Sequence[Mapping[str, Any]], models: Sequence[str], majority: Mapping[str, str],
                    constant: Mapping[str, str], n_resamples: int, seed: int) -> dict[str, Any]:
    """``{model: {section: {"all": {metric: stat}, "by_source": {dataset: {metric: stat}}}}}``."""
    out: dict[str, Any] = {}
    for model_name in models:
        out[model_name] = {}
        for section in SECTIONS:
            sec = [r for r in rows if r["model"] == model_name and r["section"] == section]
            if not sec:
                continue
            by_source = {ds: metrics.summarise([r for r in sec if r["dataset"] == ds], majority, constant,
                                               n_resamples, seed)
                         for ds in sorted({r["dataset"] for r in sec})}
            out[model_name][section] = {"all": metrics.summarise(sec, majority, constant, n_resamples, seed),
                                        "by_source": by_source}
    return out


def _csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def write_plots(out: Path, rows: Sequence[Mapping[str, Any]], metric_tree: Mapping[str, Any]) -> list[str]:
    """DVC plot files under ``out/plots``; returns their names.

    ``confusion_<model>_<section>.csv``: ``actual,predicted`` diagnosis rows for the confusion
    template; ``level_accuracy.csv``: ``model,section,level,accuracy,ci_low,ci_high,n`` (levels with
    n = 0 are left out: they have no value); ``lesion_checks.csv``: the lesion / edit / probe
    metrics in the same long form.
    """
    plots = out / "plots"
    names = []
    for model_name, sections in metric_tree.items():
        for section in sections:
            pairs = metrics.confusion_pairs(r for r in rows if r["model"] == model_name and r["section"] == section)
            name = f"confusion_{model_name}_{section}.csv"
            atomic_write_text(plots / name, _csv_text(["actual", "predicted"], pairs))
            names.append(name)
    checks = ["lesion_sensitivity", "real_normal_specificity", "counterfactual_specificity", "control_consistency",
              "counterfactual_flip_rate", "counterfactual_control_gap", "probe_agreement_blank",
              "probe_agreement_shuffled"]
    for name, metric_names, key in (("level_accuracy.csv", [f"accuracy_{lv}" for lv in taxonomy.LEVELS], "level"),
                                    ("lesion_checks.csv", checks, "metric")):
        long = []
        for model_name, sections in metric_tree.items():
            for section, tree in sections.items():
                for m in metric_names:
                    s = tree["all"][m]
                    if s["value"] is not None:
                        label = m.removeprefix("accuracy_") if key == "level" else m
                        long.append([model_name, section, label, s["value"], s["ci_low"], s["ci_high"], s["n"]])
        value_name = "accuracy" if key == "level" else "value"
        atomic_write_text(plots / name, _csv_text(["model", "section", key, value_name, "ci_low", "ci_high", "n"],
                                                  long))
        names.append(name)
    return names


def _short_answer(r: Mapping[str, Any]) -> str:
    if r["pred_diagnosis"] is None:
        text = " ".join(str(r["completion"]).split())
        return f"unparsed: {text[:40]}" + ("..." if len(text) > 40 else "")
    box = r.get("pred_box")
    return (f"{r['pred_diagnosis']} / {r['pred_morphology'] or '?'}"
            + (f" / box {','.join(map(str, box))}" if box else "")
            + ("" if r["format_valid"] else " (format problems)"))


def counterfactual_gallery(counterfactuals: Sequence[Mapping[str, Any]], by_id: Mapping[str, Mapping[str, Any]],
                           n: int) -> list[report.GalleryItem]:
    """Up to ``n`` usable counterfactual syntheses (half with a border-clipped fill when there are such) as
    original / counterfactual normal / matched control, for the report's before/after section."""
    examples = cf_coverage.gallery_examples(counterfactuals, by_id, n)
    return [report.GalleryItem(
        title=ex["parent_sample_id"] + (" (lesion at the frame edge: fill clipped to the lens image)" if ex["clipped"]
                                        else ""),
        images=[("original", ex["original"]), ("counterfactual normal", ex.get("counterfactual_normal")),
                ("matched control", ex.get("control"))]) for ex in examples]


def build_gallery(rows: Sequence[Mapping[str, Any]], prompts: Sequence[Prompt],
                  annotations: Mapping[str, Mapping[str, Any]], size: int, seed: int) -> list[report.GalleryItem]:
    """Up to ``size`` real lesion samples, those with a counterfactual first, each with every model's answers."""
    derived: dict[str, dict[str, str]] = defaultdict(dict)
    for p in prompts:
        if p.condition in (metrics.COUNTERFACTUAL, metrics.CONTROL, metrics.BOTH) and p.image_path:
            derived[p.parent_sample_id].setdefault(p.condition, p.image_path)
    parents = sorted({p.parent_sample_id for p in prompts if p.condition == metrics.LESION},
                     key=lambda s: (metrics.COUNTERFACTUAL not in derived[s], _order_key(seed, s)))[:size]
    answers: dict[str, dict[str, dict[str, str]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        if r["parent_sample_id"] in parents and r["condition"] != metrics.NORMAL:
            answers[r["parent_sample_id"]][r["model"]].setdefault(r["condition"], _short_answer(r))
    items = []
    for sid in parents:
        a = annotations[sid]
        images = [("original", a["image_path"]), ("mask", a.get("mask_path")),
                  ("counterfactual", derived[sid].get(metrics.COUNTERFACTUAL)),
                  ("control", derived[sid].get(metrics.CONTROL))]
        if metrics.BOTH in derived[sid]:
            images.append(("both", derived[sid][metrics.BOTH]))
        items.append(report.GalleryItem(f"{sid} ({a['dataset']}, gold: {a['diagnosis']})", images,
                                        {m: dict(c) for m, c in answers[sid].items()}))
    return items


def _count_text(condition: str, c: Mapping[str, Any]) -> str:
    text = f"{condition} {c['chosen']}" + (f" of {c['available']}" if "available" in c else "")
    extra = [f"{k.replace('_', ' ')} {v}" for k, v in c.items() if k not in ("chosen", "available", "excluded") and v]
    extra += [f"excluded {n} ({reason})" for reason, n in (c.get("excluded") or {}).items()]
    return text + (f" ({', '.join(extra)})" if extra else "")


def _notes(counts: Mapping[str, Any], skipped: Sequence[Mapping[str, str]], majority: Mapping[str, str],
           constant: Mapping[str, str], n_resamples: int) -> list[str]:
    notes = [
        "Each cell: value [95% bootstrap interval] and n, the number of scored prompts (pairs for paired metrics). "
        f"Intervals resample whole groups (sequence / near-duplicate cluster; an image, its counterfactual, its "
        f"control and its probes move together), {n_resamples} resamples. 'n=0, no value' means nothing was "
        "scorable (e.g. a level that is never assessable), not 0 %.",
        "Constant answer baseline: every prompt answered '" + "; ".join(constant[lv] for lv in taxonomy.LEVELS)
        + "'. Majority class baseline: every prompt answered the train split's per-level majority '"
        + "; ".join(majority[lv] for lv in taxonomy.LEVELS) + "'. Both are scored by the same code as the models.",
        "Real-normal specificity (real normal images) and counterfactual specificity (lesion inpainted away) are "
        "separate figures and are never pooled. Probe agreement: how often the answer on a blank or a shuffled "
        "image equals the answer on the real image; a model that is looking scores low there.",
    ]
    for section, c in counts.items():
        notes.append(f"Section {section}, prompts per condition: " + "; ".join(_count_text(k, v) for k, v in c.items()))
    if skipped:
        notes.append(f"{len(skipped)} prompt(s) skipped, unreadable image: "
                     + ", ".join(f"{s['condition']}:{s['sample_id']}" for s in skipped[:20]))
    return notes


def model_dir(workspace: Path, model_name: str) -> Path:
    """Saved model directory of a model stage (the base model may live outside the workspace)."""
    if model_name == "base_model":
        from cogalign_core.train.base_model import resolve_base_model_dir

        return resolve_base_model_dir(workspace)
    return workspace / contract.model_dir(model_name)


def run_stage(workspace: Path, params: PipelineParams, item: str | None = None) -> None:
    """DVC stage ``evaluate``: see the module docstring. ``item`` is unused (not a per-batch stage)."""
    del item
    import torch

    from cogalign_core.train.base_model import canvas_spec
    from cogalign_core.train.feature_cache import FeatureCache, cached_tower
    from cogalign_core.train.infer import generate_answers
    from cogalign_core.train.model_card import write_evaluated_cards
    from cogalign_core.train.modeling import freeze_vision_tower, load_model_and_processor
    from cogalign_core.train.recipe import load_recipe

    ws = Path(workspace)
    ep = params.evaluate
    out = ws / OUT_DIR
    if not (ws / ANNOTATIONS_PATH).is_file():
        raise FileNotFoundError(f"{ws / ANNOTATIONS_PATH} missing: run the annotate stage first")
    annotations = tables.read_rows(ws / ANNOTATIONS_PATH)
    cf_path = ws / COUNTERFACTUALS_PATH
    counterfactuals = tables.read_rows(cf_path) if cf_path.is_file() else []
    recipes = {m: load_recipe(params.model.recipe, RECIPE_METHOD[m]) for m in ep.models}  # type: ignore[arg-type]
    first = recipes[ep.models[0]]
    spec = canvas_spec(first)
    for m, r in recipes.items():
        if r.canvas != first.canvas:
            raise ValueError(f"recipe {params.model.recipe}: model {m} uses another canvas than {ep.models[0]}; "
                             "evaluation shows every model the same images")

    prompts, counts = build_prompts(annotations, counterfactuals, ep.max_samples_per_condition, ep.seed, spec)
    if not prompts:
        raise ValueError("no test or external_test samples in annotations.parquet: nothing to evaluate")
    prompts, images, skipped = load_prompt_images(prompts, ws, spec, ep.blank_gray, ep.blank_side)

    rows: list[dict[str, Any]] = []
    settings = load_settings(ws)
    threads_before = torch.get_num_threads()
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    # Arms trained with a frozen tower share its exact tensors: each distinct image is encoded once.
    cache = FeatureCache()
    try:
        for model_name in ep.models:
            recipe = recipes[model_name]
            model, processor = load_model_and_processor(model_dir(ws, model_name), dtype=recipe.model.dtype,
                                                        attn_implementation=recipe.model.attn_implementation)
            if torch.cuda.is_available():
                model = model.to("cuda")
            freeze_vision_tower(model)  # inference only: frozen BatchNorm is eval-mode BatchNorm
            with cached_tower(model, cache):
                completions = [c.strip() for c in generate_answers(model, processor, images, recipe.grounding,
                                                                   max_new_tokens=ep.max_new_tokens,
                                                                   batch_size=settings.generate_batch_size)]
            rows += prediction_rows(model_name, prompts, completions, recipe.grounding)
            del model, processor
    finally:
        torch.set_num_threads(threads_before)

    train_gold = [a for a in annotations if a["split"] == "train"] or annotations
    majority = metrics.majority_answer(train_gold)
    metric_tree = compute_metrics(rows, ep.models, majority, ep.constant_answer, ep.bootstrap_resamples, ep.seed)

    tables.write_rows([_to_table_row(r) for r in rows], out / "predictions.parquet", PREDICTIONS, "predictions")
    atomic_write_json(out / "metrics.json", metric_tree)
    plot_files = write_plots(out, rows, metric_tree)
    by_id = {a["sample_id"]: a for a in annotations}
    confusion = {f"{m}/{s}": metrics.confusion_pairs(r for r in rows if r["model"] == m and r["section"] == s)
                 for m in metric_tree for s in metric_tree[m]}
    report.write_report(out / "report.html", metric_tree, confusion,
                        build_gallery(rows, prompts, by_id, ep.gallery_size, ep.seed), ws,
                        notes=_notes(counts, skipped, majority, ep.constant_answer, ep.bootstrap_resamples),
                        title=f"CogAlign evaluation (recipe {params.model.recipe})",
                        cf_coverage=cf_coverage.coverage(counterfactuals) if counterfactuals else None,
                        cf_gallery=counterfactual_gallery(counterfactuals, by_id, ep.gallery_size))
    # Model cards with this evaluation, under this stage's own output (the models belong to other stages).
    write_evaluated_cards(ws, metric_tree, {m: model_dir(ws, m) for m in ep.models})
    n_in = len(prompts) + len(skipped)
    atomic_write_json(out / "summary.json", {
        "prompts_built": n_in, "prompts_evaluated": len(prompts), "prompts_skipped": len(skipped),
        "skipped": skipped, "models": list(ep.models), "predictions": len(rows),
        "format_valid": {m: sum(1 for r in rows if r["model"] == m and r["format_valid"]) for m in ep.models},
        "conditions": counts, "majority_answer": majority, "plots": plot_files,
        accounting.KEY: accounting.block("prompts", n_in, len(prompts), {"image_unreadable": len(skipped)}),
    })
    inputs = [ANNOTATIONS_PATH.as_posix()] + ([COUNTERFACTUALS_PATH.as_posix()] if counterfactuals else [])
    # A real base model lives outside the workspace: its identity (name, revision, hash) is in base_model.json.
    inputs += [contract.model_dir(m) if m != "base_model" else contract.BASE_MODEL_REFERENCE for m in ep.models]
    write_provenance(out, STAGE, ws, inputs, {"evaluate": ep.model_dump(mode="json"), "recipe": params.model.recipe})
