"""A small stage directory made by the pipeline's own data stages on part of the bundled real sample.

Training tests, ``benchmarks/bench_train.py`` and ``scripts/gpu_check.py`` need annotation and
counterfactual tables. They get them here by running the real stages — ``ingest_batch``,
``ingest``, ``annotate``, ``masks``, ``counterfactual`` through :func:`cogalign_core.stage.run` —
on an evenly spread subset of ``cogalign_core.sample_data``, without git, DVC or Prefect, so the
tables follow exactly the rules the pipeline applies (splits, ids, exclusions, controls).
"""

from __future__ import annotations

import csv
import json
import shutil
from importlib import resources
from pathlib import Path

from cogalign_core import contract, raw_batch, review
from cogalign_core.annotate import CLINICIAN_CSV_HEADER
from cogalign_core.config import PARAMS_FILE, PipelineParams, dump_params
from cogalign_core.io import atomic_write_text
from cogalign_core.stage import run as run_stage

SAMPLE_PACKAGE = "cogalign_core.sample_data"
DATA_STAGES: tuple[str, ...] = ("ingest_batch", "ingest", "annotate", "masks", "counterfactual")
BATCH = "b0001"


def sample_root() -> Path:
    """The bundled sample's folder (a collection of datasets)."""
    return Path(str(resources.files(SAMPLE_PACKAGE)))


def _spread(items: list[Path], n: int) -> list[Path]:
    """``n`` items evenly spread over the sorted list (so sequences and groups are mixed)."""
    if n >= len(items):
        return items
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def subset_sample(dest: Path, per_dataset: int) -> Path:
    """Copy ``per_dataset`` images of each dataset of the sample (masks and metadata rows with them)."""
    src = sample_root()
    for ds in sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith("__")):
        image_dir = ds / "images" if (ds / "images").is_dir() else next(p for p in ds.iterdir() if p.is_dir())
        kept = _spread(sorted(image_dir.iterdir()), per_dataset)
        out = dest / ds.name / image_dir.relative_to(ds)
        out.mkdir(parents=True)
        for img in kept:
            shutil.copy2(img, out / img.name)
            mask = ds / "masks" / f"{img.stem}.png"
            if mask.is_file():
                (dest / ds.name / "masks").mkdir(exist_ok=True)
                shutil.copy2(mask, dest / ds.name / "masks" / mask.name)
        stems = {p.stem for p in kept}
        meta = ds / "metadata.csv"
        if meta.is_file():
            with open(meta, newline="") as fh:
                rows = list(csv.DictReader(fh))
            key = next(iter(rows[0])) if rows else "id"
            with open(dest / ds.name / meta.name, "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else [key])
                writer.writeheader()
                writer.writerows(r for r in rows if r[key] in stems)
        boxes = ds / "bboxes.json"
        if boxes.is_file():
            doc = json.loads(boxes.read_text())
            (dest / ds.name / boxes.name).write_text(json.dumps({k: v for k, v in doc.items() if k in stems}))
    return dest


def build_stage_tables(root: Path, per_dataset: int = 24, params: PipelineParams | None = None) -> PipelineParams:
    """Make ``root`` a stage directory whose data stages have run on a sample subset; return its params.

    ``root`` must not exist. ``params`` (default: defaults with a fixed salt) are written to
    ``root/params.yaml`` with the batch registered.
    """
    root = Path(root)
    root.mkdir(parents=True)
    source = subset_sample(root / "_source", per_dataset)
    raw_batch.register_batch(source, root / contract.RAW, BATCH, layout="collection", role="train")
    shutil.rmtree(source)
    p = (params or PipelineParams()).model_copy(deep=True)
    p.batches = [BATCH]
    if not p.privacy.salt:
        p.privacy.salt = "sample-workspace-" + "0" * 32
    atomic_write_text(root / PARAMS_FILE, dump_params(p))
    atomic_write_text(root / contract.CLINICIAN_LABELS, CLINICIAN_CSV_HEADER)
    review.ensure_prompts_file(root)
    for stage in DATA_STAGES:
        run_stage(stage, BATCH if stage == "ingest_batch" else None, root)
    return p
