"""Mask stage on a real sample workspace: outputs, QC report, bad input routed to review."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cogalign_core import masks, tables
from cogalign_core.config import PipelineParams
from cogalign_core.executor import WORKERS_ENV
from tests.mask_workspace import build_workspace, write_annotations


def _run(ws: Path, params: PipelineParams | None = None) -> None:
    with contextlib.chdir(ws):  # stages run with the workspace as cwd, as under DVC
        masks.run_stage(ws, params or PipelineParams(), None)


def test_mask_stage_outputs_and_qc(tmp_path: Path) -> None:
    rows = build_workspace(tmp_path, kvasir=2, cvc=2, normal=1)
    all_qc = PipelineParams.model_validate({"masks": {"qc_fraction": 1.0}})
    _run(tmp_path, all_qc)
    out = tmp_path / "data/masks"
    table = tables.read_rows(out / "masks.parquet", "masks")
    assert [r["sample_id"] for r in table] == sorted(r["sample_id"] for r in rows)
    by_status = {r["sample_id"]: r["status"] for r in table}
    assert sorted(by_status.values()) == ["accepted"] * 4 + ["no_lesion"]
    gt_paths = {r["sample_id"]: r["mask_path"] for r in rows}
    for r in table:
        if r["status"] == "accepted":
            m = np.asarray(Image.open(tmp_path / r["mask_path"]))
            assert set(np.unique(m)) <= {0, 255} and m.shape == (r["height"], r["width"])
            gt = np.asarray(Image.open(tmp_path / gt_paths[r["sample_id"]]).convert("L")) > 0
            assert r["source"] == "ground_truth" and np.array_equal(m > 0, gt)  # the stored mask is the GT, pixelwise
            qc = {s["segmenter"]: s for s in r["segmenter_qc"]}
            assert set(qc) == {"box_ellipse", "grabcut"}
            # The QC segmenters are measured against the ground truth: real overlaps, never the GT with itself.
            assert all(0 < qc[s]["dice_vs_gt"] < 0.999 for s in qc), qc
            assert r["dice_vs_baseline"] == pytest.approx(qc["box_ellipse"]["dice_vs_gt"], abs=1e-4)
    prompt_sources = {r["dataset"]: r["prompt_source"] for r in table if r["status"] == "accepted"}
    assert prompt_sources == {"kvasir-seg": "dataset_box", "cvc-clinicdb": "gt_mask_box"}
    qc = json.loads((out / "qc.json").read_text())
    assert qc["baseline"] == "box_ellipse" and set(qc["segmenters"]) == {"box_ellipse", "grabcut"}
    for ds in ("all", "kvasir-seg", "cvc-clinicdb"):
        assert set(qc["by_dataset"][ds]) == {"box_ellipse", "grabcut"}
        grabcut = qc["by_dataset"][ds]["grabcut"]  # the ratio is paired on the same samples
        assert grabcut["dice_ratio_vs_baseline"] == pytest.approx(
            grabcut["mean_dice_vs_gt"] / grabcut["baseline_dice_same_samples"], abs=1e-3)
        assert 0.5 < qc["by_dataset"][ds]["box_ellipse"]["mean_dice_vs_gt"] <= 1.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["in"] == summary["accepted"] + summary["review"] + summary["no_lesion"] == 5
    assert (out / "provenance.json").exists()
    assert tables.read_rows(out / "review.parquet", "mask_review") == []
    # Rerun: identical bytes (deterministic outputs, no timestamps).
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    _run(tmp_path, all_qc)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_bad_input_goes_to_review_with_reasons(tmp_path: Path) -> None:
    rows = build_workspace(tmp_path, kvasir=3, cvc=1, normal=0)
    h, w = rows[0]["height"], rows[0]["width"]
    bad = tmp_path / "data/ingest/bad"
    bad.mkdir(parents=True)
    Image.fromarray(np.zeros((h, w), np.uint8)).save(bad / "empty.png")
    Image.fromarray(np.full((h, w), 255, np.uint8)).save(bad / "full.png")
    Image.fromarray(np.full((10, 10), 255, np.uint8)).save(bad / "small.png")
    rows[0].update(mask_path="data/ingest/bad/empty.png", boxes=[])      # empty GT, no box -> gt_mask_empty
    rows[1].update(mask_path="data/ingest/bad/full.png")                 # GT over 90 % of the frame
    rows[2].update(mask_path="data/ingest/bad/small.png")                # GT of another size (box still there)
    rows[3].update(mask_path=None, boxes=[])                             # lesion with no prompt at all
    write_annotations(tmp_path, rows)
    _run(tmp_path)
    review = {r["sample_id"]: r for r in tables.read_rows(tmp_path / "data/masks/review.parquet", "mask_review")}
    reasons = {sid: r["reason"] for sid, r in review.items()}
    assert reasons == {rows[0]["sample_id"]: "gt_mask_empty", rows[1]["sample_id"]: "mask_too_large",
                       rows[2]["sample_id"]: "gt_mask_size_mismatch", rows[3]["sample_id"]: "no_prompt"}
    assert all(r["detail"] for r in review.values())
    # The size-mismatch sample still carries its prompt box and the box_ellipse candidate for the clinician.
    assert review[rows[2]["sample_id"]]["boxes"] and review[rows[2]["sample_id"]]["mask_path"]
    summary = json.loads((tmp_path / "data/masks/summary.json").read_text())
    assert summary["in"] == 4 and summary["review"] == 4


def test_sam_segmenter_without_checkpoint_fails_clearly(tmp_path: Path) -> None:
    from cogalign_core.segmenters.sam import SamCheckpointError

    build_workspace(tmp_path, kvasir=1, cvc=0, normal=0)
    params = PipelineParams.model_validate({"masks": {"segmenter": "sam"}})
    with pytest.raises(SamCheckpointError, match=r"masks\.sam\.checkpoint"):
        _run(tmp_path, params)


def test_sam_in_the_stage_with_a_tiny_random_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stage's sam path end to end; the loader is swapped for a tiny random model (tests only)."""
    from cogalign_core.segmenters import sam

    build_workspace(tmp_path, kvasir=2, cvc=1, normal=0)
    monkeypatch.setattr(sam, "load_sam", lambda *a, **k: sam.tiny_random_sam(img_size=64))
    monkeypatch.setenv(WORKERS_ENV, "1")
    params = PipelineParams.model_validate({"masks": {"segmenter": "sam", "use_ground_truth": False,
                                                      "qc_segmenters": ["box_ellipse"]}})
    _run(tmp_path, params)
    table = tables.read_rows(tmp_path / "data/masks/masks.parquet", "masks")
    assert len(table) == 3
    review = {r["sample_id"]: r for r in tables.read_rows(tmp_path / "data/masks/review.parquet", "mask_review")}
    for r in table:
        qc = {s["segmenter"]: s for s in r["segmenter_qc"]}
        assert set(qc) == {"sam", "box_ellipse"}
        # sam made every candidate mask (ground truth is off), whatever QC then decided about it.
        assert r["source"] == "sam" and r["mask_path"] and r["score"] == pytest.approx(qc["sam"]["score"])
        m = np.asarray(Image.open(tmp_path / r["mask_path"]))
        assert m.shape == (r["height"], r["width"]) and set(np.unique(m)) <= {0, 255}
        assert r["area_fraction"] == pytest.approx((m > 0).mean(), abs=1e-6)
        if r["status"] == "accepted":
            assert r["review_reason"] is None and r["sample_id"] not in review
        else:
            assert r["status"] == "review" and review[r["sample_id"]]["reason"] == r["review_reason"]
            assert r["review_reason"] in {"mask_empty", "mask_too_large", "mask_too_small", "too_many_components",
                                          "low_sam_score", "low_prompt_agreement", "low_dice_vs_gt"}
    qc = json.loads((tmp_path / "data/masks/qc.json").read_text())
    assert qc["by_dataset"]["all"]["sam"]["n"] == 3  # measured against GT and the ellipse baseline
    assert qc["by_dataset"]["all"]["sam"]["mean_dice_vs_baseline"] is not None
