"""Small annotation/counterfactual tables from the bundled real sample, for tests, benchmarks and GPU checks.

The pipeline's own ingest/annotate/counterfactual stages produce these tables in a workspace;
this module builds equivalent, schema-valid tables directly from ``cogalign_core.sample_data`` so the
model layer can be exercised (and benchmarked) on its own: real Kvasir-SEG / CVC-ClinicDB polyps
with their ground-truth masks, real Kvasir-v2 normal-cecum frames, and derived images made with
``cv2.inpaint`` (lesion region -> counterfactual normal; a same-size lesion-free region -> control).

Splits are assigned by a hash of the sample id (about 80/10/10), so they are deterministic.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from cogalign_core import answer_format, tables, taxonomy

SAMPLE_PACKAGE = "cogalign_core.sample_data"
IMAGES_DIR = Path("data/ingest/images")
CF_IMAGES_DIR = Path("data/counterfactual/images")


def _split(key: str) -> str:
    v = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 10
    return "val" if v == 0 else "test" if v == 1 else "train"


def _components(mask: np.ndarray) -> tuple[list[dict[str, int]], float]:
    """Boxes (pixel frame, inclusive) of connected lesion components and the lesion area fraction."""
    binary = (mask > 127).astype(np.uint8)
    _, _, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    min_area = 0.0005 * binary.size
    boxes = [{"xmin": int(x), "ymin": int(y), "xmax": int(x + w - 1), "ymax": int(y + h - 1)}
             for x, y, w, h, a in stats[1:] if a >= min_area]
    return boxes, float(binary.mean())


def _copy(src: Path, workspace: Path, rel_dir: Path) -> tuple[str, np.ndarray]:
    data = src.read_bytes()
    rel = rel_dir / f"{hashlib.sha256(data).hexdigest()[:16]}{src.suffix.lower()}"
    (workspace / rel).parent.mkdir(parents=True, exist_ok=True)
    (workspace / rel).write_bytes(data)
    image = cv2.cvtColor(cv2.imread(str(src), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    return rel.as_posix(), image


def _row(sample_id: str, dataset: str, rel: str, image: np.ndarray, labels: dict[str, str],
         boxes: list[dict[str, int]], area: float, split: str | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {
        "sample_id": sample_id, "dataset": dataset, "batch_id": "sample", "role": "train",
        "split": split or _split(sample_id), "group_key": sample_id, "image_path": rel,
        "width": image.shape[1], "height": image.shape[0], "mask_path": None, "boxes": boxes,
        "lesion_count": len(boxes), "lesion_area_fraction": area, "frame_region": "full",
        "answer": answer_format.render_answer(labels),
    }
    for level, term in labels.items():
        row[level] = term
        row[f"{level}_source"] = "dataset_label"
    return row


def build_annotations(workspace: Path, n_lesion: int, n_normal: int) -> list[dict[str, Any]]:
    """Copy ``n_lesion`` polyp images (Kvasir-SEG then CVC-ClinicDB) and ``n_normal`` normal-cecum images
    into ``workspace`` and write ``data/annotate/annotations.parquet``; return the rows (with masks in memory
    under the extra key ``_mask``)."""
    root = Path(str(resources.files(SAMPLE_PACKAGE)))
    lesion_sources = [(p, root / "kvasir-seg" / "masks" / f"{p.stem}.png", "kvasir-seg")
                      for p in sorted((root / "kvasir-seg" / "images").iterdir())]
    lesion_sources += [(p, root / "cvc-clinicdb" / "masks" / f"{p.stem}.png", "cvc-clinicdb")
                       for p in sorted((root / "cvc-clinicdb" / "images").iterdir())]
    normals = sorted((root / "kvasir-v2-normal-cecum" / "normal-cecum").iterdir())
    if n_lesion > len(lesion_sources) or n_normal > len(normals):
        raise ValueError(f"sample holds {len(lesion_sources)} lesion and {len(normals)} normal images")
    rows: list[dict[str, Any]] = []
    for src, mask_path, dataset in lesion_sources[:n_lesion]:
        rel, image = _copy(src, workspace, IMAGES_DIR)
        mask = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
        boxes, area = _components(mask)
        labels = {"location": "colon, segment unknown", "morphology": taxonomy.morphology_from_mask(len(boxes), area),
                  "microvascular": taxonomy.NOT_ASSESSABLE, "diagnosis": "polyp"}
        row = _row("s" + Path(rel).stem, dataset, rel, image, labels, boxes, area)
        row["_mask"] = mask
        rows.append(row)
    for src in normals[:n_normal]:
        rel, image = _copy(src, workspace, IMAGES_DIR)
        labels = {"location": "cecum", "morphology": taxonomy.NO_LESION, "microvascular": taxonomy.NOT_ASSESSABLE,
                  "diagnosis": taxonomy.NORMAL}
        rows.append(_row("s" + Path(rel).stem, "kvasir-v2", rel, image, labels, [], 0.0))
    from cogalign_core.annotate import write_annotation_tables

    write_annotation_tables([{k: v for k, v in r.items() if k != "_mask"} for r in rows], workspace)
    return rows


def build_counterfactuals(workspace: Path, annotations: list[dict[str, Any]], max_parents: int | None = None
                          ) -> list[dict[str, Any]]:
    """Counterfactual normal + control per lesion annotation row; write ``counterfactuals.parquet``.

    Counterfactual normal: the dilated lesion mask inpainted (Telea). Control: the same mask shape
    shifted to a lesion-free place and inpainted, lesion kept (same label as the parent). A row whose
    mask leaves no lesion-free place for the control is marked ``excluded`` with a reason.
    """
    out: list[dict[str, Any]] = []
    parents = [r for r in annotations if r.get("_mask") is not None][:max_parents]
    for r in parents:
        image = cv2.cvtColor(cv2.imread(str(workspace / r["image_path"]), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        mask = (r["_mask"] > 127).astype(np.uint8) * 255
        dilated = cv2.dilate(mask, np.ones((15, 15), np.uint8))
        h, w = mask.shape
        shifted = np.roll(np.roll(dilated, h // 2, axis=0), w // 2, axis=1)
        overlap = bool((shifted & dilated).any())
        for kind, region in (("counterfactual_normal", dilated), ("control", shifted)):
            derived = cv2.inpaint(image, region, 5, cv2.INPAINT_TELEA)
            ok, png = cv2.imencode(".png", cv2.cvtColor(derived, cv2.COLOR_RGB2BGR))
            assert ok
            digest = hashlib.sha256(png.tobytes()).hexdigest()[:16]
            rel = (CF_IMAGES_DIR / f"{digest}.png").as_posix()
            (workspace / rel).parent.mkdir(parents=True, exist_ok=True)
            (workspace / rel).write_bytes(png.tobytes())
            labels = {lv: r[lv] for lv in taxonomy.LEVELS}
            if kind == "counterfactual_normal":
                labels.update(morphology=taxonomy.NO_LESION, diagnosis=taxonomy.NORMAL)
            excluded = kind == "control" and overlap
            out.append({"sample_id": "c" + digest, "parent_sample_id": r["sample_id"], "kind": kind,
                        "split": r["split"], "image_path": rel, "width": w, "height": h, **labels,
                        "answer": answer_format.render_answer(labels), "excluded": excluded,
                        "exclusion_reason": "control_region_overlaps_lesion" if excluded else None})
    # The counterfactual stage's own schema and writer, per split as the stage writes them.
    from cogalign_core.counterfactual import COUNTERFACTUALS

    folder = workspace / "data/counterfactual"
    tables.write_rows(out, folder / "counterfactuals.parquet", COUNTERFACTUALS, "counterfactuals")
    for split in tables.SPLITS:
        tables.write_rows([r for r in out if r["split"] == split], folder / f"split_{split}.parquet",
                          COUNTERFACTUALS, "counterfactuals")
    return out


def build_workspace(workspace: Path, n_lesion: int, n_normal: int, n_counterfactual_parents: int | None = None
                    ) -> dict[str, int]:
    """Both tables in ``workspace``; returns row counts."""
    rows = build_annotations(workspace, n_lesion, n_normal)
    cf = build_counterfactuals(workspace, rows, n_counterfactual_parents)
    return {"annotations": len(rows), "counterfactuals": len(cf)}
