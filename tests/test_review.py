"""Review round trip: export the queue, a clinician fills it in, import, the mask stage uses it."""

from __future__ import annotations

import contextlib
import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

from cogalign_core import masks, review, tables
from cogalign_core.config import PipelineParams
from tests.mask_workspace import build_workspace, write_annotations


def _run_masks(ws: Path) -> None:
    with contextlib.chdir(ws):  # stages run with the workspace as cwd, as under DVC
        masks.run_stage(ws, PipelineParams(), None)


def test_review_round_trip_csv_and_json(tmp_path: Path) -> None:
    rows = build_workspace(tmp_path, kvasir=3, cvc=0, normal=0)
    for r in rows:
        r.update(mask_path=None, boxes=[])  # new clinical data: no mask, no box
    write_annotations(tmp_path, rows)
    review.ensure_prompts_file(tmp_path)
    _run_masks(tmp_path)
    task_csv = tmp_path / "tasks.csv"
    assert review.export_review(tmp_path, task_csv) == 3
    assert review.export_review(tmp_path, tmp_path / "tasks.json") == 3
    with open(task_csv, newline="") as f:
        tasks = list(csv.DictReader(f))
    assert {t["reason"] for t in tasks} == {"no_prompt"}
    assert all(Path(t["image_file"]).is_file() for t in tasks)
    # The clinician: a box for the first, a drawn mask for the second, garbage for the third, plus junk rows.
    w = rows[0]["width"]
    by_id = {t["sample_id"]: t for t in tasks}
    first, second, third = sorted(by_id)
    by_id[first]["boxes"] = json.dumps([[100, 80, 220, 200]])
    by_id[first]["points"] = json.dumps([[160, 140, 1]])
    drawn = np.zeros((next(r["height"] for r in rows if r["sample_id"] == second),
                      next(r["width"] for r in rows if r["sample_id"] == second)), np.uint8)
    drawn[50:120, 60:150] = 200
    Image.fromarray(drawn).save(tmp_path / "drawn.png")
    by_id[second]["mask_path"] = "drawn.png"
    by_id[third]["boxes"] = json.dumps([[10, 10, w + 50, 20]])
    extra = [{**by_id[first]}, {"sample_id": "s_nope", "boxes": "[[1,1,2,2]]"},
             {"sample_id": third, "points": "[[1, 2]]"}]
    with open(task_csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(review.TASK_COLUMNS))
        writer.writeheader()
        writer.writerows([by_id[first], by_id[second], by_id[third], *extra])
    report = review.import_review_report(tmp_path, task_csv)
    assert report.accepted == [first, second]
    assert [(r["row"], r["reason"]) for r in report.rejected] == [
        (3, "box_out_of_frame"), (4, "duplicate_sample"), (5, "unknown_sample"), (6, "bad_points")]
    assert json.loads((tmp_path / review.IMPORT_REPORT).read_text())["rejected"] == report.rejected
    prompts = review.read_clinician_prompts(tmp_path / review.PROMPTS_PATH)
    assert prompts[first]["boxes"] == [{"xmin": 100, "ymin": 80, "xmax": 220, "ymax": 200}]
    assert prompts[first]["points"] == [{"x": 160, "y": 140, "label": 1}]
    assert prompts[second]["provenance"] == "clinician" and prompts[second]["mask_path"].startswith("data/review/")
    # The next mask run uses them: clinician box -> box_ellipse mask, clinician mask -> passed through.
    _run_masks(tmp_path)
    table = {r["sample_id"]: r for r in tables.read_rows(tmp_path / "data/masks/masks.parquet", "masks")}
    assert table[first]["status"] == "accepted" and table[first]["prompt_source"] == "clinician"
    assert table[first]["source"] == "box_ellipse"
    assert table[second]["status"] == "accepted" and table[second]["source"] == "clinician"
    stored = np.asarray(Image.open(tmp_path / table[second]["mask_path"])) > 127
    assert np.array_equal(stored, drawn > 127)
    assert table[third]["status"] == "review" and table[third]["review_reason"] == "no_prompt"
    # JSON import works the same way and merges.
    tasks_json = json.loads((tmp_path / "tasks.json").read_text())
    for t in tasks_json:
        if t["sample_id"] == third:
            t["boxes"] = [[20, 30, 90, 110]]
    (tmp_path / "tasks.json").write_text(json.dumps(tasks_json))
    assert review.import_review(tmp_path, tmp_path / "tasks.json") == 1
    assert set(review.read_clinician_prompts(tmp_path / review.PROMPTS_PATH)) == {first, second, third}
