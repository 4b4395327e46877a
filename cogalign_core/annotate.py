"""Annotation stage: one hierarchical clinical-cognition row per ingested sample, plus splits.

Reads ``data/ingest/samples.parquet`` and writes ``data/annotate/annotations.parquet`` (schema
:data:`cogalign_core.tables.ANNOTATIONS`), ``rejects.parquet`` and ``summary.json``.

Each level's value carries its provenance: ``dataset_label`` (the source's class or dataset label
mapped through :mod:`cogalign_core.taxonomy`), ``ingest_label`` (terms given when the batch was
registered, ``cogalign ingest --diagnosis ...`` or a manifest's level columns; they win over the
dataset's), ``derived_from_mask`` (lesion count / relative size from the ground-truth mask) or
``clinician`` (a clinician CSV, which overrides everything).

Splits are assigned per *group*, never per image: samples sharing a dataset sequence/patient or a
near-duplicate cluster form one group (union-find), and the group's split is a salted hash of its
key, so adding a batch never moves an existing sample: groups are formed batch by batch, and a new
sample linked to several existing groups joins the earliest one (existing groups never merge).
``role: test`` batches always land in ``external_test``.

The stage works on Arrow/polars columns: labels, answers and splits are computed once per distinct
value (a few label combinations, one hash per group) and joined back, and mask facts are read only
for samples with a mask, so a million rows annotate in seconds (``benchmarks/bench_scale.py``).
(Over 400 lines: labels, groups, splits and the clinician CSV are one stage's rules, tested together.)
"""

from __future__ import annotations

import csv
import hashlib
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from cogalign_core import accounting, answer_format, contract, tables, taxonomy
from cogalign_core.config import PipelineParams
from cogalign_core.config.annotate import SplitParams
from cogalign_core.io import atomic_write_json
from cogalign_core.provenance import write_provenance

OUT_DIR = Path(contract.ANNOTATE)


def split_path(split: str) -> Path:
    """Workspace-relative path of one split's annotation table (same schema as annotations.parquet)."""
    return Path(contract.annotation_split(split))


def write_annotation_table(table: pa.Table, workspace: Path) -> None:
    """Write ``annotations.parquet`` and one table per split (same schema) from an Arrow table."""
    out = Path(workspace) / OUT_DIR
    tables.write_table(table, out / "annotations.parquet", tables.ANNOTATIONS, "annotations")
    split = table.column("split").cast(pa.string())
    for name in tables.SPLITS:
        tables.write_table(table.filter(pc.equal(split, name)), Path(workspace) / split_path(name),
                           tables.ANNOTATIONS, "annotations")


def write_annotation_tables(rows: list[dict[str, Any]], workspace: Path) -> None:
    """Write ``annotations.parquet`` and one table per split (same schema).

    Training stages depend on their split's file only, so adding an external test batch does not
    make DVC retrain (image paths are content-addressed, so a split table changes exactly when
    its images do).
    """
    out = Path(workspace) / OUT_DIR
    tables.write_rows(rows, out / "annotations.parquet", tables.ANNOTATIONS, "annotations")
    for split in tables.SPLITS:
        tables.write_rows([r for r in rows if r["split"] == split], Path(workspace) / split_path(split),
                          tables.ANNOTATIONS, "annotations")


SAMPLES = Path(contract.SAMPLES)
# Components smaller than this fraction of the frame are mask noise, not lesions.
MIN_COMPONENT_FRACTION = 0.0005
CLINICIAN_LEVEL_COLUMNS = ("location", "morphology", "microvascular", "diagnosis")
CLINICIAN_CSV_HEADER = ",".join(("sample_id", *CLINICIAN_LEVEL_COLUMNS, "paris")) + "\n"


@dataclass(frozen=True)
class MaskFacts:
    """What a binary lesion mask says: component count, area fraction, boxes, frame region."""

    lesion_count: int
    area_fraction: float
    boxes: list[dict[str, int]]
    frame_region: str


def mask_facts(mask: np.ndarray) -> MaskFacts:
    """Describe a lesion mask.

    Args:
        mask: (H, W) uint8, nonzero = lesion, in the stored image's pixel frame.

    Returns:
        Components of at least :data:`MIN_COMPONENT_FRACTION` of the frame, their inclusive
        boxes (origin top-left), the lesion area fraction and the 3x3 frame region of the lesion
        centroid (``center``, ``upper left``, ...; ``none`` without a lesion).
    """
    import cv2

    binary = (mask > 0).astype(np.uint8)
    h, w = binary.shape
    n, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    min_area = max(1, int(MIN_COMPONENT_FRACTION * h * w))
    keep = [i for i in range(1, n) if stats[i, cv2.CC_STAT_AREA] >= min_area]
    boxes = []
    for i in keep:
        x, y, bw, bh = (int(v) for v in stats[i, :4])
        boxes.append({"xmin": x, "ymin": y, "xmax": x + bw - 1, "ymax": y + bh - 1})
    area = float(sum(int(stats[i, cv2.CC_STAT_AREA]) for i in keep)) / float(h * w)
    if not keep:
        return MaskFacts(0, 0.0, [], "none")
    ys, xs = np.nonzero(np.isin(labels, keep))
    return MaskFacts(len(keep), area, boxes, frame_region(float(xs.mean()) / w, float(ys.mean()) / h))


def frame_region(cx: float, cy: float) -> str:
    """3x3 region name of a point given as fractions of width/height (origin top-left)."""
    col = ("left", "", "right")[min(2, int(cx * 3))]
    row = ("upper", "", "lower")[min(2, int(cy * 3))]
    name = " ".join(p for p in (row, col) if p)
    return name or "center"


def boxes_facts(boxes: list[dict[str, int]], width: int, height: int) -> MaskFacts:
    """Fallback description from source boxes when there is no mask (area = union-free box sum)."""
    if not boxes:
        return MaskFacts(0, 0.0, [], "none")
    area = sum((b["xmax"] - b["xmin"] + 1) * (b["ymax"] - b["ymin"] + 1) for b in boxes) / float(width * height)
    cx = sum((b["xmin"] + b["xmax"]) / 2 for b in boxes) / len(boxes) / width
    cy = sum((b["ymin"] + b["ymax"]) / 2 for b in boxes) / len(boxes) / height
    return MaskFacts(len(boxes), min(1.0, area), boxes, frame_region(cx, cy))


# ---------------------------------------------------------------------------------------- splits


def _class_min(classes: np.ndarray, values: np.ndarray) -> np.ndarray:
    """For each element, the minimum of ``values`` over the elements sharing its class id."""
    out = np.full(int(classes.max()) + 1 if classes.size else 0, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(out, classes, values)
    return out[classes]


def _components(*class_ids: np.ndarray) -> np.ndarray:
    """Smallest member index of each element's connected component, where elements sharing an id in
    any of ``class_ids`` are linked (min-label propagation until stable)."""
    label = np.arange(class_ids[0].size, dtype=np.int64)
    while True:
        new = label
        for ids in class_ids:
            new = _class_min(ids, new)
        if np.array_equal(new, label):
            return label
        label = new


def group_roots(batch_of: Sequence[int], base_keys: Sequence[str], clusters: Sequence[str],
                sample_ids: Sequence[str]) -> np.ndarray:
    """Index of each sample's group root (its group's earliest member), samples in registration order.

    Samples sharing a base key or a near-duplicate cluster are one group. Groups are formed batch by
    batch: within a batch, links union samples; a batch's component that links to earlier groups
    joins the earliest of them, and earlier groups never merge, so adding a batch never changes an
    existing sample's group (hence never its split). Vectorised: per batch, min-label propagation.
    """
    n = len(sample_ids)
    root = np.arange(n, dtype=np.int64)
    if n == 0:
        return root
    frame = pl.DataFrame({"base": pl.Series(base_keys, dtype=pl.String),
                          "cluster": pl.Series(clusters, dtype=pl.String),
                          "sample_id": pl.Series(sample_ids, dtype=pl.String)}).with_row_index("i")
    base_id = frame["base"].rank("dense").to_numpy().astype(np.int64) - 1
    # A cluster is named by a sample (its first member): the index of that sample, else the sample itself.
    named = frame.join(frame.select(pl.col("sample_id").alias("cluster"), pl.col("i").alias("ci")), on="cluster",
                       how="left", maintain_order="left")
    cluster_index = named["ci"].fill_null(named["i"]).to_numpy().astype(np.int64)
    batch = np.asarray(batch_of, dtype=np.int64)
    bounds = np.flatnonzero(np.diff(batch)) + 1
    first_group_of_base = np.full(int(base_id.max()) + 1, n, dtype=np.int64)
    for lo, hi in zip(np.concatenate(([0], bounds)), np.concatenate((bounds, [n])), strict=True):
        b_ids, c_idx = base_id[lo:hi], cluster_index[lo:hi]
        old = c_idx < lo
        attach = np.minimum(first_group_of_base[b_ids], np.where(old, root[np.where(old, c_idx, 0)], n))
        # A cluster named by an earlier sample links to that sample's group, not within the batch.
        local_cluster = np.where(old, -1 - np.arange(lo, hi), c_idx)
        comp = _components(np.unique(b_ids, return_inverse=True)[1],
                           np.unique(local_cluster, return_inverse=True)[1])
        comp_local = np.unique(comp, return_inverse=True)[1]
        comp_attach = _class_min(comp_local, attach)
        root[lo:hi] = np.where(comp_attach < n, comp_attach, lo + comp)
        np.minimum.at(first_group_of_base, b_ids, root[lo:hi])
    return root


def group_keys(samples: list[dict[str, Any]], batch_order: dict[str, int]) -> dict[str, str]:
    """Group key per sample_id: the base key of the group's earliest-registered member (see :func:`group_roots`).

    A sample's base key is ``dataset|seq:<hashed sequence/patient>`` when the source gives one,
    else ``dataset|dup:<near-duplicate cluster>``.
    """
    ordered = sorted(samples, key=lambda s: (batch_order.get(s["batch_id"], 1 << 30), s["sample_id"]))
    base = [_base_key(s) for s in ordered]
    roots = group_roots([batch_order.get(s["batch_id"], 1 << 30) for s in ordered], base,
                        [s.get("near_dup_cluster") or s["sample_id"] for s in ordered],
                        [s["sample_id"] for s in ordered])
    return {s["sample_id"]: base[int(r)] for s, r in zip(ordered, roots, strict=True)}


def _base_key(sample: dict[str, Any]) -> str:
    if sample.get("group_id_hash"):
        return f"{sample['dataset']}|seq:{sample['group_id_hash']}"
    return f"{sample['dataset']}|dup:{sample.get('near_dup_cluster') or sample['sample_id']}"


def split_for(group_key: str, diagnosis: str, split: SplitParams) -> str:
    """Deterministic split of a group: a salted hash mapped onto the train/val/test fractions.

    The diagnosis stratum is part of the hashed key, so each stratum's groups are split by the
    same fractions independently (stratified in expectation) while a group's split never depends
    on which other groups exist.
    """
    digest = hashlib.sha256(f"{split.salt}|{diagnosis}|{group_key}".encode()).hexdigest()
    u = int(digest[:15], 16) / float(16**15)
    if u < split.train:
        return "train"
    if u < split.train + split.val:
        return "val"
    return "test"


# ----------------------------------------------------------------------------------- clinician


def read_clinician_csv(path: Path, known_ids: set[str]) -> tuple[dict[str, dict[str, str]], list[dict[str, Any]]]:
    """Parse a clinician label CSV into per-sample overrides and rejects (with reasons).

    Columns: ``sample_id`` plus any of ``location, morphology, microvascular, diagnosis, paris``
    (``paris`` like ``0-Is`` maps to the morphology term ``paris 0-is``). Empty cells mean "no
    opinion". Every level value must be a taxonomy term.
    """
    overrides: dict[str, dict[str, str]] = {}
    rejects: list[dict[str, Any]] = []

    def reject(row: int, sid: str | None, reason: str, detail: str) -> None:
        rejects.append({"source": "clinician_csv", "row": row, "sample_id": sid, "reason": reason, "detail": detail})

    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        reject(0, None, "unreadable_file", f"{type(exc).__name__}: {exc}")
        return overrides, rejects
    reader = csv.DictReader(text.splitlines())
    if not reader.fieldnames or "sample_id" not in reader.fieldnames:
        reject(0, None, "missing_column", "the clinician CSV needs a sample_id column")
        return overrides, rejects
    for i, row in enumerate(reader, start=1):
        if None in row or any(v is None for v in row.values()):
            reject(i, row.get("sample_id"), "malformed_row", "wrong number of fields")
            continue
        sid = (row.get("sample_id") or "").strip()
        if sid not in known_ids:
            reject(i, sid or None, "unknown_sample", "sample_id not in the ingested samples")
            continue
        values: dict[str, str] = {}
        bad = False
        for level in CLINICIAN_LEVEL_COLUMNS:
            raw = (row.get(level) or "").strip()
            if raw:
                term = taxonomy.normalise_term(raw)
                if not taxonomy.is_term(level, term):
                    reject(i, sid, f"unknown_term:{level}", raw)
                    bad = True
                values[level] = term
        paris = (row.get("paris") or "").strip()
        if paris:
            term = taxonomy.normalise_term(f"paris {paris.lower().removeprefix('paris').strip()}")
            if term not in taxonomy.PARIS_TERMS:
                reject(i, sid, "unknown_term:paris", paris)
                bad = True
            values["morphology"] = term
        if bad:
            continue
        if not values:
            reject(i, sid, "empty_row", "no level given")
            continue
        overrides.setdefault(sid, {}).update(values)
    return overrides, rejects


# --------------------------------------------------------------------------------------- stage

_LEVEL_LABEL_COLUMNS = ("location", "microvascular", "diagnosis", "morphology")


def _source_labels(df: pl.DataFrame) -> pl.DataFrame:
    """Per distinct (dataset, class_label, kvasir_sessile): the dataset label's levels (``lbl_*``, null when
    the source gives none; ``lbl_ok`` false when unmapped)."""
    combos = df.select("dataset", "class_label", "kvasir_sessile").unique(maintain_order=True)
    rows = []
    for dataset, class_label, sessile in combos.iter_rows():
        label = taxonomy.label_for(dataset, class_label, sessile)
        rows.append({"dataset": dataset, "class_label": class_label, "kvasir_sessile": sessile,
                     "lbl_ok": label is not None,
                     **{f"lbl_{lv}": (getattr(label, lv) if label is not None else None)
                        for lv in _LEVEL_LABEL_COLUMNS}})
    schema = {"dataset": pl.String, "class_label": pl.String, "kvasir_sessile": pl.Boolean, "lbl_ok": pl.Boolean,
              **{f"lbl_{lv}": pl.String for lv in _LEVEL_LABEL_COLUMNS}}
    return pl.DataFrame(rows, schema=schema)


_BOX_TYPE = pl.List(pl.Struct({k: pl.Int32 for k in ("xmin", "ymin", "xmax", "ymax")}))


def _facts_frame(df: pl.DataFrame, workspace: Path) -> pl.DataFrame:
    """lesion_count, lesion_area_fraction, boxes, frame_region, mask_morphology per sample_id.

    With a mask: read and measured (:func:`mask_facts`). Without: from the source boxes, in columns
    (the same arithmetic as :func:`boxes_facts`).
    """
    with_mask = df.filter(pl.col("mask_path").is_not_null())
    measured = []
    for sid, path in with_mask.select("sample_id", "mask_path").iter_rows():
        with Image.open(workspace / path) as im:
            f = mask_facts(np.asarray(im.convert("L")))
        measured.append({"sample_id": sid, "lesion_count": f.lesion_count, "lesion_area_fraction": f.area_fraction,
                         "boxes": f.boxes, "frame_region": f.frame_region,
                         "mask_morphology": taxonomy.morphology_from_mask(f.lesion_count, f.area_fraction)})
    schema = {"sample_id": pl.String, "lesion_count": pl.Int32, "lesion_area_fraction": pl.Float64,
              "boxes": _BOX_TYPE, "frame_region": pl.String, "mask_morphology": pl.String}
    from_masks = pl.DataFrame(measured, schema=schema)
    e = pl.element().struct.field
    b = pl.col("boxes")
    w, h = pl.col("width").cast(pl.Float64), pl.col("height").cast(pl.Float64)
    n = b.list.len().fill_null(0)
    area = b.list.eval((e("xmax") - e("xmin") + 1) * (e("ymax") - e("ymin") + 1)).list.sum()
    cx = b.list.eval((e("xmin") + e("xmax")) / 2).list.sum() / n / w
    cy = b.list.eval((e("ymin") + e("ymax")) / 2).list.sum() / n / h
    col = pl.min_horizontal((cx * 3).floor(), pl.lit(2.0)).cast(pl.Int64)
    row = pl.min_horizontal((cy * 3).floor(), pl.lit(2.0)).cast(pl.Int64)
    names = pl.concat_str([pl.lit(["upper", "", "lower"]).list.get(row), pl.lit(["left", "", "right"]).list.get(col)],
                          separator=" ").str.strip_chars()
    region = pl.when(n == 0).then(pl.lit("none")).when(names == "").then(pl.lit("center")).otherwise(names)
    from_boxes = df.filter(pl.col("mask_path").is_null()).select(
        "sample_id", n.cast(pl.Int32).alias("lesion_count"),
        pl.when(n == 0).then(0.0).otherwise(pl.min_horizontal(area.cast(pl.Float64) / (w * h), pl.lit(1.0)))
        .alias("lesion_area_fraction"),
        pl.when(n == 0).then(pl.lit([], _BOX_TYPE)).otherwise(b.cast(_BOX_TYPE)).alias("boxes"),
        region.alias("frame_region"), pl.lit(None, pl.String).alias("mask_morphology"))
    return pl.concat([from_masks, from_boxes])


def _splits(frame: pl.DataFrame, split: SplitParams) -> pl.DataFrame:
    """split per distinct (group_key, diagnosis): one salted hash each."""
    pairs = frame.select("group_key_raw", "diagnosis").unique(maintain_order=True)
    labels = [split_for(g, d, split) for g, d in zip(pairs["group_key_raw"].to_list(), pairs["diagnosis"].to_list(),
                                                      strict=True)]
    return pairs.with_columns(pl.Series("split_hashed", labels, dtype=pl.String))


def annotate_frame(samples: pl.DataFrame, workspace: Path, params: PipelineParams,
                   clinician: dict[str, dict[str, str]] | None = None) -> tuple[pl.DataFrame, list[dict[str, Any]]]:
    """Annotation rows (ANNOTATIONS columns, sorted by sample_id) and rejects of an ingested samples frame."""
    clinician = clinician or {}
    batch_order = {b: i for i, b in enumerate(params.batches)}
    df = samples.with_columns(pl.col("batch_id").replace_strict(batch_order, default=1 << 30, return_dtype=pl.Int64)
                              .alias("_batch")).sort("_batch", "sample_id")
    cluster = pl.coalesce(pl.col("near_dup_cluster"), pl.col("sample_id"))
    base = pl.when(pl.col("group_id_hash").is_not_null() & (pl.col("group_id_hash") != "")) \
        .then(pl.concat_str([pl.col("dataset"), pl.lit("|seq:"), pl.col("group_id_hash")])) \
        .otherwise(pl.concat_str([pl.col("dataset"), pl.lit("|dup:"), cluster]))
    df = df.with_columns(base.alias("_base"), cluster.alias("_cluster"))
    roots = group_roots(df["_batch"].to_list(), df["_base"].to_list(), df["_cluster"].to_list(),
                        df["sample_id"].to_list())
    df = df.with_columns(df["_base"].gather(roots).alias("group_key_raw"))
    over = pl.DataFrame([{"sample_id": sid, **{f"clin_{lv}": v.get(lv) for lv in taxonomy.LEVELS}}
                         for sid, v in clinician.items()],
                        schema={"sample_id": pl.String, **{f"clin_{lv}": pl.String for lv in taxonomy.LEVELS}})
    df = (df.join(_source_labels(df), on=["dataset", "class_label", "kvasir_sessile"], how="left", nulls_equal=True)
          .join(over, on="sample_id", how="left"))
    given = {lv: pl.col("labels").struct.field(lv) for lv in taxonomy.LEVELS}  # terms given at ingest
    labelled = pl.col("lbl_ok") | given["diagnosis"].is_not_null() | pl.col("clin_diagnosis").is_not_null()
    unlabelled = df.filter(~labelled).sort("sample_id")
    rejects = [{"source": "dataset_label", "row": None, "sample_id": sid, "reason": "unmapped_label",
                "detail": f"dataset={ds} class_label={cl!r}"}
               for sid, ds, cl in unlabelled.select("sample_id", "dataset", "class_label").iter_rows()]
    df = df.filter(labelled)
    df = df.drop("boxes").join(_facts_frame(df, workspace), on="sample_id", how="left") \
        if df.height else df.with_columns(pl.lit(None, pl.Int32).alias("lesion_count"),
                                          pl.lit(None, pl.Float64).alias("lesion_area_fraction"),
                                          pl.lit(None, pl.String).alias("frame_region"),
                                          pl.lit(None, pl.String).alias("mask_morphology"))
    na = pl.lit(taxonomy.NOT_ASSESSABLE)
    dataset_ok = pl.col("lbl_ok")
    # A source the taxonomy does not know but labelled at ingest: its base label is the given diagnosis.
    from_given = ~dataset_ok & given["diagnosis"].is_not_null()
    ok = dataset_ok | from_given
    base_source = pl.when(dataset_ok).then(pl.lit("dataset_label")).otherwise(pl.lit("ingest_label"))
    given_normal = given["diagnosis"] == taxonomy.NORMAL
    base_morphology = pl.when(dataset_ok).then(pl.col("lbl_morphology")) \
        .when(given_normal).then(pl.lit(taxonomy.NO_LESION))
    dataset_value = {
        "location": pl.when(ok).then(pl.coalesce(pl.when(dataset_ok).then(pl.col("lbl_location")), na)),
        "microvascular": pl.when(ok).then(pl.coalesce(pl.when(dataset_ok).then(pl.col("lbl_microvascular")), na)),
        "diagnosis": pl.when(dataset_ok).then(pl.col("lbl_diagnosis")).otherwise(given["diagnosis"]),
        "morphology": pl.when(ok).then(pl.coalesce(base_morphology, pl.col("mask_morphology"), na)),
    }
    dataset_source = {lv: pl.when(ok).then(base_source) for lv in taxonomy.LEVELS}
    dataset_source["morphology"] = pl.when(ok).then(
        pl.when(base_morphology.is_null() & pl.col("mask_morphology").is_not_null())
        .then(pl.lit("derived_from_mask")).otherwise(base_source))
    # Given terms win over the dataset's; a given diagnosis that changes the finding implies its morphology
    # when none was given (a normal finding has no lesion; a lesion without a mask is not assessable).
    changed = given["diagnosis"].is_not_null() & (dataset_value["diagnosis"] != given["diagnosis"])
    implied = pl.when(changed & given_normal).then(pl.lit(taxonomy.NO_LESION)) \
        .when(changed & pl.col("mask_path").is_null()).then(na)
    given_value = {**given, "morphology": pl.coalesce(given["morphology"], implied)}
    levels = []
    for lv in taxonomy.LEVELS:
        clin = pl.col(f"clin_{lv}")
        levels += [pl.coalesce(clin, given_value[lv], dataset_value[lv], na).alias(lv),
                   pl.when(clin.is_not_null()).then(pl.lit("clinician"))
                   .when(given_value[lv].is_not_null()).then(pl.lit("ingest_label"))
                   .otherwise(pl.coalesce(dataset_source[lv], pl.lit("clinician"))).alias(f"{lv}_source")]
    df = df.with_columns(levels).with_columns(pl.col("role").fill_null("train"))
    df = df.join(_splits(df, params.annotate.split), on=["group_key_raw", "diagnosis"], how="left")
    keys = df.select("group_key_raw").unique()
    keys = keys.with_columns(pl.Series("group_key", [hashlib.sha256(k.encode()).hexdigest()[:16]
                                                     for k in keys["group_key_raw"].to_list()], dtype=pl.String))
    combos = df.select(*taxonomy.LEVELS).unique()
    combos = combos.with_columns(pl.Series(
        "answer", [answer_format.render_answer(dict(zip(taxonomy.LEVELS, c, strict=True))) for c in combos.iter_rows()],
        dtype=pl.String))
    df = (df.join(keys, on="group_key_raw", how="left").join(combos, on=list(taxonomy.LEVELS), how="left")
          .with_columns(pl.when(pl.col("role") == "test").then(pl.lit("external_test"))
                        .otherwise(pl.col("split_hashed")).alias("split"))
          .sort("sample_id"))
    return df.select(tables.ANNOTATIONS.names), rejects


def _plain(frame: pl.DataFrame) -> pl.DataFrame:
    """Categorical (Arrow dictionary) columns as plain strings."""
    return frame.with_columns(pl.col(pl.Categorical).cast(pl.String))


def _frame(table: pa.Table) -> pl.DataFrame:
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    return _plain(frame)


def annotate_samples(samples: list[dict[str, Any]], workspace: Path, params: PipelineParams,
                     clinician: dict[str, dict[str, str]] | None = None
                     ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Row-dict form of :func:`annotate_frame` (rows sorted by sample_id)."""
    rows, rejects = annotate_frame(_frame(tables.table_from_rows(samples, tables.SAMPLES)), workspace, params,
                                   clinician)
    return tables.table_from_polars(rows, tables.ANNOTATIONS).to_pylist(), rejects


def _by_batch(batch_of: dict[str, str], annotated_batches: list[str], rejects: list[dict[str, Any]]
              ) -> dict[str, dict[str, Any]]:
    """Per raw batch: samples in, annotated (usable) and rejected by reason."""
    n_in, n_out = Counter(batch_of.values()), Counter(annotated_batches)
    dropped: dict[str, Counter[str]] = defaultdict(Counter)
    for r in rejects:
        if r["source"] == "dataset_label":
            dropped[batch_of[r["sample_id"]]][r["reason"]] += 1
    return {b: accounting.block("samples", n_in[b], n_out[b], dropped[b]) for b in sorted(n_in)}


def run_stage(workspace: Path, params: PipelineParams, item: str | None = None) -> None:
    """DVC stage ``annotate``: samples.parquet (+ clinician CSV) -> annotations.parquet."""
    samples = _frame(tables.read_table(workspace / SAMPLES, "samples"))
    n_samples = samples.height
    clinician: dict[str, dict[str, str]] = {}
    clinician_rejects: list[dict[str, Any]] = []
    inputs = [str(SAMPLES)]
    if params.annotate.clinician_csv:
        path = workspace / params.annotate.clinician_csv
        inputs.append(params.annotate.clinician_csv)
        if path.exists():
            clinician, clinician_rejects = read_clinician_csv(path, set(samples["sample_id"].to_list()))
        else:
            clinician_rejects = [{"source": "clinician_csv", "row": 0, "sample_id": None, "reason": "missing_file",
                                  "detail": params.annotate.clinician_csv}]
    frame, rejects = annotate_frame(samples, workspace, params, clinician)
    rejects = clinician_rejects + rejects
    out = workspace / OUT_DIR
    write_annotation_table(tables.table_from_polars(frame, tables.ANNOTATIONS), workspace)
    tables.write_rows(rejects, out / "rejects.parquet", tables.ANNOTATION_REJECTS, "annotation_rejects")
    unlabelled = sum(1 for r in rejects if r["source"] == "dataset_label")
    if frame.height + unlabelled != n_samples:
        raise AssertionError(f"annotate conservation broken: {n_samples} in, {frame.height} + {unlabelled} out")
    by_split = dict(frame.group_by("split").len().sort("split").iter_rows())
    by_split_diag: dict[str, dict[str, int]] = defaultdict(dict)
    for diagnosis, split, count in frame.group_by("diagnosis", "split").len().sort("diagnosis", "split").iter_rows():
        by_split_diag[diagnosis][split] = count
    atomic_write_json(out / "summary.json", {
        "samples_in": n_samples,
        "annotated": frame.height,
        "rejected_unlabelled": unlabelled,
        "clinician_rows_rejected": len(clinician_rejects),
        "clinician_overrides": len(clinician),
        "groups": frame["group_key"].n_unique(),
        "split_counts": by_split,
        "split_counts_by_diagnosis": dict(sorted(by_split_diag.items())),
        "taxonomy_version": taxonomy.TAXONOMY_VERSION,
        accounting.KEY: accounting.block("samples", n_samples, frame.height, {"unmapped_label": unlabelled}),
        accounting.BY_BATCH: _by_batch(dict(samples.select("sample_id", "batch_id").iter_rows()),
                                       frame["batch_id"].to_list(), rejects),
    })
    write_provenance(out, "annotate", workspace, inputs,
                     {"annotate": params.annotate.model_dump(mode="json"), "batches": params.batches})
