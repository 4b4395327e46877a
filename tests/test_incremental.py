"""Per-sample incremental data stages: after a new batch and after a review import, only the new or
reviewed samples are computed (counted), and every output equals a from-scratch run byte for byte;
registering an external test batch leaves every training input byte-identical.

The real stages run through :func:`cogalign_core.stage.run` on small parts of the bundled sample
(no git, DVC or Prefect: the reuse logic lives in the stages; ``dvc.yaml`` only keeps their
outputs with ``persist: true``).
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from cogalign_core import contract, raw_batch, reuse, review, tables
from cogalign_core.annotate import CLINICIAN_CSV_HEADER
from cogalign_core.config import PARAMS_FILE, PipelineParams, dump_params
from cogalign_core.io import atomic_write_text
from cogalign_core.sample_workspace import sample_root, subset_sample
from cogalign_core.stage import run as run_stage

SALT = "incremental-test-" + "0" * 32
DOWNSTREAM = ("ingest", "annotate", "masks", "counterfactual")


def _seg_batch(dest: Path, dataset: str, names: list[str]) -> Path:
    """A seg-layout folder of the named bundled images with their masks (and bboxes.json rows)."""
    src = sample_root() / dataset
    (dest / "images").mkdir(parents=True)
    (dest / "masks").mkdir()
    for name in names:
        shutil.copy2(src / "images" / name, dest / "images" / name)
        shutil.copy2(src / "masks" / (Path(name).stem + ".png"), dest / "masks" / (Path(name).stem + ".png"))
    if (src / "bboxes.json").exists():
        boxes = json.loads((src / "bboxes.json").read_text())
        stems = {Path(n).stem for n in names}
        (dest / "bboxes.json").write_text(json.dumps({k: v for k, v in boxes.items() if k in stems}))
    return dest


def _unused(dataset: str, used: Path, n: int) -> list[str]:
    taken = {p.name for p in (used / dataset / "images").iterdir()}
    return [p.name for p in sorted((sample_root() / dataset / "images").iterdir()) if p.name not in taken][:n]


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    first = subset_sample(root / "b1", per_dataset=6)
    return {"b1": first,
            "b2": _seg_batch(root / "b2", "kvasir-seg", _unused("kvasir-seg", first, 3)),
            "test": _seg_batch(root / "test", "cvc-clinicdb", _unused("cvc-clinicdb", first, 3))}


def _workspace(root: Path) -> Path:
    root.mkdir(parents=True)
    atomic_write_text(root / contract.CLINICIAN_LABELS, CLINICIAN_CSV_HEADER)
    review.ensure_prompts_file(root)
    _write_params(root, [])
    return root


def _write_params(root: Path, batches: list[str]) -> None:
    params = PipelineParams.model_validate({"privacy": {"salt": SALT}, "batches": batches,
                                            "masks": {"qc_segmenters": ["box_ellipse"]}})
    atomic_write_text(root / PARAMS_FILE, dump_params(params))


def _register(root: Path, batch_id: str, source: Path, role: str = "train") -> None:
    dataset = {"b2": "kvasir-seg", "test": "cvc-clinicdb"}.get(source.name)  # seg folders named by the test
    raw_batch.register_batch(source, root / "data/raw", batch_id, layout="auto", role=role, dataset=dataset)
    batches = [p.name for p in sorted((root / "data/raw").iterdir()) if p.is_dir()]
    _write_params(root, batches)
    run_stage("ingest_batch", batch_id, root)


def _downstream(root: Path, stages: tuple[str, ...] = DOWNSTREAM) -> dict[str, dict]:
    for stage in stages:
        run_stage(stage, None, root)
    return {s: reuse.read_counts(root, s) for s in stages if s in ("masks", "counterfactual")}


def _tree(root: Path, *subdirs: str) -> dict[str, bytes]:
    out = {}
    for sub in subdirs:
        for p in sorted((root / sub).rglob("*")):
            if p.is_file():
                out[p.relative_to(root).as_posix()] = p.read_bytes()
    return out


DATA = ("data/ingest", "data/annotate", "data/masks", "data/counterfactual")


def test_new_batch_and_review_import_recompute_only_their_samples(sources: dict[str, Path], tmp_path: Path) -> None:
    inc = _workspace(tmp_path / "inc")
    _register(inc, "b0001", sources["b1"])
    first = _downstream(inc)
    assert first["masks"]["reused"] == 0 and first["masks"]["computed"] > 0
    before = tables.read_rows(inc / "data/masks/masks.parquet", "masks")

    _register(inc, "b0002", sources["b2"])
    second = _downstream(inc)
    masks_now = tables.read_rows(inc / "data/masks/masks.parquet", "masks")
    new_lesions = len(masks_now) - len(before)
    assert new_lesions == 3
    assert second["masks"] == {"stage": "masks", "computed": 3, "reused": first["masks"]["computed"]}
    cf_parents = {r["sample_id"] for r in masks_now if r["status"] == "accepted"}
    assert second["counterfactual"]["computed"] == len(cf_parents) - first["counterfactual"]["computed"] == 3

    scratch = _workspace(tmp_path / "scratch")
    _register(scratch, "b0001", sources["b1"])
    _register(scratch, "b0002", sources["b2"])
    _downstream(scratch)
    assert _tree(inc, *DATA) == _tree(scratch, *DATA)

    # A clinician's boxes for two samples: only those two are recomputed, and the result equals a run
    # that had the prompts from the start.
    reviewed = sorted(cf_parents)[:2]
    task = tmp_path / "review.csv"
    with open(task, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["sample_id", "boxes"])
        writer.writeheader()
        writer.writerows({"sample_id": sid, "boxes": "[[20, 20, 120, 110]]"} for sid in reviewed)
    assert review.import_review(inc, task) == 2
    third = _downstream(inc, ("masks", "counterfactual"))
    assert third["masks"]["computed"] == 2
    # Ground truth outranks clinician boxes, so the accepted masks (what counterfactuals depend on) stay.
    assert third["counterfactual"]["computed"] <= 2
    shutil.rmtree(scratch / "data/review")
    shutil.copytree(inc / "data/review", scratch / "data/review")
    for stage_dir in ("data/masks", "data/counterfactual"):
        shutil.rmtree(scratch / stage_dir)
    _downstream(scratch, ("masks", "counterfactual"))
    assert _tree(inc, *DATA, "data/review") == _tree(scratch, *DATA, "data/review")


def test_test_batch_leaves_training_inputs_byte_identical(sources: dict[str, Path], tmp_path: Path) -> None:
    ws = _workspace(tmp_path / "ws")
    _register(ws, "b0001", sources["b1"])
    _downstream(ws)
    training = ("data/annotate/split_train.parquet", "data/annotate/split_val.parquet",
                "data/counterfactual/split_train.parquet", "data/counterfactual/split_val.parquet")

    def training_inputs() -> dict[str, bytes]:
        files = {p: (ws / p).read_bytes() for p in training}
        for p in training:  # and every image, mask and fill mask those tables name
            for row in tables.read_rows(ws / p):
                for col in ("image_path", "mask_path", "fill_mask_path"):
                    if row.get(col):
                        files[row[col]] = (ws / row[col]).read_bytes()
        return files

    before = training_inputs()
    assert any("data/counterfactual/images" in p for p in before)
    _register(ws, "b0002", sources["test"], role="test")
    counts = _downstream(ws)
    assert counts["counterfactual"]["computed"] == 3  # the test lesions got counterfactuals ...
    assert training_inputs() == before                # ... and no training byte moved
    splits = {r["split"] for r in tables.read_rows(ws / "data/counterfactual/counterfactuals.parquet")
              if r["dataset"] == "cvc-clinicdb" and r["parent_sample_id"] not in str(before)}
    assert "external_test" in splits
