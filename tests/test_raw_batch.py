"""Raw batch registration: layouts, copies, symlinks and unreadable entries recorded, ids."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cogalign_core import raw_batch

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"


def _png(path: Path, size: tuple[int, int] = (40, 40), seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_detect_layout_on_the_bundled_sample() -> None:
    assert raw_batch.detect_layout(SAMPLE) == "collection"
    assert raw_batch.detect_layout(SAMPLE / "kvasir-seg") == "seg"
    assert raw_batch.detect_layout(SAMPLE / "cvc-clinicdb") == "seg"
    assert raw_batch.detect_layout(SAMPLE / "kvasir-v2-normal-cecum") == "classes"


def test_detect_layout_rejects_unknown_layouts_clearly(tmp_path: Path) -> None:
    _png(tmp_path / "flat" / "a.png")
    with pytest.raises(ValueError, match="no recognised layout"):
        raw_batch.detect_layout(tmp_path / "flat")
    (tmp_path / "m.csv").write_text("path\na.png\n")
    with pytest.raises(ValueError, match="--layout manifest"):
        raw_batch.detect_layout(tmp_path / "m.csv")
    _png(tmp_path / "imgonly" / "images" / "a.png")
    with pytest.raises(ValueError, match="without masks"):
        raw_batch.detect_layout(tmp_path / "imgonly")


def test_register_bundled_sample_as_one_collection_batch(tmp_path: Path) -> None:
    raw = tmp_path / "data" / "raw"
    assert raw_batch.next_batch_id(raw) == "b0001"
    rec = raw_batch.register_batch(SAMPLE, raw, "b0001")
    assert rec["layout"] == "collection" and rec["role"] == "train"
    assert {(d["path"], d["layout"], d["dataset"]) for d in rec["datasets"]} == {
        ("kvasir-seg", "seg", "kvasir-seg"), ("cvc-clinicdb", "seg", "cvc-clinicdb"),
        ("kvasir-v2-normal-cecum", "classes", "kvasir-v2")}
    source_files = sorted(p.relative_to(SAMPLE).as_posix() for p in SAMPLE.rglob("*")
                          if p.is_file() and not p.is_symlink())
    copied = sorted(p.relative_to(raw / "b0001" / "files").as_posix() for p in (raw / "b0001" / "files").rglob("*")
                    if p.is_file())
    assert copied == source_files
    assert rec["entries"]["files"] == len(source_files)
    for rel in source_files[:: max(1, len(source_files) // 20)]:
        assert _sha(SAMPLE / rel) == _sha(raw / "b0001" / "files" / rel)
    assert json.loads((raw / "b0001" / "batch.json").read_text()) == rec
    assert raw_batch.next_batch_id(raw) == "b0002"
    with pytest.raises(ValueError, match="already exists"):
        raw_batch.register_batch(SAMPLE, raw, "b0001")


def test_symlinks_are_recorded_not_followed_and_special_files_are_unreadable(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _png(src / "polyps" / "a.png")
    _png(src / "polyps" / "ünï cødé name.png", seed=1)
    outside = tmp_path / "outside"
    _png(outside / "secret.png", seed=2)
    os.symlink(outside / "secret.png", src / "polyps" / "escape.png")
    os.symlink(src / "polyps" / "a.png", src / "polyps" / "inside-link.png")
    os.symlink(outside, src / "polyps" / "linked-dir")
    os.mkfifo(src / "polyps" / "pipe.png")
    rec = raw_batch.register_batch(src, tmp_path / "raw", "b0001", role="test")
    assert rec["layout"] == "classes" and rec["role"] == "test"
    escapes = {e["path"]: e["outside_root"] for e in rec["escapes"]}
    assert escapes == {"polyps/escape.png": True, "polyps/inside-link.png": False, "polyps/linked-dir": True}
    assert [u["path"] for u in rec["unreadable"]] == ["polyps/pipe.png"]
    files = tmp_path / "raw" / "b0001" / "files"
    assert sorted(p.name for p in (files / "polyps").iterdir()) == ["a.png", "ünï cødé name.png"]
    assert not any(p.is_symlink() for p in files.rglob("*"))
    assert not (files / "polyps" / "linked-dir").exists()


def test_register_validates_arguments(tmp_path: Path) -> None:
    _png(tmp_path / "src" / "images" / "a.png")
    _png(tmp_path / "src" / "masks" / "a.png")
    with pytest.raises(ValueError, match="role"):
        raw_batch.register_batch(tmp_path / "src", tmp_path / "raw", "b0001", role="validation")
    with pytest.raises(ValueError, match="layout"):
        raw_batch.register_batch(tmp_path / "src", tmp_path / "raw", "b0001", layout="zip")
    with pytest.raises(ValueError, match="classes layout"):
        raw_batch.register_batch(tmp_path / "src", tmp_path / "raw", "b0001", layout="classes")
    with pytest.raises(ValueError, match="invalid batch id"):
        raw_batch.register_batch(tmp_path / "src", tmp_path / "raw", "../evil")
    with pytest.raises(ValueError, match="does not exist"):
        raw_batch.register_batch(tmp_path / "nope", tmp_path / "raw", "b0001")
    assert not (tmp_path / "raw" / "b0001").exists()
    rec = raw_batch.register_batch(tmp_path / "src", tmp_path / "raw", "b0001", layout="seg", dataset="kvasir-seg")
    assert rec["datasets"] == [{"path": "", "layout": "seg", "dataset": "kvasir-seg"}]


def test_manifest_layout_from_csv_file_or_folder(tmp_path: Path) -> None:
    src = tmp_path / "cohort"
    _png(src / "x" / "a.png")
    (src / "list.csv").write_text("path,label\nx/a.png,polyps\n")
    rec = raw_batch.register_batch(src / "list.csv", tmp_path / "raw", "b0001", layout="manifest")
    assert rec["layout"] == "manifest" and rec["datasets"][0]["manifest"] == "list.csv"
    rec2 = raw_batch.register_batch(src, tmp_path / "raw", "b0002", layout="manifest")
    assert rec2["datasets"][0]["manifest"] == "list.csv"
    (src / "other.csv").write_text("path\n")
    with pytest.raises(ValueError, match="exactly one CSV"):
        raw_batch.register_batch(src, tmp_path / "raw", "b0003", layout="manifest")
