"""Prompt-completion examples for SFT and GRPO from the annotation and counterfactual tables.

An *example* is a plain dict (one image, one gold answer)::

    sample_id      str   the image's sample id (a derived id for counterfactual images)
    kind           str   real_lesion | real_normal | counterfactual_normal | control
    dataset        str   source dataset of the image (a derived image's parent's)
    split          str   train | val | test | external_test
    image_path     str   workspace-relative path of the stored image
    location, morphology, microvascular, diagnosis   str   gold taxonomy terms
    gold_boxes     list[list[int]]   lesion boxes [x1, y1, x2, y2] in the 0-1000 canvas frame ([] = none)
    grounding      bool  the prompt asks for a <box>
    answer         str   gold completion (answer_format.render_answer, with <box> when grounding)

:func:`to_dataset` turns examples into a ``datasets.Dataset`` in TRL's conversational
prompt-completion format (``prompt``, ``completion``, ``image`` = the canvas PIL image), keeping
the gold columns, which TRL passes to the reward functions.

Tables are read with pyarrow (no polars here: this module runs on bare GPU boxes).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from cogalign_core import answer_format, canvas, contract, taxonomy
from cogalign_core.config.model import ModelParams
from cogalign_core.tables import read_rows

ANNOTATE_DIR = Path(contract.ANNOTATE)
COUNTERFACTUAL_DIR = Path(contract.COUNTERFACTUAL)
ALL_SPLITS: tuple[str, ...] = ("train", "val", "test", "external_test")
KINDS: tuple[str, ...] = ("real_lesion", "real_normal", "counterfactual_normal", "control")
LEVEL_COLUMNS: tuple[str, ...] = taxonomy.LEVELS


class DataError(ValueError):
    """An input table lacks what a training stage needs (a clear, early error)."""


def _pixel_boxes(boxes: Sequence[dict[str, int]] | None) -> list[tuple[int, int, int, int]]:
    return [(int(b["xmin"]), int(b["ymin"]), int(b["xmax"]), int(b["ymax"])) for b in boxes or []]


def _example(sample_id: str, kind: str, dataset: str, split: str, image_path: str, labels: dict[str, str],
             pixel_boxes: list[tuple[int, int, int, int]], width: int | None, height: int | None,
             spec: canvas.CanvasSpec, grounding: bool) -> dict[str, Any]:
    lesion = taxonomy.is_lesion_diagnosis(labels["diagnosis"])
    gold: list[list[int]] = []
    if lesion and pixel_boxes and width and height:
        gold = [list(canvas.box_to_canvas(b, width, height, spec)) for b in pixel_boxes]
    answer_box = canvas.union_box(gold) if gold else None
    return {
        "sample_id": sample_id, "kind": kind, "dataset": dataset, "split": split, "image_path": image_path,
        **labels,
        "gold_boxes": gold, "grounding": grounding,
        "answer": answer_format.render_answer(labels, answer_box, grounding=grounding),
    }


def real_examples(rows: Iterable[dict[str, Any]], splits: Sequence[str], spec: canvas.CanvasSpec,
                  grounding: bool) -> list[dict[str, Any]]:
    """Examples of the annotation rows in ``splits`` (sorted by sample_id)."""
    out = []
    for r in sorted(rows, key=lambda r: r["sample_id"]):
        if r["split"] not in splits:
            continue
        labels = {lv: r[lv] for lv in LEVEL_COLUMNS}
        kind = "real_lesion" if taxonomy.is_lesion_diagnosis(labels["diagnosis"]) else "real_normal"
        out.append(_example(r["sample_id"], kind, r["dataset"], r["split"], r["image_path"], labels,
                            _pixel_boxes(r.get("boxes")), r.get("width"), r.get("height"), spec, grounding))
    return out


def counterfactual_examples(cf_rows: Iterable[dict[str, Any]], annotations: Iterable[dict[str, Any]],
                            splits: Sequence[str], spec: canvas.CanvasSpec, grounding: bool
                            ) -> tuple[list[dict[str, Any]], Counter[str]]:
    """Examples of non-excluded counterfactual rows in ``splits``, and counts of rows left out by reason.

    A row labelled ``normal`` is a counterfactual normal (no box); any other label is a control,
    whose lesion box is its parent's (derived images keep the parent's frame).
    """
    parents = {r["sample_id"]: r for r in annotations}
    out: list[dict[str, Any]] = []
    skipped: Counter[str] = Counter()
    for r in sorted(cf_rows, key=lambda r: r["sample_id"]):
        if r.get("excluded"):
            skipped["excluded"] += 1
            continue
        if r["split"] not in splits:
            skipped["other_split"] += 1
            continue
        labels = {lv: r[lv] for lv in LEVEL_COLUMNS}
        normal = not taxonomy.is_lesion_diagnosis(labels["diagnosis"])
        parent = parents.get(r.get("parent_sample_id") or "")
        if not normal and parent is None:
            skipped["control_without_parent"] += 1
            continue
        boxes = [] if normal else _pixel_boxes(r.get("boxes") or parent.get("boxes"))  # type: ignore[union-attr]
        width = r.get("width") or (parent or {}).get("width")
        height = r.get("height") or (parent or {}).get("height")
        kind = "counterfactual_normal" if normal else "control"
        out.append(_example(r["sample_id"], kind, r["dataset"], r["split"], r["image_path"], labels, boxes, width,
                            height, spec, grounding))
    return out, skipped


def split_table(folder: Path, split: str) -> str:
    """Workspace-relative path of one split's table in a stage folder."""
    return contract.split_table(Path(folder).as_posix(), split)


def _split_rows(workspace: Path, folder: Path, splits: Sequence[str], stage: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for split in splits:
        path = workspace / split_table(folder, split)
        if not path.is_file():
            raise DataError(f"{path} not found: run the {stage} stage first")
        rows += read_rows(path)
    return rows


def load_annotations(workspace: Path, splits: Sequence[str] = ALL_SPLITS,
                     exclude_datasets: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Annotation rows of ``splits``, read from the annotate stage's per-split tables.

    Reading only the needed splits keeps a training stage's DVC inputs to what it learns from:
    registering an external test batch must not retrain anything. Rows of ``exclude_datasets``
    (sources held out of training) are left out.
    """
    drop = set(exclude_datasets)
    return [r for r in _split_rows(workspace, ANNOTATE_DIR, splits, "annotate") if r["dataset"] not in drop]


def load_counterfactuals(workspace: Path, splits: Sequence[str] = ALL_SPLITS,
                         exclude_datasets: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Counterfactual rows of ``splits`` (minus ``exclude_datasets``), from the stage's per-split tables."""
    drop = set(exclude_datasets)
    return [r for r in _split_rows(workspace, COUNTERFACTUAL_DIR, splits, "counterfactual")
            if r["dataset"] not in drop]


def training_annotations(workspace: Path, splits: Sequence[str], model_params: ModelParams) -> list[dict[str, Any]]:
    """What a training stage may learn from: ``splits``' rows minus ``model.train_exclude_datasets``."""
    return load_annotations(workspace, splits, model_params.train_exclude_datasets)


def _rank(example: dict[str, Any], seed: int) -> str:
    return hashlib.sha256(f"{seed}:{example['sample_id']}".encode()).hexdigest()


def balance_normals(examples: Sequence[dict[str, Any]], normal_fraction: float, seed: int,
                    max_prompts: int | None = None) -> list[dict[str, Any]]:
    """Deterministically resample so about ``normal_fraction`` of the prompts are labelled normal.

    The total is ``max_prompts`` (or, without it, twice the larger class's share, so nothing is
    dropped); each class is drawn in a seeded hash order, cycling (repeating) when it is too small.
    The output is interleaved in hash order. A set with only one class is returned as is (capped).
    """
    normals = sorted((e for e in examples if e["diagnosis"] == taxonomy.NORMAL), key=lambda e: _rank(e, seed))
    lesions = sorted((e for e in examples if e["diagnosis"] != taxonomy.NORMAL), key=lambda e: _rank(e, seed))
    if not normals or not lesions:
        only = normals or lesions
        return only[:max_prompts] if max_prompts else list(only)
    total = max_prompts or max(round(len(normals) / normal_fraction), round(len(lesions) / (1 - normal_fraction)))
    n_norm = max(1, min(total - 1, round(total * normal_fraction)))
    picked = [normals[i % len(normals)] for i in range(n_norm)]
    picked += [lesions[i % len(lesions)] for i in range(total - n_norm)]
    order = sorted(range(len(picked)), key=lambda i: (_rank(picked[i], seed + 1), i))
    return [picked[i] for i in order]


REAL_KINDS: frozenset[str] = frozenset({"real_lesion", "real_normal"})


def balance_groups(real: Sequence[dict[str, Any]], derived: Sequence[dict[str, Any]], normal_fraction: float,
                   seed: int, max_prompts: int | None = None) -> list[dict[str, Any]]:
    """Balance real and derived (counterfactual normal / both / control) examples *separately*, then mix.

    Why separately: pooled, the counterfactual normals (two per lesion parent: lesion removed, and
    lesion removed plus control fill) outnumber the few real normals and the controls, so a model
    meets "inpainted region -> normal, untouched frame -> lesion" and "real normals are rare" as
    shortcuts (measured: pooled sft_cf called every real normal a polyp). Balanced per group, each
    group is about ``normal_fraction`` normal, so neither the presence of a fill nor the source of
    the normals predicts the label; only the lesion does. Without ``max_prompts`` every example is
    kept (the smaller class of each group cycles); with it, each group gets a share proportional to
    its balanced size. Output interleaved in a seeded hash order (deterministic).
    """
    groups = [g for g in (list(real), list(derived)) if g]
    if len(groups) < 2:
        return balance_normals(groups[0], normal_fraction, seed, max_prompts) if groups else []
    full = [balance_normals(g, normal_fraction, seed) for g in groups]
    if max_prompts is not None and sum(map(len, full)) > max_prompts:
        total = sum(map(len, full))
        shares = [max(1, round(max_prompts * len(f) / total)) for f in full]
        shares[-1] = max(1, max_prompts - sum(shares[:-1])) if len(shares) > 1 else max_prompts
        full = [balance_normals(g, normal_fraction, seed, share) for g, share in zip(groups, shares, strict=True)]
    picked = [e for f in full for e in f]
    order = sorted(range(len(picked)), key=lambda i: (_rank(picked[i], seed + 2), i))
    return [picked[i] for i in order]


def prompt_and_completion(example: dict[str, Any]) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Conversational prompt (system + user; TRL inserts the image before the user text) and completion."""
    prompt = [
        {"role": "system", "content": answer_format.system_prompt(bool(example["grounding"]))},
        {"role": "user", "content": answer_format.QUESTION},
    ]
    return prompt, [{"role": "assistant", "content": example["answer"]}]


def to_dataset(examples: Sequence[dict[str, Any]], workspace: Path, spec: canvas.CanvasSpec,
               with_completion: bool = True) -> Any:
    """``datasets.Dataset`` with ``prompt``, (``completion``), ``image`` (canvas PIL) and the gold columns."""
    from datasets import Dataset, Features, Image, List, Value
    from datasets import Sequence as HFSequence

    records = []
    for e in examples:
        prompt, completion = prompt_and_completion(e)
        rec = {**e, "prompt": prompt, "image": canvas.load_canvas(workspace / e["image_path"], spec)}
        if with_completion:
            rec["completion"] = completion
        records.append(rec)
    message = {"role": Value("string"), "content": Value("string")}
    features = {
        "sample_id": Value("string"), "kind": Value("string"), "dataset": Value("string"), "split": Value("string"),
        "image_path": Value("string"), **{lv: Value("string") for lv in LEVEL_COLUMNS},
        "gold_boxes": List(HFSequence(Value("int32"))), "grounding": Value("bool"), "answer": Value("string"),
        "prompt": List(message), "image": Image(),
    }
    if with_completion:
        features["completion"] = List(message)
    return Dataset.from_list(records, features=Features(features))


def kind_counts(examples: Iterable[dict[str, Any]]) -> dict[str, int]:
    """Examples per kind and per diagnosis class (normal / lesion), for summaries."""
    c: Counter[str] = Counter()
    for e in examples:
        c[f"kind:{e['kind']}"] += 1
        c["label:normal" if e["diagnosis"] == taxonomy.NORMAL else "label:lesion"] += 1
    return dict(sorted(c.items()))
