"""The HTML report renders from a small hand-made run: table, plots, real images, and no URL."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from cogalign_core import metrics, report
from cogalign_core.answer_format import render_answer

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"
NA = "not assessable"
POLYP = {"location": "colon, segment unknown", "morphology": "single small lesion", "microvascular": NA,
         "diagnosis": "polyp"}
NORMAL = {"location": "cecum", "morphology": "no lesion", "microvascular": NA, "diagnosis": "normal"}
CONSTANT = {"location": NA, "morphology": "no lesion", "microvascular": NA, "diagnosis": "normal"}


def _rows(model: str, good: bool):
    rows = []
    for i, gold in enumerate([POLYP, POLYP, NORMAL]):
        cond = "lesion" if gold is POLYP else "normal"
        text = render_answer(gold) if good or i == 2 else "no idea"
        r = {"model": model, "section": "test", "condition": cond, "parent_sample_id": f"s{i}",
             "group_key": f"g{i}", "dataset": "kvasir-seg" if i < 2 else "kvasir-v2", "grounding": False,
             "completion": text, "gold_boxes": None, **{f"gold_{k}": v for k, v in gold.items()}}
        rows.append(metrics.score_row(r))
    return rows


def test_report_is_self_contained_with_table_plots_and_gallery(tmp_path: Path):
    # a workspace-like folder holding real sample images (original + mask)
    img = sorted((SAMPLE / "kvasir-seg" / "images").iterdir())[0]
    mask = SAMPLE / "kvasir-seg" / "masks" / (img.stem + ".png")
    (tmp_path / "img").mkdir()
    shutil.copy(img, tmp_path / "img" / img.name)
    shutil.copy(mask, tmp_path / "img" / mask.name)

    tree = {}
    confusion = {}
    for model, good in (("sft", False), ("rl", True)):
        rows = _rows(model, good)
        tree[model] = {"test": {"all": metrics.summarise(rows, POLYP, CONSTANT, n_resamples=50),
                                "by_source": {"kvasir-seg": metrics.summarise(rows[:2], POLYP, CONSTANT, 50)}}}
        confusion[f"{model}/test"] = metrics.confusion_pairs(rows)
    gallery = [report.GalleryItem("s0 (kvasir-seg)", [("original", f"img/{img.name}"), ("mask", f"img/{mask.name}"),
                                                      ("counterfactual", None)],
                                  {"sft": {"lesion": "unparsed: no idea"}, "rl": {"lesion": "polyp / single small"}})]
    out = tmp_path / "report.html"
    report.write_report(out, tree, confusion, gallery, tmp_path, notes=["two models, three images"])
    page = out.read_text()

    assert page.startswith("<!DOCTYPE html>")
    assert "Diagnosis accuracy" in page and "<table>" in page
    assert "constant answer" in page and "majority class" in page
    # the never-assessable level shows n=0 and no value, not a percentage
    assert "n=0, no value" in page
    # plots (PNG) and gallery thumbnails (JPEG original, PNG mask) are embedded
    assert page.count('src="data:image/png;base64,') >= 4
    assert page.count('src="data:image/jpeg;base64,') == 1
    assert "not available" in page and "unparsed: no idea" in page
    # no external reference at all (data URIs stripped first: base64 could contain '//')
    text = re.sub(r"data:image/[a-z]+;base64,[A-Za-z0-9+/=]+", "", page)
    for bad in ("http://", "https://", "//cdn", "src=\"/", "href="):
        assert bad not in text
    # every src is a data URI
    assert all(s.startswith("data:") for s in re.findall(r'src="([^"]*)"', page))

    # deterministic: same inputs, same bytes
    report.write_report(tmp_path / "again.html", tree, confusion, gallery, tmp_path, notes=["two models, three images"])
    assert (tmp_path / "again.html").read_bytes() == out.read_bytes()
