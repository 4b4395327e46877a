"""Forget: after `cogalign forget`, no artifact, table or cache object holds the sample's pixels, and the
removal is recorded without identifiers."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cogalign.cli import app
from cogalign.lineage import raw_file_index
from cogalign.workspace import Workspace, WorkspaceError
from cogalign_core import tables
from tests.conftest import copy_workspace


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _all_files(root: Path) -> list[Path]:
    """Every regular file of the workspace except git's object store (git never holds raw or stored pixels)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == root:
            dirnames[:] = [d for d in dirnames if d != ".git"]
        out += [Path(dirpath) / f for f in filenames if not os.path.islink(Path(dirpath) / f)]
    return out


def _pixel_files(ws: Workspace, sample: dict) -> dict[str, str]:
    """sha256 -> what: the raw file, its raw mask, the stored image and the stored mask of ``sample``."""
    raw = ws.root / raw_file_index(ws)[(sample["batch_id"], sample["name_hash"])]
    found = {_sha(raw): "raw image", _sha(ws.root / sample["image_path"]): "stored image"}
    raw_mask = next(raw.parent.parent.joinpath("masks").glob(f"{raw.stem}.*"), None)
    if raw_mask is not None:
        found[_sha(raw_mask)] = "raw mask"
    if sample.get("mask_path"):
        found[_sha(ws.root / sample["mask_path"])] = "stored mask"
    return found


def _holders(root: Path, digests: dict[str, str]) -> list[str]:
    return sorted(f"{p.relative_to(root)} ({digests[d]})" for p in _all_files(root)
                  if p.stat().st_size > 0 and (d := _sha(p)) in digests)


def _ids_in_tables(root: Path, ids: set[str]) -> list[str]:
    hits = []
    for p in (root / "data").rglob("*.parquet"):
        for r in tables.read_rows(p):
            if {r.get("sample_id"), r.get("duplicate_of"), r.get("parent_sample_id"), r.get("near_dup_cluster")} & ids:
                hits.append(str(p.relative_to(root)))
                break
    return hits


@pytest.fixture(scope="module")
def forgotten_ws(spine_workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    """A copy of the spine workspace where one Kvasir-SEG sample (with mask and box) was forgotten by the CLI."""
    root = copy_workspace(spine_workspace, tmp_path_factory.mktemp("forget") / "ws")
    ws = Workspace.open(root)
    samples = tables.read_rows(root / "data/ingest/samples.parquet")
    target = next(s for s in samples if s["dataset"] == "kvasir-seg" and s["mask_path"] and s["boxes"])
    pixels = _pixel_files(ws, target)
    # Stored copies may be byte-identical to the raw files (no metadata to strip): >= 2 distinct digests.
    assert len(pixels) >= 2 and _holders(root, pixels)  # the pixels are there before
    # A clinician label for it (git-tracked) must go too.
    (root / "clinician/labels.csv").write_text(
        "sample_id,location,morphology,microvascular,diagnosis,paris\n"
        f"{target['sample_id']},,,,polyp,\n")
    ws.commit("clinician label")
    result = CliRunner().invoke(app, ["forget", target["sample_id"], "--workspace", str(root)])
    assert result.exit_code == 0, result.output
    return root, target, pixels


def test_no_file_or_cache_object_holds_the_pixels(forgotten_ws: tuple[Path, dict, dict]) -> None:
    root, target, pixels = forgotten_ws
    assert _holders(root, pixels) == []
    assert _ids_in_tables(root, {target["sample_id"]}) == []
    ws = Workspace.open(root)
    assert (root / "data/raw/b0001").is_dir() and ws.params.batches == ["b0001"]
    # The batch is re-tracked and the pipeline is current for what had run; history is committed.
    status = json.loads(ws.dvc("status", "--json", "data/raw/b0001.dvc", "ingest_batch@b0001", "ingest",
                               "annotate").stdout or "{}")
    assert status == {}
    assert ws.git("status", "--porcelain", "--", "data", "dvc.lock", "clinician").stdout == ""
    assert (root / "clinician/labels.csv").read_text().count("\n") == 1


def test_removal_recorded_without_identifiers(forgotten_ws: tuple[Path, dict, dict]) -> None:
    root, target, _ = forgotten_ws
    record = json.loads((root / "data/registry/forgotten.json").read_text())
    entry = record["removals"][-1]
    assert entry["samples"] == 1 and entry["raw_files"] == 2 and entry["clinician_rows"] == 1
    assert len(record["blocked_content"]) == 2
    text = (root / "data/registry/forgotten.json").read_text()
    for ident in (target["sample_id"], target["name_hash"], target["image_sha256"]):
        assert ident not in text
    assert (target["batch_id"], target["name_hash"]) not in raw_file_index(Workspace.open(root))
    # Nothing git-tracked in the current tree names the sample.
    tracked = Workspace.open(root).git("ls-files").stdout.split()
    for rel in tracked:
        p = root / rel
        if p.is_file() and p.suffix in (".json", ".csv", ".yaml", ".lock", ".dvc"):
            assert target["sample_id"] not in p.read_text(errors="ignore"), rel


def test_forgotten_content_is_never_taken_again_from_a_drop(forgotten_ws: tuple[Path, dict, dict],
                                                            tmp_path: Path) -> None:
    from cogalign.retrain import scan_drop_folder

    root, target, _ = forgotten_ws
    ws = Workspace.open(root)
    # The forgotten file still lies in an (external) drop folder: the scan refuses it.
    src = Path(__file__).resolve().parents[1] / "data/sample/kvasir-seg/images"
    drop = tmp_path / "drop" / "images"
    drop.mkdir(parents=True)
    for img in src.glob("*.jpg"):
        if hashlib.sha256(img.read_bytes()).hexdigest() in _pixel_files_known(root, target):
            (drop / img.name).write_bytes(img.read_bytes())
    scan = scan_drop_folder(ws, drop.parent)
    assert scan.withdrawn == 1 and not scan.new


def _pixel_files_known(root: Path, target: dict) -> set[str]:
    """sha256 of the bundled sample image whose stored copy was the target (matched via the sample's stem)."""
    src = Path(__file__).resolve().parents[1] / "data/sample/kvasir-seg/images"
    from cogalign_core.privacy import salted_hash

    salt = Workspace.open(root).params.privacy.salt
    return {hashlib.sha256(p.read_bytes()).hexdigest() for p in src.glob("*.jpg")
            if salted_hash(f"kvasir-seg/images/{p.name}", salt) == target["name_hash"]}


def test_forget_patient_and_bad_arguments(spine_workspace: Path, tmp_path: Path) -> None:
    from cogalign.forget import resolve_samples

    ws = Workspace.open(spine_workspace)
    with pytest.raises(WorkspaceError, match="exactly one"):
        resolve_samples(ws, None, None)
    with pytest.raises(WorkspaceError, match="no sample"):
        resolve_samples(ws, "s0000000000000000", None)
    with pytest.raises(WorkspaceError, match="no sample of that patient"):
        resolve_samples(ws, None, "no-such-patient")
    # CVC-ClinicDB sequence 3 (the source's patient-level grouping) resolves to all its frames.
    seq = resolve_samples(ws, None, "3")
    assert len(seq) >= 2 and {s["dataset"] for s in seq} == {"cvc-clinicdb"}
    assert len({s["group_id_hash"] for s in seq}) == 1
