"""Labels at ingest and loud counts: an unknown dataset without labels ends the run with a warning naming the
batch; the same kind of folder with `--diagnosis polyp` yields masks and counterfactuals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cogalign.cli import app
from cogalign_core import accounting, raw_batch, tables, taxonomy
from tests.conftest import SAMPLE, copy_workspace


def _unknown_seg_folder(dst: Path, start: int, n: int) -> Path:
    """``n`` Kvasir-SEG images and masks, mirrored (new pixels, so new samples), in a folder whose name
    the taxonomy does not know (dataset ``custom``)."""
    images = sorted((SAMPLE / "kvasir-seg" / "images").iterdir())[start:start + n]
    for img in images:
        mask = next((SAMPLE / "kvasir-seg" / "masks").glob(img.stem + ".*"))
        for src, sub in ((img, "images"), (mask, "masks")):
            (dst / sub).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.asarray(Image.open(src))[:, ::-1].copy()).save(dst / sub / f"{src.stem}.png")
    return dst


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


@pytest.mark.slow
def test_unlabelled_batch_warns_and_a_labelled_one_yields_masks_and_counterfactuals(
        spine_workspace: Path, tmp_path: Path) -> None:
    ws = copy_workspace(spine_workspace, tmp_path / "ws")
    w = str(ws)
    code, out = _cli("ingest", str(_unknown_seg_folder(tmp_path / "clinic-a", 0, 5)), "--workspace", w)
    assert code == 0, out
    code, out = _cli("ingest", str(_unknown_seg_folder(tmp_path / "clinic-b", 5, 5)), "--workspace", w,
                     "--diagnosis", "polyp", "--location", "colon")
    assert code == 0, out
    assert json.loads((ws / "data/raw/b0003/batch.json").read_text())["labels"] == {
        "location": "colon, segment unknown", "diagnosis": "polyp"}

    code, out = _cli("run", "--workspace", w, "--until", "counterfactual")
    assert code == 0, out
    assert "warning: batch b0002 yields no usable sample: 5 samples in, 0 usable after annotate " \
           "(unmapped_label 5)" in " ".join(out.split())
    assert "b0003" not in out.split("warning:", 1)[1]  # the labelled batch is fine
    for stage in ("ingest_batch@b0002", "annotate", "masks", "counterfactual"):
        assert any(line.startswith(f"{stage}: ") and " in, " in line for line in out.splitlines()), (stage, out)

    samples = {s["sample_id"]: s for s in tables.read_rows(ws / "data/ingest/samples.parquet")}
    labelled = {sid for sid, s in samples.items() if s["batch_id"] == "b0003"}
    assert len(labelled) == 5 and {sid for sid, s in samples.items() if s["batch_id"] == "b0002"}
    ann = {a["sample_id"]: a for a in tables.read_rows(ws / "data/annotate/annotations.parquet")}
    assert all(ann[sid]["diagnosis"] == "polyp" and ann[sid]["diagnosis_source"] == "ingest_label"
               and ann[sid]["location"] == "colon, segment unknown" and ann[sid]["morphology_source"]
               == "derived_from_mask" for sid in labelled)
    assert not any(a["batch_id"] == "b0002" for a in ann.values())
    masks = {m["sample_id"]: m for m in tables.read_rows(ws / "data/masks/masks.parquet")}
    assert all(masks[sid]["status"] == "accepted" and masks[sid]["source"] == "ground_truth" for sid in labelled)
    cfs = tables.read_rows(ws / "data/counterfactual/counterfactuals.parquet")
    assert {c["parent_sample_id"] for c in cfs if c["kind"] == "counterfactual_normal"} >= labelled

    # --strict turns the warning into a failure (the run itself is up to date now).
    code, out = _cli("run", "--workspace", w, "--until", "counterfactual", "--strict")
    assert code != 0 and "b0002" in out and "--strict" in out


def test_labels_are_validated_against_the_taxonomy(tmp_path: Path) -> None:
    src = _unknown_seg_folder(tmp_path / "src", 0, 1)
    with pytest.raises(ValueError, match="not a diagnosis term; terms: normal, polyp"):
        raw_batch.register_batch(src, tmp_path / "raw", "b0001", labels={"diagnosis": "polypp"})
    assert not (tmp_path / "raw" / "b0001").exists()
    assert taxonomy.validate_labels({"location": "Colon", "diagnosis": " Polyp ", "morphology": ""}) == {
        "location": "colon, segment unknown", "diagnosis": "polyp"}


def test_manifest_level_columns_label_each_image(tmp_path: Path) -> None:
    from cogalign_core import ingest_plan

    src = tmp_path / "m"
    for name, seed in (("a.png", 1), ("b.png", 2), ("c.png", 3)):
        (src).mkdir(exist_ok=True)
        Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(src / name)
    (src / "manifest.csv").write_text("path,diagnosis,location\na.png,polyp,\nb.png,normal,cecum\nc.png,tumour,\n")
    batch = raw_batch.register_batch(src, tmp_path / "raw", "b0001", layout="manifest", labels={"location": "colon"})
    plan = ingest_plan.plan_batch(batch, tmp_path / "raw" / "b0001" / raw_batch.FILES_DIR, "salt")
    assert {t.rel_path: t.labels for t in plan.tasks} == {"a.png": {"diagnosis": "polyp"},
                                                          "b.png": {"location": "cecum", "diagnosis": "normal"}}
    (bad,) = plan.quarantine
    assert bad["reason"] == "malformed_manifest_row" and "'tumour' is not a diagnosis term" in bad["detail"]


def test_accounting_blocks_must_conserve_rows() -> None:
    assert accounting.block("samples", 5, 3, {"a": 2, "b": 0}) == {"unit": "samples", "in": 5, "out": 3,
                                                                   "dropped": {"a": 2}}
    with pytest.raises(AssertionError, match="accounting broken"):
        accounting.block("samples", 5, 3, {"a": 1})


def test_annotate_uses_the_labels_given_at_ingest(tmp_path: Path) -> None:
    from cogalign_core.annotate import annotate_samples
    from cogalign_core.config import PipelineParams

    def sample(sid: str, dataset: str, labels: dict[str, str] | None) -> dict:
        return {"sample_id": sid, "batch_id": "b0001", "role": "train", "dataset": dataset, "name_hash": sid,
                "image_path": f"data/ingest/batches/b0001/images/{sid}.png", "width": 100, "height": 100,
                "boxes": [{"xmin": 10, "ymin": 10, "xmax": 29, "ymax": 29}], "labels": labels}

    samples = [sample("s1", "custom", {"diagnosis": "polyp", "location": "colon, segment unknown"}),
               sample("s2", "kvasir-seg", {"diagnosis": "normal"}),  # relabelled: the finding changes
               sample("s3", "custom", None)]
    rows, rejects = annotate_samples(samples, tmp_path, PipelineParams(batches=["b0001"]))
    by_id = {r["sample_id"]: r for r in rows}
    assert [(r["sample_id"], r["reason"]) for r in rejects] == [("s3", "unmapped_label")]
    s1, s2 = by_id["s1"], by_id["s2"]
    assert (s1["diagnosis"], s1["diagnosis_source"], s1["location"], s1["location_source"]) == (
        "polyp", "ingest_label", "colon, segment unknown", "ingest_label")
    assert (s1["morphology"], s1["microvascular"]) == ("not assessable", "not assessable")
    assert (s2["diagnosis"], s2["diagnosis_source"], s2["morphology"], s2["morphology_source"]) == (
        "normal", "ingest_label", "no lesion", "ingest_label")
    assert (s2["location"], s2["location_source"]) == ("colon, segment unknown", "dataset_label")
