"""One module owns raw layouts: ingest pairs images with masks and forget finds an image's companions
by the same rules (nested seg folders, metadata rows, manifest rows)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from cogalign_core import ingest_plan, raw_batch, raw_layout

SALT = "layout-salt-" + "0" * 32


def _png(path: Path, seed: int, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (48, 48, 3) if mode == "RGB" else (48, 48)
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(path)


def _seg_source(root: Path) -> Path:
    """A seg dataset with a nested sequence folder: the same stem in two folders must not be confused."""
    for rel, seed in (("seq1/001", 1), ("seq2/001", 2), ("002", 3)):
        _png(root / "images" / f"{rel}.jpg", seed)
        _png(root / "masks" / f"{rel}.png", seed + 10, mode="L")
    (root / "metadata.csv").write_text("id,patient\n002.jpg,p7\n003,p8\n")
    (root / "bboxes.json").write_text(json.dumps({"002": {"bbox": [[1, 1, 9, 9]]}, "003": []}))
    return root


def test_ingest_and_forget_pair_the_same_masks(tmp_path: Path) -> None:
    batch = raw_batch.register_batch(_seg_source(tmp_path / "src"), tmp_path / "raw", "b0001", layout="seg")
    files = tmp_path / "raw" / "b0001" / raw_batch.FILES_DIR
    plan = ingest_plan.plan_batch(batch, files, SALT)
    assert len(plan.tasks) == 3
    for task in plan.tasks:
        assert raw_layout.companions(batch, files, task.rel_path) == [task.mask_rel]
    assert raw_layout.companions(batch, files, "images/seq1/001.jpg") == ["masks/seq1/001.png"]


def test_forget_drops_exactly_the_rows_that_name_the_image(tmp_path: Path) -> None:
    batch = raw_batch.register_batch(_seg_source(tmp_path / "src"), tmp_path / "raw", "b0001", layout="seg")
    files = tmp_path / "raw" / "b0001" / raw_batch.FILES_DIR
    assert raw_layout.drop_references(batch, files, "images/002.jpg") == 2
    assert (files / "metadata.csv").read_text() == "id,patient\n003,p8\n"
    assert set(json.loads((files / "bboxes.json").read_text())) == {"003"}
    assert raw_layout.drop_references(batch, files, "images/seq1/001.jpg") == 0


def test_forget_drops_manifest_rows(tmp_path: Path) -> None:
    src = tmp_path / "m"
    _png(src / "a" / "x.png", 1)
    _png(src / "b" / "x.png", 2)
    (src / "manifest.csv").write_text("path,label\na/x.png,polyps\n./b/x.png,polyps\n")
    batch = raw_batch.register_batch(src, tmp_path / "raw", "b0001", layout="manifest")
    files = tmp_path / "raw" / "b0001" / raw_batch.FILES_DIR
    assert raw_layout.drop_references(batch, files, "b/x.png") == 1
    assert (files / "manifest.csv").read_text() == "path,label\na/x.png,polyps\n"
    assert raw_layout.companions(batch, files, "a/x.png") == []
