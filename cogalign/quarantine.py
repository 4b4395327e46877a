"""``cogalign quarantine``: the quarantined files of a workspace with their real paths, for the operator.

The quarantine tables hold only keyed name hashes and reasons (they leave the machine with ``dvc
push``); the paths are resolved here, locally, by planning each raw batch again from the patient-data
zone (:func:`cogalign_core.ingest_plan.plan_batch` names every unit it hashes). Nothing is written.
"""

from __future__ import annotations

from typing import Any

from cogalign.workspace import Workspace, WorkspaceError
from cogalign_core import contract, ingest_plan, tables
from cogalign_core.raw_batch import read_batch


def quarantined(ws: Workspace) -> list[dict[str, Any]]:
    """Rows of the merged quarantine table, each with ``path``: the workspace-relative raw file (or
    ``file#line`` for a metadata row); ``None`` when the raw zone no longer holds it."""
    table = ws.root / contract.QUARANTINE
    if not table.is_file():
        raise WorkspaceError(f"{contract.QUARANTINE} not found: run the pipeline first (`cogalign run --until ingest`)")
    rows = tables.read_rows(table, "quarantine")
    salt = ws.params.privacy.salt
    names: dict[str, dict[str, str]] = {}
    for batch in sorted({r["batch_id"] for r in rows}):
        files = ws.root / contract.raw_batch_files(batch)
        if files.is_dir():
            plan = ingest_plan.plan_batch(read_batch(ws.root / contract.RAW, batch), files, salt)
            names[batch] = {h: f"{contract.raw_batch_files(batch)}/{rel}" for h, rel in plan.names.items()}
    return [{**r, "path": names.get(r["batch_id"], {}).get(r["name_hash"])} for r in rows]
