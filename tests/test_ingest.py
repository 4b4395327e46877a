"""Ingest stages on the bundled real sample: counts, lossless storage, determinism, incremental batches."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from cogalign_core import imaging, ingest, ingest_merge, near_duplicates, raw_batch, tables
from cogalign_core.config import PipelineParams, PrivacyParams, dump_params
from cogalign_core.executor import WORKERS_ENV

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"
SALT = "ingest-test-salt"


def _workspace(ws: Path, batches: list[str]) -> PipelineParams:
    params = PipelineParams(batches=batches, privacy=PrivacyParams(salt=SALT))
    ws.mkdir(parents=True, exist_ok=True)
    (ws / "params.yaml").write_text(dump_params(params))
    return params


@pytest.fixture(scope="module")
def sample_ws(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    ws = tmp_path_factory.mktemp("sample_ws")
    params = _workspace(ws, ["b0001"])
    raw_batch.register_batch(SAMPLE, ws / "data/raw", "b0001")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(WORKERS_ENV, "2")  # exercises the process pool
        ingest.run_batch_stage(ws, params, "b0001")
    ingest_merge.run_stage(ws, params)
    return {"ws": ws, "params": params,
            "samples": tables.read_rows(ws / "data/ingest/samples.parquet", "samples"),
            "summary": json.loads((ws / "data/ingest/summary.json").read_text())}


def test_sample_counts_labels_and_conservation(sample_ws: dict[str, Any]) -> None:
    rows = sample_ws["samples"]
    by_ds: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_ds.setdefault(r["dataset"], []).append(r)
    n_kvasir = len(list((SAMPLE / "kvasir-seg/images").iterdir()))
    n_cvc = len(list((SAMPLE / "cvc-clinicdb/images").iterdir()))
    n_cecum = len(list((SAMPLE / "kvasir-v2-normal-cecum/normal-cecum").iterdir()))
    assert {k: len(v) for k, v in by_ds.items()} == {"kvasir-seg": n_kvasir, "cvc-clinicdb": n_cvc,
                                                     "kvasir-v2": n_cecum}
    assert all(r["mask_path"] for r in by_ds["kvasir-seg"] + by_ds["cvc-clinicdb"])
    assert all(r["boxes"] for r in by_ds["kvasir-seg"])
    assert all(r["class_label"] == "normal-cecum" and r["mask_path"] is None for r in by_ds["kvasir-v2"])
    sessile = sum(1 for r in by_ds["kvasir-seg"] if r["kvasir_sessile"])
    meta = (SAMPLE / "kvasir-seg/metadata.csv").read_text().splitlines()[1:]
    assert sessile == sum(1 for line in meta if line.split(",")[1] == "1")
    assert all(r["group_id_hash"] for r in by_ds["cvc-clinicdb"])  # sequences
    assert len({r["group_id_hash"] for r in by_ds["cvc-clinicdb"]}) > 1
    total = sample_ws["summary"]["total"]
    assert total["conservation_ok"] and total["seen"] == len(rows) and total["quarantined"] == 0
    assert len({r["sample_id"] for r in rows}) == len(rows)
    assert all(r["near_dup_cluster"] for r in rows)


def test_stored_images_are_lossless_metadata_free_rgb(sample_ws: dict[str, Any]) -> None:
    ws = sample_ws["ws"]
    rows = sample_ws["samples"]
    for r in rows[:: max(1, len(rows) // 12)]:
        path = ws / r["image_path"]
        assert imaging.rgb_sample_id(Image.open(path).convert("RGB")) == r["sample_id"]
        assert path.name.startswith(r["image_sha256"]) and path.parent.name == r["image_sha256"][:2]
        im = Image.open(path)
        assert im.mode == "RGB" and (im.width, im.height) == (r["width"], r["height"])
        assert not ({"exif", "icc_profile", "comment", "xmp"} & set(im.info))
        if r["mask_path"]:
            m = np.asarray(Image.open(ws / r["mask_path"]))
            assert m.shape == (r["height"], r["width"]) and set(np.unique(m).tolist()) <= {0, 255}


def _strings(value: Any) -> list[str]:
    """Every string inside a decoded table row or JSON document."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in _strings(k) + _strings(v)]
    if isinstance(value, list | tuple):
        return [s for v in value for s in _strings(v)]
    return []


def test_privacy_no_source_names_or_ids_in_outputs(sample_ws: dict[str, Any]) -> None:
    """Decoded column values of every ingest output (and the JSON files) hold no source file name or group id."""
    ws = sample_ws["ws"]
    values: list[str] = []
    for path in sorted((ws / "data/ingest").rglob("*")):
        if path.suffix == ".parquet":
            values += _strings(tables.read_rows(path))
        elif path.suffix == ".json":
            values += _strings(json.loads(path.read_text()))
    assert len(values) > 1000
    # Stored files are named by content (<h2>/<sha256>): drop those names, then split what is left into tokens.
    stored = re.compile(r"data/ingest/batches/b0001/(images|masks)/([0-9a-f]{2})/\2[0-9a-f]{62}\.(png|jpg)")
    assert sum(1 for v in values if stored.fullmatch(v)) >= len(sample_ws["samples"])
    tokens = {t for v in values for t in re.split(r"[^0-9A-Za-z_-]+", stored.sub("", v))}
    stems = {p.stem for p in SAMPLE.rglob("*") if p.suffix in (".jpg", ".png")}
    # Numeric CVC stems are short: match them as whole tokens, not inside hex digests; long ones anywhere.
    assert sorted(stems & tokens) == []
    assert [s for s in stems if len(s) >= 10 and any(s in v for v in values)] == []


def test_rerun_is_byte_identical(sample_ws: dict[str, Any], tmp_path: Path) -> None:
    ws = sample_ws["ws"]
    before = {p.relative_to(ws).as_posix(): p.read_bytes() for p in (ws / "data/ingest").rglob("*") if p.is_file()}
    params = sample_ws["params"]
    ingest.run_batch_stage(ws, params, "b0001")
    ingest_merge.run_stage(ws, params)
    after = {p.relative_to(ws).as_posix(): p.read_bytes() for p in (ws / "data/ingest").rglob("*") if p.is_file()}
    assert before.keys() == after.keys()
    assert [k for k in before if before[k] != after[k]] == []


def _copy_seg_subset(dst: Path, stems: list[str]) -> None:
    for sub in ("images", "masks"):
        (dst / sub).mkdir(parents=True, exist_ok=True)
    for stem in stems:
        shutil.copy(SAMPLE / "kvasir-seg/images" / f"{stem}.jpg", dst / "images" / f"{stem}.jpg")
        shutil.copy(SAMPLE / "kvasir-seg/masks" / f"{stem}.png", dst / "masks" / f"{stem}.png")


def test_incremental_batch_keeps_ids_and_clusters_and_records_cross_batch_duplicates(tmp_path: Path) -> None:
    stems = sorted(p.stem for p in (SAMPLE / "kvasir-seg/images").iterdir())[:8]
    _copy_seg_subset(tmp_path / "first-kvasir-seg", stems[:6])
    ws = tmp_path / "ws"
    params = _workspace(ws, ["b0001"])
    raw_batch.register_batch(tmp_path / "first-kvasir-seg", ws / "data/raw", "b0001")
    ingest.run_batch_stage(ws, params, "b0001")
    ingest_merge.run_stage(ws, params)
    first = {r["sample_id"]: r for r in tables.read_rows(ws / "data/ingest/samples.parquet", "samples")}

    second = tmp_path / "second-kvasir-seg"
    _copy_seg_subset(second, stems[3:8])  # 3 already ingested + 2 new
    # a near-duplicate of an existing image (brightness +3%): new sample id, existing cluster
    src = Image.open(second / "images" / f"{stems[3]}.jpg")
    ImageEnhance.Brightness(src).enhance(1.03).save(second / "images" / "brighter.png")
    shutil.copy(second / "masks" / f"{stems[3]}.png", second / "masks" / "brighter.png")
    raw_batch.register_batch(second, ws / "data/raw", raw_batch.next_batch_id(ws / "data/raw"))
    params = _workspace(ws, ["b0001", "b0002"])
    ingest.run_batch_stage(ws, params, "b0002")
    ingest_merge.run_stage(ws, params)

    merged = tables.read_rows(ws / "data/ingest/samples.parquet", "samples")
    after = {r["sample_id"]: r for r in merged}
    for sid, row in first.items():
        assert after[sid] == row  # sample ids, clusters and every other field unchanged
    assert [r["batch_id"] for r in merged] == ["b0001"] * 6 + ["b0002"] * 3
    dups = tables.read_rows(ws / "data/ingest/duplicates.parquet", "duplicates")
    assert len(dups) == 3 and {d["batch_id"] for d in dups} == {"b0002"}
    assert {d["duplicate_of"] for d in dups} <= set(first)
    bright = [r for r in merged if r["batch_id"] == "b0002" and r["source_format"] == "PNG"]
    assert len(bright) == 1 and bright[0]["near_dup_cluster"] in first
    summary = json.loads((ws / "data/ingest/summary.json").read_text())
    assert summary["batches"]["b0002"] == {"seen": 6, "ingested": 3, "duplicates": 3, "duplicates_within_batch": 0,
                                           "duplicates_across_batches": 3, "quarantined": 0, "conservation_ok": True}


def test_near_duplicate_clusters_are_stable_under_appending() -> None:
    ids = ["s1", "s2", "s3", "s4"]
    hashes = ["0000000000000000", "0000000000000003", "ffffffffffffffff", "00000000000000f0"]
    assert near_duplicates.near_duplicate_clusters(ids, hashes, 2) == ["s1", "s1", "s3", "s4"]
    grown = near_duplicates.near_duplicate_clusters([*ids, "s5"], [*hashes, "00000000000001f0"], 2)
    assert grown[:4] == ["s1", "s1", "s3", "s4"] and grown[4] == "s4"


def test_phash_matches_imagehash_reference() -> None:
    for p in sorted((SAMPLE / "kvasir-seg/images").iterdir())[:10]:
        im = Image.open(p).convert("RGB")
        assert imaging.phash_hex(im) == imaging.phash_reference(im)


def test_jpeg_metadata_stripping_keeps_pixels() -> None:
    for p in sorted((SAMPLE / "cvc-clinicdb/images").iterdir())[:5]:
        data = p.read_bytes()
        stripped = imaging.strip_jpeg_metadata(data)
        assert stripped is not None
        import io

        assert Image.open(io.BytesIO(stripped)).tobytes() == Image.open(p).tobytes()


def test_data_stages_import_neither_torch_nor_transformers(tmp_path: Path) -> None:
    _copy_seg_subset(tmp_path / "src-kvasir-seg", sorted(p.stem for p in (SAMPLE / "kvasir-seg/images").iterdir())[:2])
    ws = tmp_path / "ws"
    _workspace(ws, ["b0001"])
    raw_batch.register_batch(tmp_path / "src-kvasir-seg", ws / "data/raw", "b0001")
    code = (
        "import sys\nfrom pathlib import Path\nfrom cogalign_core import stage\n"
        "stage.run('ingest_batch', 'b0001', Path('.'))\nstage.run('ingest', None, Path('.'))\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'transformers', 'prefect', 'dvc'})\n"
        "print('IMPORTED', bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ws, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "IMPORTED []" in out.stdout
    assert (ws / "data/ingest/samples.parquet").exists()


def test_near_duplicate_search_equals_brute_force() -> None:
    rng = np.random.default_rng(3)
    hashes = rng.integers(0, 2**63, size=3000, dtype=np.int64).astype(np.uint64)
    for i in rng.integers(1, 3000, size=300):  # plant near-duplicates of earlier hashes
        flips = rng.choice(64, size=int(rng.integers(0, 9)), replace=False)
        hashes[i] = hashes[rng.integers(0, i)] ^ np.uint64(sum(1 << int(b) for b in flips))
    for radius in (0, 4, 6, 9):
        expected = np.full(hashes.size, -1)
        for i in range(1, hashes.size):
            near = np.flatnonzero(np.bitwise_count(hashes[:i] ^ hashes[i]) <= radius)
            expected[i] = near[0] if near.size else -1
        assert np.array_equal(near_duplicates.earliest_neighbours(hashes, radius), expected)
