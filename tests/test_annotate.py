"""Annotation stage: labels with provenance, clinician CSV merge, group-aware stable splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from cogalign_core import annotate, answer_format, tables, taxonomy
from cogalign_core.config import PipelineParams
from cogalign_core.config.annotate import SplitParams


def _sample(sid: str, dataset: str = "kvasir-seg", batch: str = "b0001", **kw: object) -> dict[str, object]:
    row: dict[str, object] = {"sample_id": sid, "dataset": dataset, "batch_id": batch, "role": "train",
                              "class_label": None, "group_id_hash": None, "near_dup_cluster": sid,
                              "image_path": f"img/{sid}.png", "width": 100, "height": 80, "mask_path": None,
                              "boxes": [], "kvasir_sessile": None}
    row.update(kw)
    return row


def test_mask_facts_counts_components_and_region() -> None:
    mask = np.zeros((90, 90), np.uint8)
    mask[5:15, 5:15] = 255        # upper left
    mask[70:80, 70:85] = 255      # lower right
    mask[45, 45] = 255            # 1 px: noise below the minimum component size
    facts = annotate.mask_facts(mask)
    assert facts.lesion_count == 2
    assert facts.boxes[0] == {"xmin": 5, "ymin": 5, "xmax": 14, "ymax": 14}
    assert facts.area_fraction == pytest.approx((100 + 150) / 8100)
    assert taxonomy.morphology_from_mask(facts.lesion_count, facts.area_fraction) == "multiple lesions"
    assert annotate.mask_facts(np.zeros((10, 10), np.uint8)).frame_region == "none"


def test_group_keys_union_sequences_and_near_duplicates() -> None:
    samples = [
        _sample("s1", group_id_hash="seqA"), _sample("s2", group_id_hash="seqA"),
        _sample("s3", near_dup_cluster="s2"),              # near-duplicate of s2 -> joins seqA's group
        _sample("s4"),
    ]
    keys = annotate.group_keys(samples, {"b0001": 0})
    assert keys["s1"] == keys["s2"] == keys["s3"] != keys["s4"]


def test_split_is_stable_when_groups_are_added() -> None:
    split = SplitParams()
    before = {f"g{i}": annotate.split_for(f"g{i}", "polyp", split) for i in range(200)}
    # Adding groups cannot move existing ones: the split depends only on the group's own key.
    after = {f"g{i}": annotate.split_for(f"g{i}", "polyp", split) for i in range(400)}
    assert all(after[k] == v for k, v in before.items())
    counts = {s: list(after.values()).count(s) for s in ("train", "val", "test")}
    assert 0.6 < counts["train"] / 400 < 0.8 and counts["test"] > 40


def test_clinician_csv_overrides_and_rejects(tmp_path: Path) -> None:
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text(
        "sample_id,location,morphology,microvascular,diagnosis,paris\n"
        "s1,sigmoid colon,,nice 2,,0-Is\n"          # valid: location, microvascular, Paris
        "s2,moon,,,,\n"                             # unknown location term
        "nope,,,,polyp,\n"                          # unknown sample
        "s4,cecum,extra,field,too,many,cells\n"     # malformed
        "s4,,,,,\n"                                 # nothing given
    )
    overrides, rejects = annotate.read_clinician_csv(csv_path, {"s1", "s2", "s4"})
    assert overrides == {"s1": {"location": "sigmoid colon", "microvascular": "nice 2", "morphology": "paris 0-is"}}
    assert sorted(r["reason"] for r in rejects) == ["empty_row", "malformed_row", "unknown_sample",
                                                    "unknown_term:location"]


def test_annotate_samples_labels_provenance_and_answer(tmp_path: Path) -> None:
    params = PipelineParams(batches=["b0001", "b0002"])
    samples = [
        _sample("s1", kvasir_sessile=True),
        _sample("s2", dataset="kvasir-v2", class_label="normal-cecum"),
        _sample("s3", dataset="custom", class_label="mystery-class"),
        _sample("s4", batch="b0002", role="test", boxes=[{"xmin": 10, "ymin": 10, "xmax": 29, "ymax": 19}]),
    ]
    rows, rejects = annotate.annotate_samples(samples, tmp_path, params, {"s1": {"location": "rectum"}})
    by_id = {r["sample_id"]: r for r in rows}
    assert [r["sample_id"] for r in rejects] == ["s3"] and rejects[0]["reason"] == "unmapped_label"
    assert by_id["s1"]["morphology"] == taxonomy.SESSILE_OR_FLAT
    assert (by_id["s1"]["location"], by_id["s1"]["location_source"]) == ("rectum", "clinician")
    assert (by_id["s2"]["diagnosis"], by_id["s2"]["location"]) == ("normal", "cecum")
    assert by_id["s4"]["split"] == "external_test"
    assert by_id["s4"]["lesion_count"] == 1
    parsed = answer_format.parse_answer(by_id["s2"]["answer"])
    assert parsed.valid and parsed.fields["diagnosis"] == "normal"
    out = tmp_path / "a.parquet"
    tables.write_rows(rows, out, tables.ANNOTATIONS, "annotations")
    back = tables.read_table(out, "annotations")
    assert back.num_rows == 3 and back.schema.field("split").type == tables.enum()
    assert pq.read_metadata(out).metadata[tables.META_VERSION] == tables.SCHEMA_VERSION.encode()


def test_a_new_batch_never_merges_existing_groups() -> None:
    """A new sample linked to two existing groups joins the earliest; the existing keys stay as they were."""
    first = [_sample("s1", group_id_hash="seqA"), _sample("s2", group_id_hash="seqB")]
    before = annotate.group_keys(first, {"b0001": 0, "b0002": 1})
    bridge = _sample("s3", batch="b0002", group_id_hash="seqB", near_dup_cluster="s1")
    after = annotate.group_keys([*first, bridge], {"b0001": 0, "b0002": 1})
    assert {k: after[k] for k in before} == before and before["s1"] != before["s2"]
    assert after["s3"] == after["s1"]  # the earlier of the two groups it links to
