"""The evaluate stage end to end on real sample images, real OpenCV counterfactuals and tiny Qwen3-VL models."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cogalign_core import answer_format, metrics, tables, taxonomy
from cogalign_core.annotate import write_annotation_tables
from cogalign_core.config import PipelineParams
from cogalign_core.config.evaluate import EvaluateParams
from cogalign_core.counterfactual import COUNTERFACTUALS
from cogalign_core.inpaint import OpenCVInpainter
from cogalign_core.settings import env_name
from cogalign_core.train.recipe import ARM_METHODS

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"
NA = taxonomy.NOT_ASSESSABLE
POLYP = {"location": "colon, segment unknown", "microvascular": NA, "diagnosis": "polyp"}
CECUM = {"location": "cecum", "morphology": "no lesion", "microvascular": NA, "diagnosis": "normal"}



def _lesion_row(ws: Path, stem: str, split: str, group: str, boxes: dict) -> dict:
    src = SAMPLE / "kvasir-seg" / "images" / f"{stem}.jpg"
    img_rel, mask_rel = f"data/ingest/images/{stem}.jpg", f"data/ingest/masks/{stem}.png"
    for s, rel in ((src, img_rel), (SAMPLE / "kvasir-seg" / "masks" / f"{stem}.png", mask_rel)):
        (ws / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(s, ws / rel)
    w, h = Image.open(ws / img_rel).size
    mask = np.asarray(Image.open(ws / mask_rel).convert("L")) > 127
    labels = {**POLYP, "morphology": taxonomy.morphology_from_mask(1, float(mask.mean()))}
    bb = [{k: int(b[k]) for k in ("xmin", "ymin", "xmax", "ymax")} for b in boxes[stem]["bbox"]]
    return _row(f"s{stem[:12]}", "kvasir-seg", split, group, img_rel, mask_rel, w, h, bb, labels)


def _normal_row(ws: Path, src: Path, split: str) -> dict:
    rel = f"data/ingest/images/{src.name}"
    (ws / rel).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, ws / rel)
    w, h = Image.open(ws / rel).size
    return _row(f"n{src.stem[:12]}", "kvasir-v2", split, f"g-{src.stem[:8]}", rel, None, w, h, [], CECUM)


def _row(sid, dataset, split, group, image, mask, w, h, boxes, labels) -> dict:
    row = {"sample_id": sid, "dataset": dataset, "batch_id": "b0001", "role": "train", "split": split,
           "group_key": group, "image_path": image, "width": w, "height": h, "mask_path": mask, "boxes": boxes,
           "lesion_count": len(boxes), "lesion_area_fraction": None, "frame_region": "center",
           "answer": answer_format.render_answer(labels)}
    for lv in taxonomy.LEVELS:
        row[lv] = labels[lv]
        row[f"{lv}_source"] = "dataset_label"
    return row


def _counterfactuals(ws: Path, parent: dict, inpainter: OpenCVInpainter) -> list[dict]:
    """A real counterfactual normal (lesion inpainted) and a matched control (same-area region elsewhere)."""
    image = np.asarray(Image.open(ws / parent["image_path"]).convert("RGB"))
    mask = np.asarray(Image.open(ws / parent["mask_path"]).convert("L")) > 127
    control_mask = np.roll(mask, shift=mask.shape[1] // 2, axis=1) & ~mask
    out = []
    for kind, m, labels in (("counterfactual_normal", mask, {**parent, "morphology": "no lesion",
                                                              "diagnosis": "normal"}),
                            ("control", control_mask, parent)):
        rel = f"data/counterfactual/images/{kind}-{parent['sample_id']}.png"
        (ws / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(inpainter.inpaint(image, m)).save(ws / rel)
        row = {"sample_id": f"{kind[:2]}{parent['sample_id']}", "parent_sample_id": parent["sample_id"],
               "kind": kind, "split": parent["split"], "image_path": rel, "excluded": False,
               "exclusion_reason": None}
        row.update({lv: labels[lv] for lv in taxonomy.LEVELS})
        row.update({f"{lv}_source": "derived_from_mask" for lv in taxonomy.LEVELS})
        out.append(row)
    return out


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cogalign_core.train import base_model
    from cogalign_core.train.recipe import load_recipe

    ws = tmp_path_factory.mktemp("ws")
    boxes = json.loads((SAMPLE / "kvasir-seg" / "bboxes.json").read_text())
    stems = sorted(p.stem for p in (SAMPLE / "kvasir-seg" / "images").iterdir())[:7]
    normals = sorted((SAMPLE / "kvasir-v2-normal-cecum" / "normal-cecum").iterdir())[:5]
    rows = [_lesion_row(ws, s, "train", f"g{i}", boxes) for i, s in enumerate(stems[:3])]
    rows += [_normal_row(ws, normals[0], "train")]
    # test: three lesions (two from one sequence group), two normals; external_test: one each
    rows += [_lesion_row(ws, s, "test", g, boxes) for s, g in zip(stems[3:6], ["gA", "gA", "gB"], strict=True)]
    rows += [_normal_row(ws, n, "test") for n in normals[1:3]]
    rows += [_lesion_row(ws, stems[6], "external_test", "gX", boxes), _normal_row(ws, normals[3], "external_test")]
    # a test image that is unreadable at evaluation time: skipped with a reason, never a crash
    broken = _normal_row(ws, normals[4], "test")
    (ws / broken["image_path"]).write_bytes(b"\xff\xd8\xff truncated")
    rows.append(broken)
    write_annotation_tables(rows, ws)

    inpainter = OpenCVInpainter("telea", 3)
    test_lesions = [r for r in rows if r["split"] == "test" and r["diagnosis"] == "polyp"]
    cf = [c for r in test_lesions for c in _counterfactuals(ws, r, inpainter)]
    cf.append({**cf[0], "sample_id": "excluded1", "excluded": True, "exclusion_reason": "mask_too_large"})
    tables.write_rows(cf, ws / "data/counterfactual/counterfactuals.parquet", COUNTERFACTUALS, "counterfactuals")

    # The base_model stage's own tiny builder (tokenizer from the train split); the three "trained" models
    # are copies of it: this test checks the evaluation machinery, not training.
    base_model.build_offline(ws, load_recipe("tiny", "sft"), _params())
    for stage in ARM_METHODS:
        shutil.copytree(ws / "data/base_model/model", ws / f"data/{stage}/model")
    return ws


def _params() -> PipelineParams:
    return PipelineParams(model={"recipe": "tiny"},
                          evaluate=EvaluateParams(max_samples_per_condition=3, bootstrap_resamples=50,
                                                  max_new_tokens=24, gallery_size=2))


@pytest.mark.slow
def test_evaluate_stage_outputs_are_complete_honest_and_deterministic(workspace: Path, monkeypatch):
    from cogalign_core import evaluate

    monkeypatch.chdir(workspace)
    monkeypatch.setenv(env_name("generate_batch_size"), "8")  # an execution setting, not a param
    evaluate.run_stage(workspace, _params(), None)
    out = workspace / "data/evaluate"
    first = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    summary = json.loads((out / "summary.json").read_text())
    # in = evaluated + skipped: the broken normal's own prompt and the shuffled probe showing it are skipped
    assert summary["prompts_built"] == summary["prompts_evaluated"] + summary["prompts_skipped"]
    assert {s["reason"] for s in summary["skipped"]} == {"image_unreadable"}
    test_counts = summary["conditions"]["test"]
    assert test_counts["lesion"] == {"available": 3, "chosen": 3}
    assert test_counts["normal"] == {"available": 3, "chosen": 3}
    assert test_counts["counterfactual_normal"]["excluded"] == {"mask_too_large": 1}
    assert test_counts["counterfactual_normal"]["chosen"] == 3 and test_counts["control"]["chosen"] == 3

    preds = tables.read_rows(out / "predictions.parquet", expected="predictions")
    assert len(preds) == summary["predictions"] == len(ARM_METHODS) * summary["prompts_evaluated"]
    assert {p["model"] for p in preds} == {"sft", "sft_cf", "rl_no_cf", "rl"}
    assert {p["section"] for p in preds} == {"test", "external_test"}
    assert {p["condition"] for p in preds} >= {"lesion", "normal", "counterfactual_normal", "control", "blank",
                                               "shuffled"}
    for p in preds:
        assert isinstance(p["completion"], str)
        # stored parsed fields agree with a fresh parse of the stored completion
        parsed = answer_format.parse_answer(p["completion"], grounding=p["grounding"])
        assert p["format_valid"] == parsed.valid
        assert p["pred_diagnosis"] == parsed.term("diagnosis")
        if p["condition"] in ("blank", "shuffled"):
            assert p["gold_diagnosis"] is None and p["correct_diagnosis"] is None
        assert p["correct_microvascular"] is None  # never assessable on white-light images
    shuffled = [p for p in preds if p["condition"] == "shuffled"]
    assert shuffled and all(p["sample_id"] != p["parent_sample_id"] for p in shuffled)

    tree = json.loads((out / "metrics.json").read_text())
    assert set(tree) == {"sft", "sft_cf", "rl_no_cf", "rl"}
    for model in tree.values():
        assert set(model) == {"test", "external_test"}
        allm = model["test"]["all"]
        for stat in allm.values():
            assert set(stat) == {"value", "ci_low", "ci_high", "n", "constant_baseline", "majority_baseline"}
        assert allm["accuracy_microvascular"] == {**allm["accuracy_microvascular"], "value": None, "n": 0}
        assert allm["real_normal_specificity"]["n"] == 2          # the broken normal was skipped
        assert allm["counterfactual_specificity"]["n"] == 3       # separate, never pooled
        assert allm["lesion_sensitivity"]["n"] == 3
        assert allm["box_iou"]["n"] == 3                           # tiny recipe asks for boxes
        assert allm["counterfactual_control_gap"]["n"] == 3
        assert allm["counterfactual_specificity"]["constant_baseline"] == 1.0
        assert allm["lesion_sensitivity"]["majority_baseline"] == 1.0  # train majority is polyp
        assert set(model["test"]["by_source"]) == {"kvasir-seg", "kvasir-v2"}
        assert model["external_test"]["all"]["lesion_sensitivity"]["n"] == 1

    with open(out / "plots/confusion_rl_test.csv") as f:
        conf = list(csv.DictReader(f))
    assert len(conf) == 5 and {r["actual"] for r in conf} == {"polyp", "normal"}
    assert (out / "plots/level_accuracy.csv").read_text().startswith("model,section,level,accuracy")

    page = (out / "report.html").read_text()
    assert "Diagnosis accuracy" in page and "external_test" in page
    assert page.count("data:image/jpeg;base64,") >= 2 and page.count("data:image/png;base64,") >= 6
    text = re.sub(r"data:image/[a-z]+;base64,[A-Za-z0-9+/=]+", "", page)
    assert "http://" not in text and "https://" not in text and "//cdn" not in text
    # Counterfactual coverage by reason and the syntheses before/after (images decoded from the workspace).
    coverage = text[text.index("<h2>Counterfactual coverage</h2>"):]
    assert "excluded: mask_too_large</th><td class=\"num\">1<" in coverage
    before_after = coverage[coverage.index("before / after"):]
    assert before_after.count("<figcaption>counterfactual normal</figcaption>") >= 1
    assert "not available" not in before_after.split("<h3>")[1]  # original, counterfactual and control shown

    prov = json.loads((out / "provenance.json").read_text())
    assert "data/annotate/annotations.parquet" in prov["inputs"] and "data/rl/model" in prov["inputs"]

    # a rerun gives bit-identical outputs (no timestamps, seeded everything)
    evaluate.run_stage(workspace, _params(), None)
    again = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert again.keys() == first.keys()
    assert [k for k in first if first[k] != again[k]] == []


def test_prompts_pair_derived_images_with_chosen_parents_only():
    from cogalign_core.canvas import CanvasSpec
    from cogalign_core.evaluate import build_prompts

    ann = [_row(f"l{i}", "kvasir-seg", "test", f"g{i}", f"i{i}.png", None, 100, 100, [], {**POLYP,
                "morphology": "single small lesion"}) for i in range(4)]
    cf = [{"sample_id": f"c{i}", "parent_sample_id": f"l{i}", "kind": "counterfactual_normal", "split": "test",
           "image_path": f"c{i}.png", "excluded": False, "exclusion_reason": None,
           **{lv: CECUM[lv] for lv in taxonomy.LEVELS}} for i in range(4)]
    cf.append({**cf[0], "sample_id": "orphan", "parent_sample_id": "gone"})
    prompts, counts = build_prompts(ann, cf, cap=2, seed=0, spec=CanvasSpec())
    lesions = {p.parent_sample_id for p in prompts if p.condition == metrics.LESION}
    derived = [p for p in prompts if p.condition == metrics.COUNTERFACTUAL]
    assert len(lesions) == 2 and {p.parent_sample_id for p in derived} == lesions
    c = counts["test"]["counterfactual_normal"]
    assert c == {"available": 5, "excluded": {}, "parent_missing": 1, "parent_not_chosen": 2, "chosen": 2}
    assert counts["test"]["normal"] == {"available": 0, "chosen": 0}
    # probes: one blank and one shuffled per chosen real image; shuffled never shows the image itself
    shuffled = [p for p in prompts if p.condition == metrics.SHUFFLED]
    assert len(shuffled) == 2 and all(p.sample_id != p.parent_sample_id for p in shuffled)
    assert build_prompts(ann, cf, cap=2, seed=0, spec=CanvasSpec()) == (prompts, counts)


def test_shuffled_probe_mixes_classes_at_about_the_class_rate():
    from cogalign_core.canvas import CanvasSpec
    from cogalign_core.evaluate import build_prompts

    ann = [_row(f"l{i:02d}", "kvasir-seg", "test", f"g{i}", f"l{i}.png", None, 100, 100, [],
               {**POLYP, "morphology": "single small lesion"})
           for i in range(30)]
    ann += [_row(f"n{i:02d}", "kvasir-v2", "test", f"h{i}", f"n{i}.png", None, 100, 100, [], CECUM)
            for i in range(30)]
    prompts, _ = build_prompts(ann, [], cap=None, seed=0, spec=CanvasSpec())
    shuffled = [p for p in prompts if p.condition == metrics.SHUFFLED]
    assert len(shuffled) == 60 and all(p.sample_id != p.parent_sample_id for p in shuffled)
    assert sorted(p.sample_id for p in shuffled) == sorted(a["sample_id"] for a in ann)  # a derangement
    # Half the images are of each class: about half the pairs show the other class (not 2 of 60).
    cross = sum(p.sample_id[0] != p.parent_sample_id[0] for p in shuffled)
    assert 15 <= cross <= 45


def test_a_capped_evaluation_takes_every_source_in_turn():
    from cogalign_core.canvas import CanvasSpec
    from cogalign_core.evaluate import build_prompts

    polyp = {**POLYP, "morphology": "single small lesion"}
    ann = [_row(f"k{i:02d}", "kvasir-seg", "test", f"g{i}", f"k{i}.png", None, 100, 100, [], polyp) for i in range(20)]
    ann.append(_row("c00", "cvc-clinicdb", "test", "s0", "c0.png", None, 100, 100, [], polyp))
    for seed in range(5):  # one CVC frame among 21 lesions is always among 2 capped picks
        prompts, counts = build_prompts(ann, [], cap=2, seed=seed, spec=CanvasSpec())
        lesions = [p for p in prompts if p.condition == metrics.LESION]
        assert counts["test"]["lesion"] == {"available": 21, "chosen": 2}
        assert {p.dataset for p in lesions} == {"kvasir-seg", "cvc-clinicdb"}
