"""Ingest stage ``ingest_batch``: per-batch decode/validate/store (the merge is :mod:`cogalign_core.ingest_merge`).

``run_batch_stage`` turns one registered raw batch (``data/raw/<batch>/``, see :mod:`raw_batch`) into
``data/ingest/batches/<batch>/``:

- ``images/<h2>/<sha>.{jpg,png}``: every decodable image as 8-bit RGB without metadata
  (content-addressed by the stored bytes; see :mod:`imaging` for the stored forms);
- ``masks/<h2>/<sha>.png``: validated {0,255} single-channel masks of the same size;
- ``records.parquet`` (``tables.SAMPLES``; ``near_dup_cluster`` is filled by the merge),
  ``quarantine.parquet`` (``tables.QUARANTINE``), ``duplicates.parquet`` (``tables.DUPLICATES``,
  exact duplicates inside the batch), ``summary.json`` and ``provenance.json``.

Planning (layout -> tasks) is :mod:`cogalign_core.ingest_plan`; the per-file worker is
:mod:`cogalign_core.ingest_decode`. A batch is immutable once registered, so this stage runs once
per batch (DVC ``foreach``): adding a batch never reruns another.

Units counted: every image file in an item location of the layout (or every manifest row), every
entry registration could not copy (symlinks, unreadable files), and every rejected metadata row
(``metadata.csv`` / ``bboxes.json``). ``seen = ingested + duplicates + quarantined`` is checked
and recorded; a violation is a bug and raises. Files outside the layout's item locations
(READMEs, ``__init__.py``, hidden files) are not units; they are counted as ``not_in_layout``.

Privacy: original paths stay in the raw zone. Outputs hold salted hashes of names, sequence and
patient ids (:func:`privacy.salted_hash`); quarantine rows hold the name hash, the reason and a detail
with the file's names removed (:func:`privacy.redact_names`). ``cogalign quarantine`` maps the hashes
back to the raw files locally (:attr:`ingest_plan.BatchPlan.names`).
"""

from __future__ import annotations

import functools
from collections import Counter
from pathlib import Path
from typing import Any

from cogalign_core import accounting, contract, tables
from cogalign_core.config import PipelineParams
from cogalign_core.executor import default_workers, map_items
from cogalign_core.ingest_decode import DecodeSettings, process_item
from cogalign_core.ingest_plan import BatchPlan, _quarantine_row, plan_batch
from cogalign_core.io import atomic_dir, atomic_write_json
from cogalign_core.privacy import salted_hash
from cogalign_core.provenance import write_provenance
from cogalign_core.raw_batch import FILES_DIR, read_batch

INGEST_DIR = Path(contract.INGEST)
RAW_DIR = Path(contract.RAW)
BATCHES_DIR = Path(contract.INGEST_BATCHES)


def run_batch_stage(workspace: Path, params: PipelineParams, item: str | None) -> None:
    """DVC stage ``ingest_batch@<item>``: ingest raw batch ``item`` into ``data/ingest/batches/<item>/``."""
    if not item:
        raise ValueError("ingest_batch needs a batch id (--item BATCH)")
    ws = Path(workspace)
    salt = params.privacy.salt
    salted_hash("check", salt)  # fail early and clearly on an empty salt
    batch = read_batch(ws / RAW_DIR, item)
    files_root = ws / RAW_DIR / item / FILES_DIR
    plan = plan_batch(batch, files_root, salt)
    out_final = ws / BATCHES_DIR / item
    cfg = params.ingest
    with atomic_dir(out_final) as tmp:
        settings = DecodeSettings(out_dir=str(tmp), max_pixels=cfg.max_pixels, min_side=cfg.min_side,
                                  mask_threshold=cfg.mask_threshold)
        results = map_items(functools.partial(process_item, settings), plan.tasks,
                            desc=f"ingest {item}", chunksize=_chunksize(len(plan.tasks)))
        records, quarantine, duplicates, counts = _collect(batch, plan, results, salt)
        _remove_unreferenced(tmp, records, results)
        tables.write_rows(records, tmp / contract.BATCH_RECORDS, tables.SAMPLES, "samples")
        tables.write_rows(quarantine, tmp / contract.BATCH_QUARANTINE, tables.QUARANTINE, "quarantine")
        tables.write_rows(duplicates, tmp / contract.BATCH_DUPLICATES, tables.DUPLICATES, "duplicates")
        atomic_write_json(tmp / contract.SUMMARY, _batch_summary(batch, plan, counts, records, quarantine, duplicates))
        write_provenance(tmp, "ingest_batch", ws, [contract.raw_batch_record(item)],
                         {"ingest": cfg.model_dump(mode="json")}, extra={"batch_id": item})


def _chunksize(n_tasks: int, workers: int = 0) -> int:
    """Items per pool task: ~4 chunks per worker (amortises IPC), at most 16 (keeps the tail short)."""
    return max(1, min(16, n_tasks // (4 * default_workers(workers))))


def _collect(batch: dict[str, Any], plan: BatchPlan, results: list[dict[str, Any]], salt: str
             ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]], Counter[str]]:
    batch_id = batch["batch_id"]
    quarantine = list(plan.quarantine)
    records: dict[str, dict[str, Any]] = {}
    duplicates: list[dict[str, Any]] = []
    counts: Counter[str] = Counter()
    prefix = f"{BATCHES_DIR.as_posix()}/{batch_id}/"
    for task, res in zip(plan.tasks, results, strict=True):
        if not res["ok"]:
            quarantine.append(_quarantine_row(batch_id, task.rel_path, salt, res["kind"], res["reason"], res["detail"],
                                              task.mask_rel))
            counts["internal_errors"] += int(bool(res.get("internal_error")))
            continue
        sid = res["sample_id"]
        if sid in records:
            duplicates.append({"batch_id": batch_id, "name_hash": task.name_hash, "duplicate_of": sid})
            continue
        counts["boxes_dropped"] += res["boxes_dropped"]
        counts["binarised_masks"] += int(res["mask_binarise_threshold"] is not None)
        records[sid] = {
            "sample_id": sid, "batch_id": batch_id, "role": batch["role"], "dataset": task.dataset,
            "class_label": task.class_label, "name_hash": task.name_hash, "group_id_hash": task.group_id_hash,
            "image_path": prefix + res["image_rel"], "image_sha256": res["image_sha256"],
            "width": res["width"], "height": res["height"], "source_format": res["source_format"],
            "source_mode": res["source_mode"], "metadata_stripped": res["metadata_stripped"], "phash": res["phash"],
            "near_dup_cluster": None,
            "mask_path": prefix + res["mask_rel"] if res["mask_rel"] else None, "mask_sha256": res["mask_sha256"],
            "mask_binarise_threshold": res["mask_binarise_threshold"],
            "mask_area_fraction": res["mask_area_fraction"], "boxes": res["boxes"],
            "kvasir_sessile": task.kvasir_sessile,
            "labels": {**batch.get("labels", {}), **(task.labels or {})} or None,
        }
    rows = sorted(records.values(), key=lambda r: r["sample_id"])
    quarantine.sort(key=lambda q: (q["name_hash"], q["kind"], q["reason"]))
    duplicates.sort(key=lambda d: (d["duplicate_of"], d["name_hash"]))
    return rows, quarantine, duplicates, counts


def _remove_unreferenced(out_dir: Path, records: list[dict[str, Any]], results: list[dict[str, Any]]) -> None:
    """Delete stored files only duplicates referenced (their first copy keeps the sample).

    Only the files the workers reported are candidates, so no directory walk is needed.
    """
    keep = {r["image_path"].split("/", 4)[-1] for r in records}
    keep |= {r["mask_path"].split("/", 4)[-1] for r in records if r["mask_path"]}
    written = {res[k] for res in results if res["ok"] for k in ("image_rel", "mask_rel") if res.get(k)}
    for rel in sorted(written - keep):
        (out_dir / rel).unlink(missing_ok=True)


def _batch_summary(batch: dict[str, Any], plan: BatchPlan, counts: Counter[str], records: list[dict[str, Any]],
                   quarantine: list[dict[str, Any]], duplicates: list[dict[str, Any]]) -> dict[str, Any]:
    c = plan.counts
    seen_parts = {
        "image_files": c["image_files"],
        "manifest_rows": c["manifest_rows"],
        "metadata_rows_rejected": c["metadata_rows_rejected"],
        "entries": c["entries"],
    }
    seen = sum(seen_parts.values())
    out = len(records) + len(duplicates) + len(quarantine)
    summary = {
        "batch_id": batch["batch_id"], "layout": batch["layout"], "role": batch["role"],
        "datasets": {ds["path"] or ".": ds["dataset"] for ds in batch["datasets"]},
        "seen": seen, "seen_by_unit": seen_parts,
        "ingested": len(records), "duplicates_within_batch": len(duplicates), "quarantined": len(quarantine),
        "quarantined_by_reason": dict(sorted(Counter(q["reason"] for q in quarantine).items())),
        "quarantined_by_kind": dict(sorted(Counter(q["kind"] for q in quarantine).items())),
        "with_mask": sum(1 for r in records if r["mask_path"]),
        "binarised_masks": counts["binarised_masks"],
        "metadata_stripped": sum(1 for r in records if r["metadata_stripped"]),
        "boxes_dropped": counts["boxes_dropped"],
        "orphan_masks": c["orphan_masks"], "extra_masks_per_image": c["extra_masks_per_image"],
        "metadata_rows_unmatched": c["metadata_rows_unmatched"], "not_in_layout": c["not_in_layout"],
        "internal_errors": counts["internal_errors"],
        "conservation": {"seen": seen, "ingested_plus_duplicates_plus_quarantined": out, "ok": seen == out},
    }
    if seen == out:
        summary[accounting.KEY] = accounting.block(
            "files", seen, len(records), {**summary["quarantined_by_reason"], "duplicate": len(duplicates)})
    if seen != out:
        raise RuntimeError(f"batch {batch['batch_id']}: conservation violated: seen {seen} != {out} "
                           f"(ingested {len(records)} + duplicates {len(duplicates)} + quarantined {len(quarantine)})")
    return summary
