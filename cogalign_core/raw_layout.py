"""Raw layouts: the one module that knows how a raw batch is organised on disk.

Registration (:mod:`raw_batch`) detects a layout, the ingest stage plans its work from it, and
``cogalign forget`` finds an image's companions (masks, metadata rows, manifest rows) with the same
rules.

- ``seg``: ``images/`` + ``masks/`` (a mask belongs to the image with the same path inside its folder,
  suffix aside), optional ``bboxes.json`` (Kvasir-SEG format, keyed by stem) and ``metadata.csv``
  (stem column :data:`STEM_COLUMNS`; optional :data:`GROUP_COLUMNS`, ``kvasir_sessile``).
- ``classes``: ``<label>/<image>`` (every file under a label folder is an item of that label).
- ``manifest``: a CSV (only when asked) with a path column and optional label/mask/bbox/group
  columns (:data:`MANIFEST_PATH_COLUMNS` ...) and per-image taxonomy terms in columns named after the
  levels (:data:`MANIFEST_LEVEL_COLUMNS`); paths are relative to the CSV's folder, the batch root.
- ``collection``: a root whose sub-folders are each a ``seg`` or ``classes`` dataset (the bundled
  sample), registered as one batch with one dataset entry per sub-folder.
"""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
from pathlib import Path
from typing import Any

from cogalign_core.io import atomic_write_text

LAYOUTS: tuple[str, ...] = ("seg", "classes", "manifest", "collection")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp",
                            ".ppm", ".pgm", ".pbm", ".pnm", ".jp2", ".j2k", ".tga", ".dib"})
MANIFEST_NAMES: tuple[str, ...] = ("manifest.csv",)
SEG_IMAGES = "images"
SEG_MASKS = "masks"
SEG_METADATA = "metadata.csv"
SEG_BBOXES = "bboxes.json"
STEM_COLUMNS = ("id", "frame", "image", "filename", "file", "name", "stem")
GROUP_COLUMNS = ("sequence", "patient", "patient_id", "sequence_id", "near_duplicate_group")
MANIFEST_PATH_COLUMNS = ("path", "image", "image_path", "file", "filename")
MANIFEST_LABEL_COLUMNS = ("label", "class", "class_label")
MANIFEST_MASK_COLUMNS = ("mask", "mask_path")
MANIFEST_BBOX_COLUMNS = ("bbox", "boxes", "box")
MANIFEST_GROUP_COLUMNS = ("group", "patient", "sequence", "patient_id", "group_id")
MANIFEST_LEVEL_COLUMNS = ("location", "morphology", "microvascular", "diagnosis")  # = taxonomy.LEVELS (tested)
# Every column whose value names a patient or sequence (forget matches a patient id through all of them).
PATIENT_COLUMNS: tuple[str, ...] = tuple(dict.fromkeys(GROUP_COLUMNS + MANIFEST_GROUP_COLUMNS))
_STEM_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"})


# ------------------------------------------------------------------------------------------ detection

def visible_dirs(path: Path) -> list[Path]:
    """Non-hidden real (not symlinked) sub-directories, sorted (``__pycache__`` and the like skipped)."""
    out = []
    try:
        entries = list(os.scandir(path))
    except OSError:
        return []
    for e in entries:
        if not e.name.startswith((".", "__")) and e.is_dir(follow_symlinks=False):
            out.append(Path(e.path))
    return sorted(out)


def has_image_files(path: Path) -> bool:
    """True when ``path`` directly holds a file with an image suffix (suffix only; no decoding)."""
    try:
        return any(e.is_file(follow_symlinks=False) and Path(e.name).suffix.lower() in IMAGE_SUFFIXES
                   for e in os.scandir(path))
    except OSError:
        return False


def is_seg(path: Path) -> bool:
    return (path / SEG_IMAGES).is_dir() and (path / SEG_MASKS).is_dir()


def is_classes(path: Path) -> bool:
    if (path / SEG_IMAGES).is_dir() or (path / SEG_MASKS).is_dir():
        return False  # half a seg dataset, not a class named "images": refuse rather than guess
    subs = visible_dirs(path)
    return bool(subs) and not is_seg(path) and any(has_image_files(d) for d in subs) \
        and not any(is_seg(d) for d in subs)


def is_collection(path: Path) -> bool:
    subs = visible_dirs(path)
    return bool(subs) and all(is_seg(d) or is_classes(d) for d in subs)


LAYOUT_CHECKS = {"seg": is_seg, "classes": is_classes, "collection": is_collection}
LAYOUT_HELP = {
    "seg": "needs images/ and masks/ sub-folders",
    "classes": "needs <label>/ sub-folders holding images, and no images/+masks/ datasets",
    "collection": "every non-hidden sub-folder must be a seg or classes dataset",
}


def detect_layout(source: str | os.PathLike[str]) -> str:
    """Resolve the ``auto`` layout of a source folder: ``seg``, ``classes`` or ``collection``.

    Precedence: ``images/``+``masks/`` -> seg; label folders holding images -> classes; sub-folders
    that are each seg/classes datasets -> collection. ``manifest`` is never guessed (dataset
    folders often carry a provenance CSV that is not a manifest).

    Raises:
        ValueError: the folder matches no layout (the message says what was found).
    """
    src = Path(source)
    if src.is_file() and src.suffix.lower() == ".csv":
        raise ValueError(f"{src} is a CSV file: pass --layout manifest to register it as a manifest")
    if not src.is_dir():
        raise ValueError(f"{src} is not a directory")
    if is_seg(src):
        return "seg"
    if is_classes(src):
        return "classes"
    if is_collection(src):
        return "collection"
    subs = visible_dirs(src)
    found = ", ".join(d.name + "/" for d in subs[:8]) or "no sub-folders"
    if (src / SEG_IMAGES).is_dir() and not (src / SEG_MASKS).is_dir():
        hint = "images/ without masks/: use a classes layout (<label>/<image>) or a manifest CSV"
    else:
        hint = ("expected images/+masks/ (seg), <label>/<image> folders (classes), sub-folders that are "
                "each such a dataset (collection), or --layout manifest with a CSV")
    raise ValueError(f"{src}: no recognised layout ({found}); {hint}")


def find_manifest(source: Path) -> tuple[Path, Path]:
    """(root, manifest path) for ``--layout manifest`` given a CSV file or a folder holding one."""
    if source.is_file():
        if source.suffix.lower() != ".csv":
            raise ValueError(f"manifest layout: {source} is not a .csv file")
        return source.parent, source
    if not source.is_dir():
        raise ValueError(f"manifest layout: {source} does not exist")
    for name in MANIFEST_NAMES:
        if (source / name).is_file():
            return source, source / name
    csvs = sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() == ".csv")
    if len(csvs) == 1:
        return source, csvs[0]
    listed = ", ".join(p.name for p in csvs) or "none"
    raise ValueError(f"manifest layout: {source} must hold manifest.csv or exactly one CSV (found: {listed}); "
                     "or pass the CSV file itself")


# ------------------------------------------------------------------------------------------ naming rules
def stem_key(value: str) -> str:
    """Metadata id -> file stem (a trailing image suffix is dropped)."""
    v = value.strip()
    p = posixpath.basename(v)
    root, ext = posixpath.splitext(p)
    return root if ext.lower() in _STEM_SUFFIXES else p


def item_key(rel: str, folder: str) -> str:
    """The key pairing a seg image with its mask: its path inside ``folder`` without the suffix."""
    return posixpath.splitext(posixpath.relpath(rel, folder))[0]


def group_text(dataset: str, column: str, value: str) -> str:
    """The text whose keyed hash is a sample's group (patient/sequence) id; the value is stripped."""
    return f"{dataset}|{column}|{value.strip()}"


def manifest_path(raw: str) -> str | None:
    """A manifest cell as a normalised POSIX path inside the batch root, or None when it escapes (../, absolute)."""
    p = raw.replace("\\", "/")
    if p.startswith("/") or (len(p) > 1 and p[1] == ":"):
        return None
    norm = posixpath.normpath(p)
    if norm == ".." or norm.startswith("../") or norm == ".":
        return None
    return norm


def column(header: list[str], names: tuple[str, ...]) -> int | None:
    """Index of the first of ``names`` in a lower-cased CSV header, or None."""
    for name in names:
        if name in header:
            return header.index(name)
    return None


# ------------------------------------------------------------------------------------------ companions
def dataset_of(batch: dict[str, Any], rel: str) -> dict[str, Any] | None:
    """The batch's dataset entry (``batch.json``) holding the raw file ``rel`` (relative to ``files/``)."""
    best = None
    for ds in batch.get("datasets", []):
        prefix = ds["path"]
        if (not prefix or rel.startswith(prefix + "/")) and (best is None or len(prefix) > len(best["path"])):
            best = ds
    return best


def _join(prefix: str, *parts: str) -> str:
    return posixpath.join(prefix, *parts) if prefix else posixpath.join(*parts)


def seg_masks(files_root: Path, prefix: str, rel: str) -> list[str]:
    """The masks of seg image ``rel`` in the dataset at ``prefix``: same :func:`item_key` under ``masks/``."""
    images, masks = _join(prefix, SEG_IMAGES), _join(prefix, SEG_MASKS)
    if not rel.startswith(images + "/") or not (files_root / masks).is_dir():
        return []
    key = item_key(rel, images)
    folder = files_root / masks / posixpath.dirname(key)
    base = posixpath.basename(key)
    return sorted(p.relative_to(files_root).as_posix() for p in folder.glob("*")
                  if p.is_file() and p.stem == base) if folder.is_dir() else []


def companions(batch: dict[str, Any], files_root: Path, rel: str) -> list[str]:
    """Raw files that belong to image ``rel`` and hold its pixels' derivatives (a seg image's masks)."""
    ds = dataset_of(batch, rel)
    if ds is None or ds["layout"] != "seg":
        return []
    return seg_masks(files_root, ds["path"], rel)


def drop_references(batch: dict[str, Any], files_root: Path, rel: str) -> int:
    """Remove every row that names image ``rel``: its seg ``bboxes.json`` entry and ``metadata.csv`` row,
    or its manifest rows. Returns the number of rows removed (files are rewritten atomically)."""
    ds = dataset_of(batch, rel)
    if ds is None:
        return 0
    if ds["layout"] == "seg":
        images = _join(ds["path"], SEG_IMAGES)
        if not rel.startswith(images + "/"):
            return 0
        stem = posixpath.basename(item_key(rel, images))
        removed = _drop_bbox_entry(files_root / _join(ds["path"], SEG_BBOXES), stem)
        return removed + _drop_csv_rows(files_root / _join(ds["path"], SEG_METADATA), STEM_COLUMNS,
                                        lambda cell: stem_key(cell) == stem)
    if ds["layout"] == "manifest":
        return _drop_csv_rows(files_root / ds["manifest"], MANIFEST_PATH_COLUMNS,
                              lambda cell: manifest_path(cell.strip()) == rel)
    return 0


def _drop_bbox_entry(path: Path, stem: str) -> int:
    if not path.is_file():
        return 0
    data = json.loads(path.read_bytes().decode("utf-8-sig"))
    keys = [k for k in data if stem_key(k) == stem] if isinstance(data, dict) else []
    for k in keys:
        del data[k]
    if keys:
        atomic_write_text(path, json.dumps(data, indent=1))
    return len(keys)


def _drop_csv_rows(path: Path, names: tuple[str, ...], matches: Any) -> int:
    if not path.is_file():
        return 0
    rows = list(csv.reader(io.StringIO(path.read_bytes().decode("utf-8-sig"), newline="")))
    if not rows:
        return 0
    header, body = rows[0], rows[1:]
    col = column([h.strip().lower() for h in header], names)
    if col is None:
        return 0
    keep = [r for r in body if not (col < len(r) and matches(r[col]))]
    if len(keep) != len(body):
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows([header, *keep])
        atomic_write_text(path, buf.getvalue())
    return len(body) - len(keep)
