"""Build the bundled demo sample in ``data/sample/`` from the shared real datasets.

Run once by a maintainer (needs ``../shared/data``); the output is committed.
Selection is seeded, near-duplicate groups and CVC sequences are kept whole, images are
downscaled to at most 384 px on the long side (JPEG q90), masks are resized with nearest
neighbour and re-thresholded, and Kvasir-SEG boxes are recomputed from the resized masks.

    python scripts/build_sample.py ../shared/data data/sample
"""

from __future__ import annotations

import csv
import json
import random
import sys
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

MAX_SIDE = 384
KVASIR_COUNT = 120
CVC_SEQUENCES = (3, 4, 10, 14, 18, 21, 22)
NORMAL_COUNT = 60
SEED = 20260320


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _resize(img: Image.Image, resample: int) -> Image.Image:
    w, h = img.size
    scale = MAX_SIDE / max(w, h)
    if scale >= 1:
        return img
    return img.resize((max(1, round(w * scale)), max(1, round(h * scale))), resample)


def _save_jpeg(src: Path, dst: Path) -> tuple[int, int]:
    with Image.open(src) as im:
        rgb = _resize(im.convert("RGB"), Image.Resampling.LANCZOS)
    dst.parent.mkdir(parents=True, exist_ok=True)
    rgb.save(dst, "JPEG", quality=90)
    return rgb.size


def _save_mask(src: Path, dst: Path, size: tuple[int, int]) -> np.ndarray:
    with Image.open(src) as im:
        m = im.convert("L").resize(size, Image.Resampling.NEAREST)
    arr = np.where(np.asarray(m) > 127, 255, 0).astype(np.uint8)
    dst.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(dst, "PNG")
    return arr


def _boxes(mask: np.ndarray, min_area: int = 10) -> list[dict[str, int | str]]:
    n, _, stats, _ = cv2.connectedComponentsWithStats((mask > 0).astype(np.uint8), connectivity=8)
    out: list[dict[str, int | str]] = []
    for i in range(1, n):
        x, y, w, h, area = (int(v) for v in stats[i])
        if area >= min_area:
            out.append({"label": "polyp", "xmin": x, "ymin": y, "xmax": x + w - 1, "ymax": y + h - 1})
    return out


def build_kvasir(src: Path, dst: Path, rng: random.Random) -> int:
    rows = _read_csv(src / "metadata.csv")
    groups: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        groups.setdefault(r["near_duplicate_group"] or r["id"], []).append(r)
    keys = sorted(groups)
    rng.shuffle(keys)
    chosen: list[dict[str, str]] = []
    for k in keys:
        if len(chosen) >= KVASIR_COUNT:
            break
        chosen.extend(groups[k])
    boxes: dict[str, dict[str, object]] = {}
    meta = []
    for r in sorted(chosen, key=lambda r: r["id"]):
        size = _save_jpeg(src / "images" / f"{r['id']}.jpg", dst / "images" / f"{r['id']}.jpg")
        mask = _save_mask(src / "masks" / f"{r['id']}.png", dst / "masks" / f"{r['id']}.png", size)
        boxes[r["id"]] = {"height": size[1], "width": size[0], "bbox": _boxes(mask)}
        meta.append({"id": r["id"], "kvasir_sessile": r["kvasir_sessile"],
                     "near_duplicate_group": r["near_duplicate_group"]})
    (dst / "bboxes.json").write_text(json.dumps(boxes, indent=1) + "\n")
    with open(dst / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "kvasir_sessile", "near_duplicate_group"])
        w.writeheader()
        w.writerows(meta)
    return len(meta)


def build_cvc(src: Path, dst: Path) -> int:
    rows = [r for r in _read_csv(src / "metadata.csv") if int(r["sequence"]) in CVC_SEQUENCES]
    for r in rows:
        size = _save_jpeg(src / "images" / f"{r['frame']}.jpg", dst / "images" / f"{r['frame']}.jpg")
        _save_mask(src / "masks" / f"{r['frame']}.png", dst / "masks" / f"{r['frame']}.png", size)
    with open(dst / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["frame", "sequence"])
        w.writeheader()
        w.writerows({"frame": r["frame"], "sequence": r["sequence"]} for r in rows)
    return len(rows)


def build_normals(src: Path, dst: Path, rng: random.Random) -> int:
    rows = _read_csv(src / "manifest.csv")
    groups: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        groups.setdefault(r["near_duplicate_group"] or r["file"], []).append(r)
    keys = sorted(groups)
    rng.shuffle(keys)
    chosen: list[dict[str, str]] = []
    for k in keys:
        if len(chosen) >= NORMAL_COUNT:
            break
        chosen.extend(groups[k])
    for r in chosen:
        _save_jpeg(src / r["file"], dst / r["file"])
    return len(chosen)


def main(shared: str, out: str) -> None:
    src, dst = Path(shared), Path(out)
    rng = random.Random(SEED)
    n_k = build_kvasir(src / "kvasir-seg", dst / "kvasir-seg", rng)
    n_c = build_cvc(src / "cvc-clinicdb", dst / "cvc-clinicdb")
    n_n = build_normals(src / "kvasir-v2-normal-cecum", dst / "kvasir-v2-normal-cecum", rng)
    print(f"kvasir-seg={n_k} cvc-clinicdb={n_c} normal-cecum={n_n}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
