"""Builds a small real workspace (bundled sample images + an annotations table) for mask/counterfactual tests.

Used by tests/test_masks.py, test_review.py, test_counterfactual.py and the benchmarks. It writes
``data/annotate/annotations.parquet`` itself (ANNOTATIONS schema) because the annotate stage is
tested on its own.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cogalign_core import answer_format, tables, taxonomy
from cogalign_core.io import sha256_bytes

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"
SPLITS = ("train", "val", "test")


def _labels(dataset: str, mask: np.ndarray | None) -> dict[str, str]:
    if mask is None:
        return {"location": "cecum", "morphology": taxonomy.NO_LESION, "microvascular": taxonomy.NOT_ASSESSABLE,
                "diagnosis": taxonomy.NORMAL}
    return {"location": "colon, segment unknown",
            "morphology": taxonomy.morphology_from_mask(1, float(mask.mean())),
            "microvascular": taxonomy.NOT_ASSESSABLE, "diagnosis": "polyp"}


def sample_files(kvasir: int = 3, cvc: int = 2, normal: int = 1) -> list[tuple[str, Path, Path | None]]:
    """(dataset, image, mask) of the first few bundled images of each dataset, sorted by name."""
    out: list[tuple[str, Path, Path | None]] = []
    for img in sorted((SAMPLE / "kvasir-seg" / "images").glob("*.jpg"))[:kvasir]:
        out.append(("kvasir-seg", img, SAMPLE / "kvasir-seg" / "masks" / (img.stem + ".png")))
    for img in sorted((SAMPLE / "cvc-clinicdb" / "images").glob("*.jpg"))[:cvc]:
        out.append(("cvc-clinicdb", img, SAMPLE / "cvc-clinicdb" / "masks" / (img.stem + ".png")))
    for img in sorted((SAMPLE / "kvasir-v2-normal-cecum" / "normal-cecum").glob("*.jpg"))[:normal]:
        out.append(("kvasir-v2", img, None))
    return out


def build_workspace(root: Path, kvasir: int = 3, cvc: int = 2, normal: int = 1,
                    files: list[tuple[str, Path, Path | None]] | None = None) -> list[dict[str, Any]]:
    """Copy sample images (as PNG) and masks into ``root`` and write annotations.parquet; return its rows."""
    boxes_json = json.loads((SAMPLE / "kvasir-seg" / "bboxes.json").read_text())
    rows = []
    for i, (dataset, img_path, mask_path) in enumerate(files or sample_files(kvasir, cvc, normal)):
        rgb = np.asarray(Image.open(img_path).convert("RGB"))
        sid = "s" + sha256_bytes(rgb.tobytes() + str(rgb.shape).encode())[:16]
        rel_img = Path("data/ingest/images") / f"{sid}.png"
        (root / rel_img).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(root / rel_img)
        mask = rel_mask = None
        if mask_path is not None:
            mask = np.asarray(Image.open(mask_path).convert("L")) > 127
            rel_mask = Path("data/ingest/masks") / f"{sid}.png"
            (root / rel_mask).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask.astype(np.uint8) * 255).save(root / rel_mask)
        boxes = []
        if dataset == "kvasir-seg" and img_path.stem in boxes_json:
            keys = ("xmin", "ymin", "xmax", "ymax")
            boxes = [{k: int(b[k]) for k in keys} for b in boxes_json[img_path.stem]["bbox"]]
        labels = _labels(dataset, mask)
        row: dict[str, Any] = {
            "sample_id": sid, "dataset": dataset, "batch_id": "b1", "role": "train", "split": SPLITS[i % 3],
            "group_key": sid, "image_path": rel_img.as_posix(), "width": rgb.shape[1], "height": rgb.shape[0],
            "mask_path": rel_mask.as_posix() if rel_mask else None, "boxes": boxes,
            "lesion_count": 0 if mask is None else 1,
            "lesion_area_fraction": None if mask is None else float(mask.mean()), "frame_region": None,
            "answer": answer_format.render_answer(labels),
        }
        for level in taxonomy.LEVELS:
            row[level] = labels[level]
            row[f"{level}_source"] = "dataset_label" if level != "morphology" or mask is None else "derived_from_mask"
        rows.append(row)
    write_annotations(root, rows)
    return rows


def write_annotations(root: Path, rows: list[dict[str, Any]]) -> None:
    """(Re)write data/annotate/annotations.parquet under ``root``."""
    tables.write_rows(rows, root / "data/annotate/annotations.parquet", tables.ANNOTATIONS, "annotations")


def copy_sample_image(dataset: str, name: str) -> Path:
    """Path of one bundled image (helper for tests that need a specific file)."""
    sub = {"kvasir-seg": "kvasir-seg/images", "cvc-clinicdb": "cvc-clinicdb/images"}[dataset]
    return SAMPLE / sub / name


__all__ = ["build_workspace", "copy_sample_image", "sample_files", "shutil", "write_annotations"]
