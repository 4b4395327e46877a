"""Ingest stage ``ingest``: merge the ingested batches (``params.batches`` order) into ``data/ingest/``.

Writes ``samples.parquet`` (one row per unique image, first occurrence wins), ``quarantine.parquet``,
``duplicates.parquet`` (within- and across-batch exact duplicates), ``summary.json`` and
``provenance.json``. Tables flow as Arrow columns (no per-row Python objects), and near-duplicate
clusters come from a sub-quadratic search (:mod:`cogalign_core.near_duplicates`), so the merge stays
seconds at a million rows. Every row's values depend only on itself and the rows before it in
registration order: appending a batch never changes an existing row.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from cogalign_core import accounting, contract, tables
from cogalign_core.config import PipelineParams
from cogalign_core.io import atomic_write_json
from cogalign_core.near_duplicates import cluster_roots, hashes_from_hex
from cogalign_core.provenance import write_provenance

INGEST_DIR = Path(contract.INGEST)
BATCHES_DIR = Path(contract.INGEST_BATCHES)
BATCH_FILES = (contract.BATCH_RECORDS, contract.BATCH_QUARANTINE, contract.BATCH_DUPLICATES, contract.SUMMARY)


def _counts(column: pa.Array) -> dict[str, int]:
    """Sorted value counts of a (dictionary or string) column."""
    if len(column) == 0:
        return {}
    vc = pc.value_counts(column.cast(pa.string()) if pa.types.is_dictionary(column.type) else column)
    return dict(sorted(zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist(), strict=True)))


def merge_batches(records: list[pa.Table], batch_ids: list[str], max_distance: int
                  ) -> tuple[pa.Table, pa.Table, list[int]]:
    """(samples, across-batch duplicates, per-batch duplicate counts) of the batches' record tables.

    Within a batch records are sorted by sample_id; the first occurrence of a sample id in batch
    order is kept, later ones become ``duplicates`` rows naming it. ``near_dup_cluster`` is filled.
    """
    sorted_tables = [t.sort_by("sample_id") for t in records]
    allrec = pa.concat_tables(sorted_tables) if sorted_tables else tables.SAMPLES.empty_table()
    keep = pl.from_arrow(allrec.select(["sample_id"])).select(  # type: ignore[union-attr]
        pl.col("sample_id").is_first_distinct()).to_series().to_numpy()
    batch_of = np.repeat(np.arange(len(records)), [len(t) for t in records])
    cross = [int(n) for n in np.bincount(batch_of[~keep], minlength=len(records))]
    dup_rows = allrec.filter(pa.array(~keep))
    duplicates = pa.table({"batch_id": dup_rows.column("batch_id").cast(pa.string()),
                           "name_hash": dup_rows.column("name_hash"), "duplicate_of": dup_rows.column("sample_id")})
    samples = allrec.filter(pa.array(keep))
    roots = cluster_roots(hashes_from_hex(samples.column("phash").to_pylist()), max_distance)
    clusters = pc.take(samples.column("sample_id"), pa.array(roots))
    samples = samples.set_column(samples.schema.get_field_index("near_dup_cluster"), "near_dup_cluster", clusters)
    return samples, duplicates, cross


def run_stage(workspace: Path, params: PipelineParams, item: str | None = None) -> None:
    """DVC stage ``ingest``: merge ingested batches (``params.batches`` order) into ``data/ingest/``."""
    ws = Path(workspace)
    records, quarantines, dups, summaries = [], [], [], []
    inputs: list[str] = []
    for batch_id in params.batches:
        bdir = ws / BATCHES_DIR / batch_id
        if not (bdir / contract.SUMMARY).exists():
            raise FileNotFoundError(f"{bdir}/summary.json not found: run the ingest_batch stage for {batch_id} first")
        inputs += [f"{BATCHES_DIR.as_posix()}/{batch_id}/{n}" for n in BATCH_FILES]
        summaries.append(json.loads((bdir / contract.SUMMARY).read_text()))
        records.append(tables.read_table(bdir / contract.BATCH_RECORDS, "samples").cast(tables.SAMPLES))
        quarantines.append(tables.read_table(bdir / contract.BATCH_QUARANTINE, "quarantine").cast(tables.QUARANTINE))
        dups.append(tables.read_table(bdir / contract.BATCH_DUPLICATES, "duplicates").cast(tables.DUPLICATES))
    samples, cross_dups, cross = merge_batches(records, list(params.batches), params.ingest.phash_max_distance)
    per_batch: dict[str, dict[str, Any]] = {}
    for batch_id, bsum, rec, bq, bd, n_cross in zip(params.batches, summaries, records, quarantines, dups, cross,
                                                      strict=True):
        stats: dict[str, Any] = {"seen": bsum["seen"], "ingested": len(rec) - n_cross,
                                 "duplicates": len(bd) + n_cross, "duplicates_within_batch": len(bd),
                                 "duplicates_across_batches": n_cross, "quarantined": len(bq)}
        stats["conservation_ok"] = stats["seen"] == stats["ingested"] + stats["duplicates"] + stats["quarantined"]
        if not stats["conservation_ok"]:
            raise RuntimeError(f"ingest merge: conservation violated for batch {batch_id}: {stats}")
        per_batch[batch_id] = stats
    keys = ("seen", "ingested", "duplicates", "duplicates_within_batch", "duplicates_across_batches", "quarantined")
    total: dict[str, Any] = {k: sum(b[k] for b in per_batch.values()) for k in keys}
    total["conservation_ok"] = total["seen"] == total["ingested"] + total["duplicates"] + total["quarantined"]
    if not total["conservation_ok"]:
        raise RuntimeError(f"ingest merge: conservation violated: {total}")
    quarantine = pa.concat_tables(quarantines) if quarantines else tables.QUARANTINE.empty_table()
    # Within-batch duplicates (batch order), then across-batch ones (batch order).
    duplicates = pa.concat_tables([*dups, cross_dups.cast(tables.DUPLICATES)]) if dups else \
        tables.DUPLICATES.empty_table()
    out = ws / INGEST_DIR
    tables.write_table(samples, ws / contract.SAMPLES, tables.SAMPLES, "samples")
    tables.write_table(quarantine, ws / contract.QUARANTINE, tables.QUARANTINE, "quarantine")
    tables.write_table(duplicates, ws / contract.DUPLICATES, tables.DUPLICATES, "duplicates")
    sizes = pl.from_arrow(samples.select(["near_dup_cluster"])).group_by("near_dup_cluster").len()["len"]  # type: ignore[union-attr]
    summary = {
        "batches": per_batch, "total": total,
        "near_duplicate_clusters": sizes.len(),
        "samples_in_multi_member_clusters": int(sizes.filter(sizes > 1).sum()),
        "quarantined_by_reason": _counts(quarantine.column("reason")),
        accounting.KEY: accounting.block("samples", samples.num_rows + total["duplicates_across_batches"],
                                         samples.num_rows,
                                         {"duplicate_across_batches": total["duplicates_across_batches"]}),
    }
    atomic_write_json(ws / contract.INGEST_SUMMARY, summary)
    write_provenance(out, "ingest", ws, inputs, {"batches": list(params.batches),
                                                 "ingest.phash_max_distance": params.ingest.phash_max_distance})
