"""PHI: quarantined files' names stay in the raw zone; pushed tables hold the keyed name hash and the reason;
`cogalign quarantine` shows the operator the real paths locally."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from cogalign.cli import app
from cogalign_core import contract, ingest, ingest_merge, raw_batch, tables
from cogalign_core.config import PipelineParams, PrivacyParams, dump_params
from tests.test_ingest import _strings

SALT = "quarantine-salt-" + "0" * 32
NAMES = ("Jane_Doe_MRN00123456", "John_Roe_MRN00654321", "Ann_Poe_1970-01-01")


def _source(root: Path) -> Path:
    """A seg dataset whose file names carry patient names: one corrupt image, one image without its mask,
    one good image whose mask has the wrong size."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    (root / "images" / f"{NAMES[0]}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(root / "images" / f"{NAMES[1]}.png")
    Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(root / "images" / f"{NAMES[2]}.png")
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(root / "masks" / f"{NAMES[2]}.png")
    return root


def _workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / ".dvc").mkdir()  # enough for Workspace.open
    (ws / "dvc.yaml").write_text("stages: {}\n")
    params = PipelineParams(batches=["b0001"], privacy=PrivacyParams(salt=SALT))
    (ws / "params.yaml").write_text(dump_params(params))
    raw_batch.register_batch(_source(tmp_path / "clinic"), ws / contract.RAW, "b0001", layout="seg")
    ingest.run_batch_stage(ws, params, "b0001")
    ingest_merge.run_stage(ws, params)
    return ws


def test_quarantine_tables_hold_hashes_and_reasons_not_names(tmp_path: Path) -> None:
    ws = _workspace(tmp_path)
    rows = tables.read_rows(ws / contract.QUARANTINE, "quarantine")
    assert sorted(r["reason"] for r in rows) == ["mask_missing", "mask_size_mismatch", "undecodable"]
    values: list[Any] = []
    for path in (ws / contract.INGEST).rglob("*"):
        if path.suffix == ".parquet":
            values += _strings(tables.read_rows(path))
        elif path.suffix == ".json":
            values += _strings(json.loads(path.read_text()))
    leaks = [v for v in values for name in NAMES for part in name.split("_") if len(part) > 3 and part in v]
    assert leaks == []
    assert all(len(r["name_hash"]) == 16 and r["reason"] for r in rows)


def test_cogalign_quarantine_shows_the_real_paths_locally(tmp_path: Path) -> None:
    ws = _workspace(tmp_path)
    result = CliRunner().invoke(app, ["quarantine", "--workspace", str(ws), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert len(rows) == 3
    paths = {r["path"] for r in rows}
    assert paths == {f"data/raw/b0001/files/images/{NAMES[0]}.jpg", f"data/raw/b0001/files/images/{NAMES[1]}.png",
                     f"data/raw/b0001/files/images/{NAMES[2]}.png"}
    assert all((ws / p).is_file() for p in paths)
