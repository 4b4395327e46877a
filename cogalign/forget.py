"""``cogalign forget``: remove a sample (or every sample of a patient) and everything derived from it.

Steps, all under one hold of the workspace lock (the rerun included):

1. resolve the targets in ``data/ingest/samples.parquet`` (a sample id, or every sample whose
   salted group hash matches ``--patient``), plus every raw file whose pixels are identical
   (``duplicates.parquet``);
2. delete their raw files (images and their seg-layout masks) from ``data/raw/<batch>/files``,
   drop their rows from the batch's ``bboxes.json``/``metadata.csv``, re-``dvc add`` the batch;
3. drop the clinician's rows (``clinician/labels.csv``, ``data/review/clinician_prompts.parquet`` and
   its stored masks) and the registry's champion predictions for those samples and their derived images;
4. rerun every stage the workspace had run (DVC reruns the per-batch ingest and everything
   downstream: masks, counterfactuals and models are rebuilt without the sample);
5. ``dvc gc --workspace --cloud``: cache (and remote) objects no longer referenced by the current
   workspace are deleted, so no stored copy of the pixels survives. Older revisions then can no
   longer be checked out with their data: that is the point;
6. append to ``data/registry/forgotten.json`` only counts, the date, and keyed digests of the raw
   files' content (so the retrain flow never takes the same file from a drop folder again). No
   sample id, name or patient id is kept.

Not covered (see docs/operations.md): git history of clinician-entered rows (ids only, no pixels)
and copies outside the workspace (drop folders, backups, other clones).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cogalign.lineage import raw_file_index
from cogalign.retrain import (
    CHAMPION,
    CHAMPION_PREDICTIONS,
    FORGOTTEN,
    content_digest,
    read_json,
    read_ledger,
    write_ledger,
)
from cogalign.runner import run_pipeline, workspace_lock
from cogalign.workspace import Workspace, WorkspaceError, track_raw_batch
from cogalign_core import contract, raw_layout, review, tables
from cogalign_core.io import atomic_write_json, atomic_write_text
from cogalign_core.privacy import salted_hash
from cogalign_core.raw_batch import read_batch


@dataclass
class ForgetOutcome:
    """Counts of what was removed (no identifiers)."""

    samples: int
    raw_files: int
    derived_images: int
    clinician_rows: int
    cache_objects_removed: int
    reran: list[str] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _samples(ws: Workspace) -> list[dict[str, Any]]:
    path = ws.root / contract.SAMPLES
    if not path.exists():
        raise WorkspaceError(f"{contract.SAMPLES} missing: run the pipeline before forgetting samples")
    return tables.read_rows(path)


def resolve_samples(ws: Workspace, sample_id: str | None, patient: str | None) -> list[dict[str, Any]]:
    """Sample rows to forget: one id, or all samples of a patient/sequence id (matched by salted hash)."""
    if (sample_id is None) == (patient is None):
        raise WorkspaceError("forget needs exactly one of SAMPLE_ID or --patient ID")
    rows = _samples(ws)
    if sample_id is not None:
        hit = [r for r in rows if r["sample_id"] == sample_id]
        if not hit:
            raise WorkspaceError(f"no sample {sample_id!r} in this workspace (see `cogalign lineage`)")
        return hit
    salt = ws.params.privacy.salt
    datasets = {r["dataset"] for r in rows}
    hashes = {salted_hash(raw_layout.group_text(ds, col, patient), salt)
              for ds in datasets for col in raw_layout.PATIENT_COLUMNS}
    hit = [r for r in rows if r.get("group_id_hash") in hashes]
    if not hit:
        raise WorkspaceError("no sample of that patient id in this workspace (ids are matched through the "
                             "salted group hash of the source metadata's patient/sequence column)")
    return hit


def _raw_files(ws: Workspace, targets: list[dict[str, Any]]) -> dict[str, list[str]]:
    """batch id -> raw files (relative to ``data/raw/<batch>/files``) holding the targets' pixels."""
    index = raw_file_index(ws)
    keys = {(t["batch_id"], t["name_hash"]) for t in targets}
    dup_path = ws.root / contract.DUPLICATES
    ids = {t["sample_id"] for t in targets}
    if dup_path.exists():  # identical pixels registered under another name are the same image
        keys |= {(d["batch_id"], d["name_hash"]) for d in tables.read_rows(dup_path) if d["duplicate_of"] in ids}
    out: dict[str, list[str]] = {}
    for batch, name_hash in sorted(keys):
        path = index.get((batch, name_hash))
        if path is None:
            raise WorkspaceError(f"a target's raw file in batch {batch} could not be found (was the salt changed?)")
        out.setdefault(batch, []).append(path.removeprefix(contract.raw_batch_files(batch) + "/"))
    return out


def _remove_raw(ws: Workspace, per_batch: dict[str, list[str]]) -> tuple[int, list[str]]:
    """Delete raw files, re-track their batches; return (files removed, keyed content digests)."""
    salt = ws.params.privacy.salt
    removed, digests = 0, []
    for batch, rels in per_batch.items():
        root = ws.root / contract.raw_batch(batch)
        files_root = ws.root / contract.raw_batch_files(batch)
        record = read_batch(ws.root / contract.RAW, batch)
        doomed = sorted({r for rel in rels for r in (rel, *raw_layout.companions(record, files_root, rel))})
        for rel in doomed:
            path = files_root / rel
            digests.append(content_digest(path, salt))
            size = path.stat().st_size
            path.unlink()
            removed += 1
            _adjust_batch_counts(root, size)
        for rel in rels:
            raw_layout.drop_references(record, files_root, rel)
        track_raw_batch(ws, batch, ws.params.privacy.push_raw)
    return removed, digests


def _adjust_batch_counts(batch_root: Path, size: int) -> None:
    meta_path = batch_root / contract.RAW_BATCH_RECORD
    meta = json.loads(meta_path.read_text())
    entries = meta.get("entries", {})
    entries["files"] = int(entries.get("files", 1)) - 1
    entries["bytes"] = int(entries.get("bytes", size)) - size
    meta["forgotten_files"] = int(meta.get("forgotten_files", 0)) + 1
    atomic_write_json(meta_path, meta)


def _derived_ids(ws: Workspace, ids: set[str]) -> set[str]:
    path = ws.root / contract.COUNTERFACTUALS
    if not path.exists():
        return set()
    return {c["sample_id"] for c in tables.read_rows(path) if c["parent_sample_id"] in ids}


def _drop_clinician_rows(ws: Workspace, ids: set[str]) -> int:
    """Remove the targets' clinician labels, prompts and stored clinician masks; return rows removed."""
    removed = 0
    labels = ws.root / contract.CLINICIAN_LABELS
    if labels.exists():
        lines = labels.read_text().splitlines(keepends=True)
        keep = [ln for i, ln in enumerate(lines) if i == 0 or ln.split(",", 1)[0].strip() not in ids]
        if len(keep) != len(lines):
            removed += len(lines) - len(keep)
            atomic_write_text(labels, "".join(keep))
    prompts = ws.root / review.PROMPTS_PATH
    if prompts.exists():
        rows = tables.read_rows(prompts)
        keep_rows = [r for r in rows if r["sample_id"] not in ids]
        if len(keep_rows) != len(rows):
            removed += len(rows) - len(keep_rows)
            still_used = {r.get("mask_path") for r in keep_rows}
            for r in rows:
                if r["sample_id"] in ids and r.get("mask_path") and r["mask_path"] not in still_used:
                    (ws.root / r["mask_path"]).unlink(missing_ok=True)
            tables.write_rows(keep_rows, prompts, review.CLINICIAN_PROMPTS, "clinician_prompts")
    return removed


def _drop_registry_rows(ws: Workspace, ids: set[str]) -> bool:
    """Remove the targets from the champion's recorded predictions; True when the champion saw them."""
    path = ws.root / CHAMPION_PREDICTIONS
    if not path.exists():
        return False
    from cogalign_core.evaluate import PREDICTIONS

    rows = tables.read_rows(path, "predictions")
    keep = [r for r in rows if r["parent_sample_id"] not in ids and r["sample_id"] not in ids]
    if len(keep) != len(rows):
        tables.write_rows(keep, path, PREDICTIONS, "predictions")
    champion = read_json(ws.root / CHAMPION, None)
    if champion is not None:
        # The champion's weights were trained with (or evaluated on) the forgotten data: flag it, so an
        # operator retrains; the next promotion decision replaces it.
        champion["trained_before_forget"] = True
        atomic_write_json(ws.root / CHAMPION, champion)
    return len(keep) != len(rows)


def _last_locked_stage(ws: Workspace) -> str | None:
    """The last stage (DAG order) the workspace has run; the rerun goes up to it (None = all stages)."""
    from cogalign.dag import pipeline_stages

    lock = ws.lock_stages()
    order = [s.name for s in pipeline_stages(ws.root)]
    ran = [n for n in order if n in lock]
    if not ran or ran[-1] == order[-1]:
        return None
    return ran[-1]


def _cache_object_count(ws: Workspace) -> int:
    cache = ws.root / ".dvc" / "cache"
    return sum(1 for p in cache.rglob("*") if p.is_file()) if cache.is_dir() else 0


def forget(workspace: str | os.PathLike[str], sample_id: str | None = None, patient: str | None = None,
           rerun: bool = True, wait: bool = True) -> ForgetOutcome:
    """Forget one sample or one patient's samples (module docstring). Returns counts only.

    Holds the workspace lock from the first removal to the forget record, rerun included, so no
    other command sees (or commits) a half-forgotten workspace. ``wait``: wait for another
    command holding the lock instead of refusing.
    """
    ws = Workspace.open(workspace)
    with workspace_lock(ws, wait=wait):
        return _forget_locked(ws, sample_id, patient, rerun)


def _forget_locked(ws: Workspace, sample_id: str | None, patient: str | None, rerun: bool) -> ForgetOutcome:
    targets = resolve_samples(ws, sample_id, patient)
    ids = {t["sample_id"] for t in targets}
    derived = _derived_ids(ws, ids)
    per_batch = _raw_files(ws, targets)
    n_raw, digests = _remove_raw(ws, per_batch)
    clinician_rows = _drop_clinician_rows(ws, ids)
    _drop_registry_rows(ws, ids | derived)
    # The ledger forgets the content; the block list (keyed digests only) keeps it out of future batches.
    ledger = read_ledger(ws)
    gone = set(digests)
    if gone & ledger.keys():
        write_ledger(ws, {k: v for k, v in ledger.items() if k not in gone})
    ws.commit(f"forget: {len(targets)} sample(s), {n_raw} raw file(s) removed")
    until = _last_locked_stage(ws)
    run = run_pipeline(ws.root, until=until, wait=True, commit=True) if rerun else None
    before = _cache_object_count(ws)
    gc_args = ["gc", "--workspace", "--force", "-q"]
    if ws.dvc("remote", "list").stdout.strip():
        gc_args.append("--cloud")
    ws.dvc(*gc_args)
    removed_objects = before - _cache_object_count(ws)
    record = read_json(ws.root / FORGOTTEN, {"format": 1, "removals": [], "blocked_content": []})
    entry = {"date": datetime.now(UTC).strftime("%Y-%m-%d"), "samples": len(targets), "raw_files": n_raw,
             "derived_images": len(derived), "clinician_rows": clinician_rows}
    record["removals"].append(entry)
    record["blocked_content"] = sorted(set(record["blocked_content"]) | set(digests))
    atomic_write_json(ws.root / FORGOTTEN, record)
    ws.commit("forget: record removal (counts only)", [str(FORGOTTEN)])
    return ForgetOutcome(len(targets), n_raw, len(derived), clinician_rows, removed_objects,
                         [str(s["stage"]) for s in run.stages if s["ran"]] if run else [], entry)
