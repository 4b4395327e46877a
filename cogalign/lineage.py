"""Lineage audit: which raw images, params and code made a model or a metric, and what a sample
became. Everything is read from the workspace itself: ``dvc.lock`` (stage chain and hashes), the
code fingerprints, provenance records, git history (revision, flow-run id) and the tables.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cogalign.dag import paths_overlap
from cogalign.workspace import Workspace, WorkspaceError
from cogalign_core import contract, tables
from cogalign_core.privacy import salted_hash

REDACTED = "<redacted>"
# Which annotation splits each stage learns from or scores, and whether it reads counterfactuals: the
# contract's deps say it (evaluate scores the test sections).
STAGE_SPLITS: dict[str, tuple[str, ...]] = {
    stage: splits for stage in contract.STAGES if (splits := contract.consumed_splits(stage))}


def _lock(ws: Workspace) -> dict[str, Any]:
    lock = ws.lock_stages()
    if not lock:
        raise WorkspaceError(f"{ws.root / 'dvc.lock'} has no stage yet: run the pipeline first (`cogalign run`)")
    return lock


def _redact(params: dict[str, Any]) -> dict[str, Any]:
    """Params with the pseudonymisation key hidden (it would let a reader re-identify file names)."""
    out = json.loads(json.dumps(params))
    if isinstance(out.get("privacy"), dict) and "salt" in out["privacy"]:
        out["privacy"]["salt"] = REDACTED
    if "privacy.salt" in out:  # dvc.lock records a dotted key when dvc.yaml names privacy.salt
        out["privacy.salt"] = REDACTED
    return out


def producing_stage(lock: dict[str, Any], path: str) -> str | None:
    """The stage whose output is ``path`` or contains it."""
    for name, entry in lock.items():
        for out in entry.get("outs", []):
            if path == out["path"] or path.startswith(out["path"].rstrip("/") + "/"):
                return name
    return None


def stage_chain(lock: dict[str, Any], stage: str) -> list[str]:
    """``stage`` and all stages upstream of it, dependencies first."""
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        for dep in lock[name].get("deps", []):
            for other, entry in lock.items():
                if other != name and any(paths_overlap(dep["path"], o["path"]) for o in entry.get("outs", [])):
                    visit(other)
        order.append(name)

    visit(stage)
    return order


def _stage_record(ws: Workspace, lock: dict[str, Any], name: str) -> dict[str, Any]:
    entry = lock[name]
    base = name.split("@", 1)[0]
    fingerprint_path = ws.root / contract.fingerprint(base)
    fingerprint = json.loads(fingerprint_path.read_text()) if fingerprint_path.exists() else {}
    record: dict[str, Any] = {
        "stage": name,
        "cmd": entry.get("cmd"),
        "deps": [{"path": d["path"], "md5": d.get("md5")} for d in entry.get("deps", [])],
        "outs": [{"path": o["path"], "md5": o.get("md5")} for o in entry.get("outs", [])],
        "params": _redact(entry.get("params", {}).get("params.yaml", {})),
        "code": {"package_version": fingerprint.get("package_version"),
                 "sources_sha256": _digest(json.dumps(fingerprint.get("sources", {}), sort_keys=True))},
    }
    for out in entry.get("outs", []):
        prov = ws.root / out["path"] / contract.PROVENANCE
        if prov.exists():
            record["packages"] = json.loads(prov.read_text()).get("packages")
    return record


def _digest(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


def _revision(ws: Workspace) -> dict[str, Any]:
    """The last commit that recorded dvc.lock, its flow-run id, and whether the lock is dirty."""
    out = ws.git("log", "-1", "--format=%H%x00%B", "--", "dvc.lock", check=False)
    rev, _, message = out.stdout.partition("\x00")
    flow_run = next((line.split(":", 1)[1].strip() for line in message.splitlines()
                     if line.startswith("flow-run-id:")), None)
    dirty = ws.git("status", "--porcelain", "--", "dvc.lock", check=False).stdout.strip() != ""
    return {"revision": rev.strip() or None, "flow_run_id": flow_run, "lock_uncommitted": dirty}


def raw_file_index(ws: Workspace) -> dict[tuple[str, str], str]:
    """Map (batch_id, name_hash) -> raw file path, by re-hashing the raw zone's relative paths."""
    salt = ws.params.privacy.salt
    index: dict[tuple[str, str], str] = {}
    for batch in ws.params.batches:
        files = ws.root / contract.raw_batch_files(batch)
        if not files.is_dir():
            continue
        for path in files.rglob("*"):
            if path.is_file():
                rel = path.relative_to(files).as_posix()
                index[(batch, salted_hash(rel, salt))] = f"{contract.raw_batch_files(batch)}/{rel}"
    return index


def _samples(ws: Workspace) -> dict[str, dict[str, Any]]:
    path = ws.root / contract.SAMPLES
    return {r["sample_id"]: r for r in tables.read_rows(path)} if path.exists() else {}


def _annotations(ws: Workspace) -> list[dict[str, Any]]:
    path = ws.root / contract.ANNOTATIONS
    return tables.read_rows(path) if path.exists() else []


def _counterfactuals(ws: Workspace) -> list[dict[str, Any]]:
    path = ws.root / contract.COUNTERFACTUALS
    return tables.read_rows(path) if path.exists() else []


def artifact_lineage(ws: Workspace, target: str) -> dict[str, Any]:
    """Lineage of an artifact path or model directory (workspace-relative or absolute)."""
    rel = Path(target)
    if rel.is_absolute():
        rel = rel.resolve().relative_to(ws.root)
    path = rel.as_posix().rstrip("/")
    lock = _lock(ws)
    stage = producing_stage(lock, path)
    if stage is None:
        raise WorkspaceError(f"no stage in dvc.lock produces {path}")
    chain = stage_chain(lock, stage)
    raw_batches = sorted({d["path"] for s in chain for d in lock[s].get("deps", [])
                          if contract.is_under(d["path"], contract.RAW)})
    record: dict[str, Any] = {
        "target": path, "kind": "artifact", "stage": stage, **_revision(ws),
        "chain": [_stage_record(ws, lock, s) for s in chain], "raw_batches": raw_batches,
    }
    base = stage.split("@", 1)[0]
    if base in STAGE_SPLITS:
        record["raw_files"] = _files_for_stage(ws, base)
    return record


def _files_for_stage(ws: Workspace, stage: str) -> dict[str, list[str]]:
    """Raw files (per split) whose samples, or whose counterfactuals, the stage consumed."""
    splits = STAGE_SPLITS[stage]
    samples = _samples(ws)
    index = raw_file_index(ws)
    used: dict[str, set[str]] = {s: set() for s in splits}
    for row in _annotations(ws):
        if row["split"] in splits:
            used[row["split"]].add(row["sample_id"])
    out: dict[str, list[str]] = {}
    for split, ids in used.items():
        files = set()
        for sid in ids:
            s = samples.get(sid)
            if s is not None:
                files.add(index.get((s["batch_id"], s["name_hash"]), f"<unresolved {s['batch_id']}:{s['name_hash']}>"))
        out[split] = sorted(files)
    return out


def sample_lineage(ws: Workspace, sample_id: str) -> dict[str, Any]:
    """Everything derived from one sample: its raw file, labels, split, mask, counterfactuals,
    the training runs that used it, and its predictions."""
    samples = _samples(ws)
    if sample_id not in samples:
        cf = next((c for c in _counterfactuals(ws) if c["sample_id"] == sample_id), None)
        if cf is None:
            raise WorkspaceError(f"no sample or counterfactual {sample_id!r} in this workspace")
        parent = sample_lineage(ws, cf["parent_sample_id"])
        return {"target": sample_id, "kind": "derived_image", "derived": {k: cf.get(k) for k in (
            "kind", "split", "image_path", "method", "excluded", "exclusion_reason")}, "parent": parent}
    s = samples[sample_id]
    record: dict[str, Any] = {"target": sample_id, "kind": "sample", **_revision(ws),
                              "raw_file": raw_file_index(ws).get((s["batch_id"], s["name_hash"])),
                              "batch_id": s["batch_id"], "image_path": s["image_path"], "mask_path": s.get("mask_path")}
    ann = next((a for a in _annotations(ws) if a["sample_id"] == sample_id), None)
    if ann:
        record["split"] = ann["split"]
        record["labels"] = {lv: {"term": ann[lv], "source": ann[f"{lv}_source"]}
                            for lv in ("location", "morphology", "microvascular", "diagnosis")}
    masks_path = ws.root / contract.MASKS_TABLE
    if masks_path.exists():
        record["masks"] = [{k: m.get(k) for k in ("mask_path", "source", "accepted") if k in m}
                           for m in tables.read_rows(masks_path) if m["sample_id"] == sample_id]
    derived = [c for c in _counterfactuals(ws) if c["parent_sample_id"] == sample_id]
    record["derived"] = [{k: c.get(k) for k in ("sample_id", "kind", "split", "image_path", "excluded",
                                                 "exclusion_reason")} for c in derived]
    split = record.get("split")
    record["used_by"] = sorted(
        st for st, splits in STAGE_SPLITS.items()
        if (split in splits) or (_read_counterfactuals(ws, st) and any(c["split"] in splits and not c.get("excluded")
                                                                   for c in derived)))
    preds = ws.root / contract.PREDICTIONS
    if preds.exists():
        ids = {sample_id} | {c["sample_id"] for c in derived}
        record["predictions"] = [{k: p.get(k) for k in ("model", "condition", "sample_id", "completion")
                                  if k in p} for p in tables.read_rows(preds) if p.get("sample_id") in ids]
    return record


def _read_counterfactuals(ws: Workspace, stage: str) -> bool:
    """Whether a stage's run read counterfactual images: its provenance inputs say so once it ran
    (a recipe may leave them out); before that, the contract's deps."""
    prov = ws.root / contract.stage_dir(stage) / contract.PROVENANCE
    if prov.is_file():
        inputs = json.loads(prov.read_text()).get("inputs", {})
        return any(contract.is_under(p, contract.COUNTERFACTUAL) for p in inputs)
    return contract.uses_counterfactuals(stage)


def lineage(ws: Workspace, target: str) -> dict[str, Any]:
    """Dispatch: a sample/derived-image id or an artifact path."""
    looks_like_id = "/" not in target and not (ws.root / target).exists()
    return sample_lineage(ws, target) if looks_like_id else artifact_lineage(ws, target)


def to_mermaid(record: dict[str, Any]) -> str:
    """A Mermaid flowchart of an artifact's stage chain (or a sample's derivations)."""
    lines = ["flowchart LR"]

    def node(name: str) -> str:
        return "n" + _digest(name)[:8]

    if record["kind"] == "artifact":
        for st in record["chain"]:
            lines.append(f'  {node(st["stage"])}["{st["stage"]}"]')
            for d in st["deps"]:
                if contract.is_under(d["path"], contract.RAW):
                    lines.append(f'  {node(d["path"])}[("{d["path"]}")] --> {node(st["stage"])}')
        for st in record["chain"]:
            for d in st["deps"]:
                for other in record["chain"]:
                    feeds = any(paths_overlap(d["path"], o["path"]) for o in other["outs"])
                    if other["stage"] != st["stage"] and feeds:
                        lines.append(f"  {node(other['stage'])} --> {node(st['stage'])}")
        lines.append(f'  {node(record["target"])}(["{record["target"]}"])')
        lines.append(f"  {node(record['stage'])} --> {node(record['target'])}")
    else:
        root = record["target"]
        lines.append(f'  {node(root)}(["{root}"])')
        if record.get("raw_file"):
            lines.append(f'  {node(record["raw_file"])}[("raw file")] --> {node(root)}')
        for d in record.get("derived", []):
            lines.append(f'  {node(root)} --> {node(d["sample_id"])}["{d["kind"]} {d["sample_id"]}"]')
        for st in record.get("used_by", []):
            lines.append(f'  {node(root)} -.-> {node(st)}["{st}"]')
    return "\n".join(dict.fromkeys(lines))
