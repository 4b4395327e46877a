"""Per-sample reuse for incremental data stages (``masks``, ``counterfactual``).

A stage whose output folder is a DVC ``persist: true`` output reads its own previous table before
running. Each sample's work is keyed by everything that determines it — the sample's own content
hashes (image, masks, prompts, labels, split), the stage's params and the stage's code fingerprint
— and a previous result is reused only when its key is equal and every file it names is still
there. Results never depend on other samples, so a run after adding a batch writes exactly the
bytes a from-scratch run writes (tested), while only the new or changed samples are computed.

The keys live beside the table (``reuse_keys.parquet``, a DVC output like the rest, so ``dvc.lock``
still hashes everything the stage wrote). How many samples were computed or reused is an execution
fact, not an output: it goes to ``.cogalign/reuse/<stage>.json`` (outside DVC's outputs) and the log.
``COGALIGN_NO_REUSE=1`` recomputes everything (what ``dvc repro --force`` would be expected to do).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa

from cogalign_core import contract, io, tables

KEYS_FILE = "reuse_keys.parquet"
KEYS = pa.schema([("sample_id", pa.string()), ("key", pa.string())])
COUNTS_DIR = Path(contract.STATE) / "reuse"
"""Workspace-relative folder of per-stage computed/reused counts (run state, never a DVC output)."""
NO_REUSE_ENV = "COGALIGN_NO_REUSE"


def sample_key(stage_salt: str, *parts: Any) -> str:
    """SHA-256 of ``stage_salt`` and the JSON of ``parts`` (sorted keys): one sample's reuse key."""
    h = hashlib.sha256(stage_salt.encode())
    h.update(json.dumps(parts, sort_keys=True, default=str, separators=(",", ":")).encode())
    return h.hexdigest()


def stage_salt(stage: str, params: Mapping[str, Any]) -> str:
    """What every sample's key of ``stage`` shares: the code fingerprint and the stage's params."""
    from cogalign_core.stage import code_fingerprint

    return sample_key("", stage, code_fingerprint(stage), dict(params))


def previous(out_dir: Path, table_file: str, table_name: str, id_column: str) -> tuple[dict[str, str],
                                                                                      dict[str, list[dict[str, Any]]]]:
    """(sample id -> key, sample id -> its previous rows) of the stage's last output, empty when none.

    Empty as well when ``COGALIGN_NO_REUSE`` is set or the previous files cannot be read (a reuse
    cache is an optimisation: a broken one only costs recomputation).
    """
    if os.environ.get(NO_REUSE_ENV, "").strip() not in ("", "0"):
        return {}, {}
    keys_path, table_path = out_dir / KEYS_FILE, out_dir / table_file
    if not (keys_path.exists() and table_path.exists()):
        return {}, {}
    try:
        keys = dict(zip(*tables.read_table(keys_path, "reuse_keys").to_pydict().values(), strict=True))
        rows = tables.read_rows(table_path, table_name)
    except (OSError, ValueError, pa.ArrowException):
        return {}, {}
    by_id: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_id.setdefault(r[id_column], []).append(r)
    return keys, by_id


def files_present(workspace: Path, rows: Iterable[Mapping[str, Any]], columns: Iterable[str]) -> bool:
    """True when every non-null path in ``columns`` of ``rows`` exists under ``workspace``."""
    cols = tuple(columns)
    return all((workspace / r[c]).is_file() for r in rows for c in cols if r.get(c))


def write_keys(out_dir: Path, keys: Mapping[str, str]) -> None:
    """Write ``reuse_keys.parquet`` (sorted by sample id, deterministic bytes)."""
    ids = sorted(keys)
    tables.write_table(pa.table({"sample_id": ids, "key": [keys[i] for i in ids]}, schema=KEYS),
                       out_dir / KEYS_FILE, KEYS, "reuse_keys")


def record_counts(workspace: Path, stage: str, computed: int, reused: int, **extra: Any) -> dict[str, Any]:
    """Write ``.cogalign/reuse/<stage>.json`` (run state outside DVC outputs); return the record."""
    record = {"stage": stage, "computed": computed, "reused": reused, **extra}
    io.atomic_write_json(Path(workspace) / COUNTS_DIR / f"{stage}.json", record)
    return record


def read_counts(workspace: Path, stage: str) -> dict[str, Any]:
    """The last run's computed/reused counts of ``stage``."""
    return json.loads((Path(workspace) / COUNTS_DIR / f"{stage}.json").read_text())
