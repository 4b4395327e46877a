"""Deterministic provenance records written beside stage outputs.

A record holds only facts that are identical on a rerun with the same inputs — input hashes, the
stage's params, the code fingerprint and library versions — so DVC output hashes stay stable.
Run ids and timestamps live outside DVC outputs (``.cogalign/runs/``).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cogalign_core import contract
from cogalign_core.io import TMP_PREFIX, atomic_write_json, sha256_file
from cogalign_core.stage import code_fingerprint

TRACKED_PACKAGES: tuple[str, ...] = (
    "cogalign", "torch", "transformers", "trl", "peft", "segment-anything", "opencv-python-headless",
    "pillow", "pyarrow", "numpy",
)
PROVENANCE_FILE = contract.PROVENANCE


def package_versions(names: Iterable[str] = TRACKED_PACKAGES) -> dict[str, str | None]:
    """Installed versions of ``names`` (``None`` when not installed), read from metadata only."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def path_digest(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file, or of a directory tree (sorted relative paths and their file hashes)."""
    p = Path(path)
    if p.is_file():
        return sha256_file(p)
    h = hashlib.sha256()
    for f in sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith(TMP_PREFIX)):
        h.update(f.relative_to(p).as_posix().encode())
        h.update(b"\0")
        h.update(sha256_file(f).encode())
        h.update(b"\n")
    return h.hexdigest()


def write_provenance(out_dir: str | os.PathLike[str], stage: str, workspace: str | os.PathLike[str],
                     inputs: Iterable[str], params: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
    """Write ``out_dir/provenance.json`` for ``stage``.

    Args:
        inputs: workspace-relative input paths (files or directories) the stage read.
        params: the params the stage used (JSON-serialisable).
        extra: further deterministic facts (e.g. base-model revision).
    """
    ws = Path(workspace)
    record = {
        "stage": stage,
        "inputs": {rel: path_digest(ws / rel) for rel in sorted(set(inputs)) if (ws / rel).exists()},
        "params": params,
        "code": _code(ws, stage),
        "packages": package_versions(),
        **(extra or {}),
    }
    path = Path(out_dir) / PROVENANCE_FILE
    atomic_write_json(path, record)
    return path


def _code(workspace: Path, stage: str) -> Any:
    """The code fingerprint DVC saw (``code/<stage>.json``, selected recipe included); computed when absent."""
    path = workspace / contract.fingerprint(stage)
    return json.loads(path.read_text()) if path.is_file() else code_fingerprint(stage)
