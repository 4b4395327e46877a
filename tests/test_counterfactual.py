"""Counterfactual stage on real sample images: invariants, labels, splits, bad input, determinism."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
from PIL import Image

from cogalign_core import counterfactual, masks, tables, taxonomy
from cogalign_core.config import PipelineParams
from cogalign_core.fov import dark_border, estimate_fov
from tests.mask_workspace import build_workspace


def _run(ws: Path, stage, params: PipelineParams | None = None) -> None:
    with contextlib.chdir(ws):  # stages run with the workspace as cwd, as under DVC
        stage.run_stage(ws, params or PipelineParams(), None)


def _load(ws: Path, rel: str) -> np.ndarray:
    return np.asarray(Image.open(ws / rel))


def test_counterfactual_invariants_and_rerun(tmp_path: Path) -> None:
    ann = {r["sample_id"]: r for r in build_workspace(tmp_path, kvasir=4, cvc=2, normal=1)}
    _run(tmp_path, masks)
    params = PipelineParams()
    _run(tmp_path, counterfactual, params)
    out = tmp_path / "data/counterfactual"
    rows = tables.read_rows(out / "counterfactuals.parquet", "counterfactuals")
    accepted = [m for m in tables.read_rows(tmp_path / "data/masks/masks.parquet") if m["status"] == "accepted"]
    assert {r["parent_sample_id"] for r in rows} == {m["sample_id"] for m in accepted}  # none dropped
    by_parent: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_parent.setdefault(r["parent_sample_id"], {})[r["kind"]] = r
        parent = ann[r["parent_sample_id"]]
        assert r["split"] == parent["split"] and r["sample_id"].startswith("c")
        if r["excluded"]:
            assert r["exclusion_reason"] in counterfactual.EXCLUSION_REASONS
        if r["kind"] == "control":
            assert all(r[lv] == parent[lv] for lv in taxonomy.LEVELS) and r["answer"] == parent["answer"]
        else:
            assert r["diagnosis"] == "normal" and r["morphology"] == taxonomy.NO_LESION
            assert r["location"] == parent["location"] and r["microvascular"] == parent["microvascular"]
        if r["image_path"] is None:
            continue
        src = _load(tmp_path, parent["image_path"])
        img = _load(tmp_path, r["image_path"])
        fill = _load(tmp_path, r["fill_mask_path"]) > 127
        assert img.shape == src.shape and r["outside_identical"]
        assert np.array_equal(img[~fill], src[~fill])           # background bit-identical
        assert (np.any(img != src, axis=2)[fill]).mean() > 0.5  # the filled region really changed
        if r["kind"] == "counterfactual_normal" and parent["mask_path"]:
            gt = _load(tmp_path, parent["mask_path"]) > 127
            assert not (gt & ~fill).any() and r["gt_inside_fill"] == 1.0
    with_control = [k for k in by_parent.values() if "control" in k]
    assert with_control, "at least one matched control on the sample"
    gap = params.counterfactual.control_gap_px
    for kinds in with_control:
        cf, ctrl, both = kinds["counterfactual_normal"], kinds["control"], kinds["both"]
        assert not cf["excluded"] and not ctrl["excluded"] and not both["excluded"]
        lesion_fill = _load(tmp_path, cf["fill_mask_path"]) > 127
        region = _load(tmp_path, ctrl["fill_mask_path"]) > 127
        assert region.sum() == lesion_fill.sum()                                  # same area (and shape)
        assert not (counterfactual.dilate(lesion_fill, gap) & region).any()      # disjoint, with a gap
        src = _load(tmp_path, ann[cf["parent_sample_id"]]["image_path"])
        assert not (region & ~estimate_fov(src, params.counterfactual.fov)).any()  # inside the field of view
        assert np.array_equal(_load(tmp_path, both["fill_mask_path"]) > 127, lesion_fill | region)
    # Rerun: identical hashes.
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    _run(tmp_path, counterfactual, params)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_bad_input_is_excluded_with_reasons(tmp_path: Path) -> None:
    rows = build_workspace(tmp_path, kvasir=6, cvc=0, normal=0)
    _run(tmp_path, masks)
    table = sorted(tables.read_rows(tmp_path / "data/masks/masks.parquet", "masks"), key=lambda r: r["sample_id"])
    bad = tmp_path / "data/bad"
    bad.mkdir()
    def save(name: str, arr: np.ndarray) -> str:
        Image.fromarray(arr.astype(np.uint8) * 255).save(bad / name)
        return f"data/bad/{name}"

    def edge(h: int, w: int) -> np.ndarray:
        m = np.zeros((h, w), bool)
        m[:, 0:20] = True  # along the whole left edge: half its outline is frame edge
        return m

    def huge(h: int, w: int) -> np.ndarray:  # ~15 % of the frame: the fill fits, no room for a control
        yy, xx = np.mgrid[0:h, 0:w]
        return ((xx - w / 2) / (w * 0.22)) ** 2 + ((yy - h / 2) / (h * 0.22)) ** 2 <= 1

    makers = {"no_room_for_control": huge, "mask_empty": lambda h, w: np.zeros((h, w), bool),
              "mask_too_large": lambda h, w: np.ones((h, w), bool),
              "lesion_touches_border": edge, "mask_size_mismatch": lambda h, w: np.ones((10, 10), bool)}
    def clear_of_border(m: dict) -> bool:  # the big central fill must not reach this image's dark border
        image = np.asarray(Image.open(tmp_path / m["image_path"]).convert("RGB"))
        fill = counterfactual.dilate(huge(m["height"], m["width"]), 40)
        return not (fill & dark_border(image, 40)).any()

    roomless = next(m for m in table if clear_of_border(m))
    table = [roomless] + [m for m in table if m is not roomless]
    expected = {}
    for m, (reason, make) in zip(table, makers.items(), strict=False):
        m["mask_path"] = save(f"{reason}.png", make(m["height"], m["width"]))
        expected[m["sample_id"]] = reason
    tables.write_rows(table, tmp_path / "data/masks/masks.parquet", masks.MASKS, "masks")
    # An edge strip has about half its outline on mucosa: recovered by default, excluded when more is asked.
    params = PipelineParams.model_validate({"counterfactual": {"require_gt_inside": False,
                                                               "min_context_fraction": 0.6}})
    _run(tmp_path, counterfactual, params)
    out = tables.read_rows(tmp_path / "data/counterfactual/counterfactuals.parquet", "counterfactuals")
    got = {r["parent_sample_id"]: r["exclusion_reason"] for r in out if r["kind"] == "counterfactual_normal"}
    assert {sid: got[sid] for sid in expected} == expected
    assert len(got) == len(rows)  # every parent has a row, bad or good
    summary = json.loads((tmp_path / "data/counterfactual/summary.json").read_text())
    assert summary["parents_out"] == summary["accepted_masks"] == 6
    assert sum(summary["excluded_parents_by_reason"].values()) >= 5


def test_border_lesion_is_clipped_and_inpainted_without_black(tmp_path: Path) -> None:
    """A lesion cut by the frame edge and the black lens border is recovered: the fill is clipped to the
    lens, black pixels stay black and are never inpainting sources (the fill does not darken)."""
    build_workspace(tmp_path, kvasir=6, cvc=0, normal=0)
    _run(tmp_path, masks)
    table = sorted(tables.read_rows(tmp_path / "data/masks/masks.parquet", "masks"), key=lambda r: r["sample_id"])
    chosen = None
    for m in table:
        image = np.asarray(Image.open(tmp_path / m["image_path"]).convert("RGB"))
        outside = dark_border(image, 40)
        h, w = outside.shape
        lesion = np.zeros((h, w), bool)
        lesion[h // 2 - 30:h // 2 + 30, 0:50] = True   # on the left edge, usually across the black border
        if (lesion & outside).any() and (lesion & ~outside).sum() > 500:
            chosen = m
            break
    assert chosen is not None, "a sample image with a black border on the left"
    (tmp_path / "data/bad").mkdir()
    Image.fromarray(lesion.astype(np.uint8) * 255).save(tmp_path / "data/bad/edge.png")
    chosen["mask_path"] = "data/bad/edge.png"
    tables.write_rows(table, tmp_path / "data/masks/masks.parquet", masks.MASKS, "masks")
    params = PipelineParams.model_validate({"counterfactual": {"require_gt_inside": False}})
    _run(tmp_path, counterfactual, params)
    rows = {r["kind"]: r for r in tables.read_rows(tmp_path / "data/counterfactual/counterfactuals.parquet")
            if r["parent_sample_id"] == chosen["sample_id"]}
    cf = rows["counterfactual_normal"]
    assert not cf["excluded"] and cf["fill_clipped"] and cf["outside_identical"]
    out = _load(tmp_path, cf["image_path"])
    fill = _load(tmp_path, cf["fill_mask_path"]) > 127
    assert not (fill & outside).any()                               # clipped to the lens image
    assert np.array_equal(out[outside], image[outside])             # the black border is untouched
    ring = counterfactual.dilate(fill, 8) & ~fill & ~outside
    # Black never bleeds in: the fill is about as bright as the mucosa around it.
    assert out[fill].mean() > 0.6 * image[ring].mean()
    summary = json.loads((tmp_path / "data/counterfactual/summary.json").read_text())
    assert summary["coverage"]["usable_border_clipped"] >= 1
    assert summary["coverage"]["parents"] == len(table)
