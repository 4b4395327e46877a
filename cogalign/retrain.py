"""Scheduled retraining: new files in a drop folder -> a raw batch -> the pipeline -> a promotion decision.

One :func:`retrain_once` call:

1. scans the drop folder and keeps the image files whose *content* was never seen before (the
   ledger ``data/registry/drop_ledger.json`` holds keyed hashes of every file ever taken, never
   names; files of forgotten samples are refused by ``data/registry/forgotten.json``);
2. copies the new files (plus the folder's metadata files, so layouts stay whole) into a staging
   folder and registers it as one new raw batch (:func:`cogalign.workspace.register`). A file that
   fails validation does not block the others: the ingest stage quarantines it with a reason;
3. runs the pipeline with :func:`cogalign.runner.run_pipeline` (DVC reruns only what changed).
   Images without masks or prompts land in the mask stage's review queue and join the training
   data once a clinician's prompts are imported (`cogalign review import`; the next run reruns them);
4. when the evaluation ran, compares the challenger (``registry.promotion.candidate``) with the
   champion on the same prompts (the champion's recorded test prompts that the new evaluation also
   holds), applies :func:`cogalign_core.promotion.decide`, and records the decision with both
   models' metrics and lineage under ``data/registry/`` (git-tracked JSON, atomic writes).

No new file and nothing stale: a fast no-op (no Prefect run, no commit).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cogalign.runner import is_up_to_date, run_pipeline, workspace_lock
from cogalign.workspace import Workspace, WorkspaceError, register
from cogalign_core import contract, metrics, tables
from cogalign_core.evaluate import scored_rows
from cogalign_core.io import atomic_write_json, sha256_file
from cogalign_core.privacy import salted_hash
from cogalign_core.promotion import decide
from cogalign_core.raw_layout import IMAGE_SUFFIXES

REGISTRY_DIR = Path(contract.REGISTRY)
LEDGER = Path(contract.DROP_LEDGER)
FORGOTTEN = Path(contract.FORGOTTEN)
CHAMPION = Path(contract.CHAMPION)
CHAMPION_PREDICTIONS = Path(contract.CHAMPION_PREDICTIONS)
DECISIONS_DIR = Path(contract.DECISIONS)
PREDICTIONS = Path(contract.PREDICTIONS)
ANNOTATIONS = Path(contract.ANNOTATIONS)
DIGEST_LENGTH = 32
PromptKey = tuple[str, str, str, str]


# ------------------------------------------------------------------------------------ drop folder
@dataclass
class DropScan:
    """What the drop folder holds, judged against the ledger. Paths are relative to the drop folder."""

    new: dict[str, str] = field(default_factory=dict)          # rel path -> keyed content digest
    already_seen: int = 0
    withdrawn: int = 0                                           # content of a forgotten sample
    duplicates_in_drop: int = 0                                  # same bytes twice in this scan
    not_images: list[str] = field(default_factory=list)          # metadata / other files (copied along)
    skipped: dict[str, str] = field(default_factory=dict)        # rel path -> reason (symlink, unreadable)

    def summary(self) -> dict[str, Any]:
        """Counts only: drop-folder names can carry patient information and must not reach git."""
        return {"new": len(self.new), "already_seen": self.already_seen, "withdrawn": self.withdrawn,
                "duplicates_in_drop": self.duplicates_in_drop, "metadata_files": len(self.not_images),
                "skipped": len(self.skipped),
                "skipped_by_reason": _count(self.skipped.values())}


def _count(values: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return dict(sorted(out.items()))


def content_digest(path: Path, salt: str) -> str:
    """Keyed digest of a file's bytes (HMAC of its SHA-256): stable per workspace, meaningless outside it."""
    return salted_hash(sha256_file(path), salt, DIGEST_LENGTH)


def read_json(path: Path, default: Any) -> Any:
    return json.loads(path.read_text()) if path.exists() else default


def read_ledger(ws: Workspace) -> dict[str, str]:
    """Keyed content digest -> raw batch id of every drop-folder file taken so far."""
    return dict(read_json(ws.root / LEDGER, {"files": {}})["files"])


def write_ledger(ws: Workspace, ledger: dict[str, str]) -> None:
    """Write the drop ledger (the one place that knows its format)."""
    atomic_write_json(ws.root / LEDGER, {"format": 1, "files": dict(sorted(ledger.items()))})


def withdrawn_digests(ws: Workspace) -> set[str]:
    """Keyed content digests of forgotten raw files (they are never taken again)."""
    return set(read_json(ws.root / FORGOTTEN, {}).get("blocked_content", []))


def scan_drop_folder(ws: Workspace, drop: Path) -> DropScan:
    """Walk ``drop`` (no symlinks followed, hidden entries ignored) and sort files into new / seen / skipped."""
    if not drop.is_dir():
        raise WorkspaceError(f"drop folder {drop} does not exist or is not a directory")
    salt = ws.params.privacy.salt
    ledger, blocked = read_ledger(ws), withdrawn_digests(ws)
    scan = DropScan()
    taken: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(drop, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__")))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            rel = path.relative_to(drop).as_posix()
            if path.is_symlink() or not path.is_file():
                scan.skipped[rel] = "symlink_not_followed" if path.is_symlink() else "not_a_regular_file"
                continue
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                scan.not_images.append(rel)
                continue
            try:
                digest = content_digest(path, salt)
            except OSError:
                scan.skipped[rel] = "unreadable"
                continue
            if digest in blocked:
                scan.withdrawn += 1
            elif digest in ledger:
                scan.already_seen += 1
            elif digest in taken:
                scan.duplicates_in_drop += 1
            else:
                taken.add(digest)
                scan.new[rel] = digest
    return scan


def stage_new_files(scan: DropScan, drop: Path, staging: Path) -> None:
    """Copy the new files and the metadata files into ``staging``, keeping relative paths.

    Metadata files (metadata.csv, bboxes.json, a manifest) are copied whole so the new images keep
    their labels and groups; rows for images not in this batch are counted by ingest, not lost.
    A seg layout keeps both ``images/`` and ``masks/`` folders so it is still recognised.
    """
    for rel in [*scan.new, *scan.not_images]:
        dst = staging / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(drop / rel, dst)
    for seg_root in {p.parent for p in staging.rglob("images") if p.is_dir()}:
        if (drop / seg_root.relative_to(staging) / "masks").is_dir():
            (seg_root / "masks").mkdir(exist_ok=True)


def take_new_files(ws: Workspace, drop: Path) -> tuple[str | None, DropScan]:
    """Scan ``drop``; register its new files as one raw batch and record them in the ledger.

    Returns ``(batch_id or None when nothing is new, scan)``. Holds the workspace lock.
    """
    with workspace_lock(ws, wait=True):
        scan = scan_drop_folder(ws, drop)
        if not scan.new:
            return None, scan
        with tempfile.TemporaryDirectory(prefix="cogalign-drop-") as tmp:
            staging = Path(tmp) / drop.name
            staging.mkdir()
            stage_new_files(scan, drop, staging)
            batch = register(ws, staging, layout=ws.params.registry.drop_layout, role="train",
                             message=f"retrain: {len(scan.new)} new files from the drop folder")
        ledger = read_ledger(ws)
        ledger.update({digest: batch for digest in scan.new.values()})
        write_ledger(ws, ledger)
        ws.commit(f"retrain: drop ledger records batch {batch}", [str(LEDGER)])
        return batch, scan


# ------------------------------------------------------------------------------ champion vs challenger
def prompt_key(row: dict[str, Any]) -> PromptKey:
    """Identity of a prompt, independent of the model that answered it."""
    return (row["section"], row["condition"], row["parent_sample_id"], row["sample_id"])


def _lock_md5(lock: dict[str, Any], out_path: str) -> str | None:
    for entry in lock.values():
        for out in entry.get("outs", []):
            if out["path"] == out_path:
                return out.get("md5")
    return None


def compact_lineage(ws: Workspace, target: str) -> dict[str, Any]:
    """The lineage of ``target`` without raw file names (counts per split instead): safe for git."""
    from cogalign.lineage import artifact_lineage

    rec = artifact_lineage(ws, target)
    return {
        "target": rec["target"], "revision": rec["revision"], "flow_run_id": rec["flow_run_id"],
        "raw_batches": rec["raw_batches"],
        "raw_files_per_split": {s: len(f) for s, f in (rec.get("raw_files") or {}).items()},
        "chain": [{"stage": st["stage"], "code": st["code"], "outs": st["outs"]} for st in rec["chain"]],
    }


def _summariser(ws: Workspace, metric_set: list[Any]) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    """Metric summary of prediction rows with the evaluation's baselines (read once, applied to each model)."""
    ev = ws.params.evaluate
    train = [a for a in tables.read_rows(ws.root / ANNOTATIONS) if a["split"] == "train"]
    majority = metrics.majority_answer(train)
    return lambda rows: metrics.summarise(rows, majority, ev.constant_answer, ev.bootstrap_resamples, ev.seed,
                                          metrics=metric_set)


def compare_with_champion(ws: Workspace) -> dict[str, Any]:
    """Gate the freshly evaluated candidate against the recorded champion on their common prompts.

    Returns the decision record (not yet written). Raises :class:`WorkspaceError` when the
    evaluation output is missing or does not hold the candidate model.
    """
    p = ws.params.registry.promotion
    if not (ws.root / PREDICTIONS).exists():
        raise WorkspaceError(f"{PREDICTIONS} missing: the evaluate stage has not run")
    challenger_rows = [r for r in tables.read_rows(ws.root / PREDICTIONS, "predictions")
                       if r["model"] == p.candidate and r["section"] == p.section]
    if not challenger_rows:
        raise WorkspaceError(f"the evaluation holds no {p.section!r} predictions of model {p.candidate!r}: "
                             "add it to evaluate.models or change registry.promotion")
    champion = read_json(ws.root / CHAMPION, None)
    champion_rows = (tables.read_rows(ws.root / CHAMPION_PREDICTIONS, "predictions")
                     if champion and (ws.root / CHAMPION_PREDICTIONS).exists() else [])
    common = {prompt_key(r) for r in challenger_rows} & {prompt_key(r) for r in champion_rows}
    ch_common = scored_rows([r for r in challenger_rows if prompt_key(r) in common])
    cp_common = scored_rows([r for r in champion_rows if prompt_key(r) in common])
    ch_all = scored_rows(challenger_rows)
    # One metric list (macro-F1 class set) for both models, so their values are comparable.
    metric_set = metrics.standard_metrics([*ch_all, *scored_rows(champion_rows)])
    lock = ws.lock_stages()
    summarise = _summariser(ws, metric_set)
    challenger_metrics = summarise(ch_all)
    record: dict[str, Any] = {
        "section": p.section, "gate": p.model_dump(mode="json"),
        "comparison": {"champion_prompts": len(champion_rows), "challenger_prompts": len(challenger_rows),
                       "common_prompts": len(common)},
        "challenger": {"model": p.candidate, "revision": ws.revision(),
                       "model_md5": _lock_md5(lock, contract.stage_dir(p.candidate)),
                       "evaluation_md5": _lock_md5(lock, contract.EVALUATE),
                       "metrics_all_prompts": challenger_metrics,
                       "lineage": compact_lineage(ws, contract.model_dir(p.candidate))},
        "champion": None,
    }
    if champion is None:
        decision = decide(None, challenger_metrics, p)
    elif len(common) < p.min_common_prompts:
        decision = decide(champion["metrics"], challenger_metrics, p)
        decision = type(decision)(False, [f"only {len(common)} prompts in common with the champion's test prompts "
                                          f"(registry.promotion.min_common_prompts = {p.min_common_prompts})"],
                                  decision.checks)
        record["champion"] = {**champion, "metrics_common_prompts": None}
    else:
        champion_metrics = summarise(cp_common)
        challenger_common = summarise(ch_common)
        decision = decide(champion_metrics, challenger_common, p)
        record["champion"] = {**champion, "metrics_common_prompts": champion_metrics}
        record["challenger"]["metrics_common_prompts"] = challenger_common
    record.update(decision.to_dict())
    return record


def decision_id(ws: Workspace) -> str:
    """Next decision number, zero-padded (``0001``...)."""
    d = ws.root / DECISIONS_DIR
    numbers = [int(p.stem) for p in d.glob("*.json") if p.stem.isdigit()] if d.is_dir() else []
    return f"{max(numbers, default=0) + 1:04d}"


def last_decision(ws: Workspace) -> dict[str, Any] | None:
    d = ws.root / DECISIONS_DIR
    files = sorted(p for p in d.glob("*.json") if p.stem.isdigit()) if d.is_dir() else []
    return json.loads(files[-1].read_text()) if files else None


def record_decision(ws: Workspace, record: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
    """Write the decision (and on promotion the new champion + its test predictions); commit them."""
    did = decision_id(ws)
    record = {"id": did, "decided_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), **record, **(extra or {})}
    path = ws.root / DECISIONS_DIR / f"{did}.json"
    atomic_write_json(path, record)
    if record["promote"]:
        ch = record["challenger"]
        atomic_write_json(ws.root / CHAMPION, {
            "decision": did, "model": ch["model"], "section": record["section"], "revision": ch["revision"],
            "model_md5": ch["model_md5"], "evaluation_md5": ch["evaluation_md5"],
            "metrics": ch["metrics_all_prompts"]})
        rows = [r for r in tables.read_rows(ws.root / PREDICTIONS, "predictions")
                if r["model"] == ch["model"] and r["section"] == record["section"]]
        from cogalign_core.evaluate import PREDICTIONS as PREDICTIONS_SCHEMA

        tables.write_rows(rows, ws.root / CHAMPION_PREDICTIONS, PREDICTIONS_SCHEMA, "predictions")
    verdict = "promoted" if record["promote"] else "not promoted"
    ws.commit(f"registry: decision {did}: {record['challenger']['model']} {verdict}", [str(REGISTRY_DIR)])
    return path


# ------------------------------------------------------------------------------------ the whole step
@dataclass
class RetrainOutcome:
    """What one retrain did. ``decision`` is the recorded decision (None when no evaluation ran)."""

    noop: bool
    batch: str | None = None
    drop: dict[str, Any] = field(default_factory=dict)
    new_batch_ingest: dict[str, Any] | None = None
    ran_stages: list[str] = field(default_factory=list)
    decision: dict[str, Any] | None = None
    decision_path: str | None = None
    note: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _batch_ingest_summary(ws: Workspace, batch: str) -> dict[str, Any] | None:
    path = ws.root / contract.ingest_batch(batch) / contract.SUMMARY
    if not path.exists():
        return None
    s = json.loads(path.read_text())
    return {k: s.get(k) for k in ("seen", "ingested", "duplicates_within_batch", "quarantined",
                                  "quarantined_by_reason", "with_mask")}


def retrain_once(workspace: str | os.PathLike[str], drop_folder: str | os.PathLike[str],
                 until: str | None = None) -> RetrainOutcome:
    """One scheduled retraining step (module docstring). ``until`` stops the pipeline early (tests, triage).

    Holds the workspace lock throughout (waiting for another command first), so the new batch, the
    run that processes it and the decision are never interleaved with another ingest or forget.
    """
    ws = Workspace.open(workspace)
    with workspace_lock(ws, wait=True):
        return _retrain_locked(ws, drop_folder, until)


def _retrain_locked(ws: Workspace, drop_folder: str | os.PathLike[str], until: str | None) -> RetrainOutcome:
    start = time.perf_counter()
    batch, scan = take_new_files(ws, Path(drop_folder).resolve())
    outcome = RetrainOutcome(noop=False, batch=batch, drop=scan.summary())
    ws.update_fingerprints()  # a code upgrade alone is new work too
    if batch is None and is_up_to_date(ws, until):
        outcome.noop = True
        outcome.note = "no new files in the drop folder and the pipeline is up to date"
        outcome.seconds = time.perf_counter() - start
        return outcome
    run = run_pipeline(ws.root, until=until, wait=True)
    outcome.ran_stages = [str(s["stage"]) for s in run.stages if s["ran"]]
    if batch is not None:
        outcome.new_batch_ingest = _batch_ingest_summary(ws, batch)
    if "evaluate" not in outcome.ran_stages:
        outcome.note = ("the evaluation did not run (" + (f"stopped after {until}" if until else "evaluate up to date")
                        + "): no promotion decision")
        outcome.seconds = time.perf_counter() - start
        return outcome
    outcome.decision, outcome.decision_path = decide_and_record(ws, extra={
        "new_batch": batch, "drop": scan.summary(), "new_batch_ingest": outcome.new_batch_ingest,
        "flow_run_id": run.flow_run_id})
    outcome.seconds = time.perf_counter() - start
    return outcome


def decide_and_record(ws: Workspace, extra: dict[str, Any] | None = None) -> tuple[dict[str, Any], str]:
    """Compare the current evaluation's candidate with the champion and record the decision (locked)."""
    with workspace_lock(ws, wait=True):
        record = compare_with_champion(ws)
        path = record_decision(ws, record, extra)
        return json.loads(path.read_text()), str(path.relative_to(ws.root))
