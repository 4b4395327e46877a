"""Every bad input of issue 2, as a real file made here: ingested correctly or quarantined with its reason.

Three raw batches (classes, seg, manifest) are built from PIL-written and hand-crafted bytes,
registered, and run through the real ingest stages on a temporary workspace.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from cogalign_core import imaging, ingest, ingest_merge, ingest_plan, raw_batch, tables
from cogalign_core.config import PipelineParams, PrivacyParams, dump_params

PATIENT = "Jane Q. Doe MRN 00123456"


def _rng_rgb(w: int, h: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 200, w, dtype=np.float64)[None, :, None] + np.linspace(0, 50, h)[:, None, None]
    return np.clip(base + rng.integers(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)


def _save(path: Path, image: Image.Image, fmt: str | None = None, **kw: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, fmt, **kw)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid-looking PNG declaring width x height RGB pixels (the pixels are never allocated)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _png_chunk(b"IEND", b""))


def jpeg_with_patient_exif(rgb: np.ndarray) -> bytes:
    im = Image.fromarray(rgb)
    exif = Image.Exif()
    exif[0x013B] = PATIENT                 # Artist
    exif[0x010E] = f"Patient: {PATIENT}"  # ImageDescription
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90, exif=exif.tobytes(), comment=PATIENT.encode())
    return buf.getvalue()


def _workspace(tmp: Path, batches: list[str]) -> tuple[Path, PipelineParams]:
    params = PipelineParams(batches=batches, privacy=PrivacyParams(salt="test-salt"))
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "params.yaml").write_text(dump_params(params))
    return tmp, params


@pytest.fixture(scope="module")
def bad_workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("bad")
    good = _rng_rgb(64, 48, 0)

    # ---- classes layout: image-level problems
    cls = root / "src_classes" / "polyps"
    _save(cls / "good.jpg", Image.fromarray(good), quality=92)
    good_jpeg = (cls / "good.jpg").read_bytes()
    (cls / "truncated.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 2])
    (cls / "corrupt.jpg").write_bytes(good_jpeg[:20] + bytes(range(256)) * 4)
    (cls / "empty.jpg").write_bytes(b"")
    (cls / "notes.jpg").write_text("patient notes, not an image\n")
    (cls / "bomb.png").write_bytes(png_bomb())
    ramp16 = (np.arange(64 * 40, dtype=np.uint32).reshape(40, 64) * 65535 // (64 * 40 - 1)).astype(np.uint16)
    _save(cls / "sixteen.png", Image.fromarray(ramp16))
    _save(cls / "cmyk.jpg", Image.fromarray(_rng_rgb(48, 40, 1)).convert("CMYK"), "JPEG")
    rgba = np.dstack([_rng_rgb(40, 40, 2), np.full((40, 40), 7, np.uint8)])
    _save(cls / "rgba.png", Image.fromarray(rgba, "RGBA"))
    _save(cls / "grey.png", Image.fromarray(_rng_rgb(40, 36, 3)[..., 0], "L"))
    _save(cls / "palette.gif", Image.fromarray(_rng_rgb(40, 40, 4)).convert("P"))
    _save(cls / "tiny.png", Image.fromarray(_rng_rgb(4, 4, 5)))
    (cls / "exif.jpg").write_bytes(jpeg_with_patient_exif(_rng_rgb(64, 64, 6)))
    dup = Image.fromarray(_rng_rgb(40, 40, 7))
    _save(cls / "dup_a.png", dup)
    _save(cls / "dup b copy.png", dup, compress_level=9)  # other bytes, same pixels
    _save(cls / "Ünïcødé polyp 1 (copy).png", Image.fromarray(_rng_rgb(40, 40, 8)))
    outside = root / "outside"
    _save(outside / "secret.png", Image.fromarray(_rng_rgb(40, 40, 9)))
    os.symlink(outside / "secret.png", cls / "escape.png")

    # ---- seg layout: mask problems and malformed metadata
    seg = root / "src_seg"
    for stem, seed in (("a", 10), ("b", 11), ("c", 12), ("d", 13), ("e", 14)):
        _save(seg / "images" / f"{stem}.png", Image.fromarray(_rng_rgb(48, 40, seed)))
    binary = np.zeros((40, 48), np.uint8)
    binary[10:20, 5:25] = 255
    _save(seg / "masks" / "a.png", Image.fromarray(binary))
    (seg / "masks" / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    _save(seg / "masks" / "d.png", Image.fromarray(np.zeros((20, 24), np.uint8)))
    soft = np.tile(np.linspace(0, 255, 48).astype(np.uint8), (40, 1))
    _save(seg / "masks" / "e.jpg", Image.fromarray(soft), quality=95)
    (seg / "metadata.csv").write_text(
        "id,sequence,kvasir_sessile\n"
        "a,seq-7,1\n"
        "e,seq-7,0,extra-field\n"
        "b,seq-8,maybe\n"
        ",seq-9,0\n"
        "a,seq-1,0\n")
    (seg / "bboxes.json").write_text(json.dumps({
        "a": {"height": 80, "width": 96, "bbox": [{"label": "polyp", "xmin": 10, "ymin": 20, "xmax": 50, "ymax": 40}]},
        "e": {"height": 40, "width": 48, "bbox": [{"label": "polyp", "xmin": 30, "ymin": 5, "xmax": 2, "ymax": 9}]},
    }))

    # ---- manifest layout: row problems and ../ paths
    man = root / "src_manifest"
    _save(man / "imgs" / "m1.png", Image.fromarray(_rng_rgb(40, 40, 20)))
    _save(man / "imgs" / "m2.png", Image.fromarray(_rng_rgb(40, 40, 21)))
    _save(man / "imgs" / "m3.png", Image.fromarray(_rng_rgb(40, 40, 22)))
    _save(man / "imgs" / "m1_mask.png", Image.fromarray(np.where(_rng_rgb(40, 40, 23)[..., 0] > 128, 1, 0)
                                                         .astype(np.uint8)))
    _save(root / "secret_outside.png", Image.fromarray(_rng_rgb(40, 40, 24)))
    (man / "manifest.csv").write_text(
        "path,label,mask,bbox,group\n"
        'imgs/m1.png,polyps,imgs/m1_mask.png,"1,2,10,12;3,3,5,5",patient-1\n'
        "../secret_outside.png,polyps,,,patient-2\n"
        "/etc/hostname,polyps,,,patient-2\n"
        "imgs/missing.png,polyps,,,patient-3\n"
        "imgs/m2.png,polyps,,,patient-4,unexpected\n"
        "imgs/m2.png,polyps,imgs/no_such_mask.png,,patient-4\n"
        'imgs/m3.png,polyps,,"a,b",patient-5\n'
        ",polyps,,,patient-6\n")

    ws, params = _workspace(root / "ws", ["b0001", "b0002", "b0003"])
    raw = ws / "data" / "raw"
    raw_batch.register_batch(root / "src_classes", raw, "b0001")
    raw_batch.register_batch(seg, raw, "b0002")
    raw_batch.register_batch(man, raw, "b0003", layout="manifest")
    for b in params.batches:
        ingest.run_batch_stage(ws, params, b)
    ingest_merge.run_stage(ws, params)
    out: dict[str, Any] = {"ws": ws, "params": params}
    for b in params.batches:
        bdir = ws / ingest.BATCHES_DIR / b
        # Tables hold only name hashes; the raw zone's own plan maps them back (as `cogalign quarantine` does).
        names = ingest_plan.plan_batch(raw_batch.read_batch(raw, b), raw / b / raw_batch.FILES_DIR, "test-salt").names
        out[b] = {
            "records": tables.read_rows(bdir / "records.parquet", "samples"),
            "quarantine": {names[q["name_hash"]]: q
                           for q in tables.read_rows(bdir / "quarantine.parquet", "quarantine")},
            "duplicates": tables.read_rows(bdir / "duplicates.parquet", "duplicates"),
            "summary": json.loads((bdir / "summary.json").read_text()),
        }
    return out


def _record(ws: dict[str, Any], batch: str, rel: str) -> dict[str, Any]:
    from cogalign_core.privacy import salted_hash

    h = salted_hash(rel, "test-salt")
    found = [r for r in ws[batch]["records"] if r["name_hash"] == h]
    assert len(found) == 1, f"{rel} not ingested"
    return found[0]


def _stored(ws: dict[str, Any], rec: dict[str, Any], key: str = "image_path") -> Image.Image:
    im = Image.open(ws["ws"] / rec[key])
    im.load()
    return im


@pytest.mark.parametrize(("rel", "reason"), [
    ("polyps/truncated.jpg", "truncated"),
    ("polyps/corrupt.jpg", "undecodable"),
    ("polyps/empty.jpg", "empty_file"),
    ("polyps/notes.jpg", "not_an_image"),
    ("polyps/bomb.png", "too_many_pixels"),
    ("polyps/tiny.png", "too_small"),
    ("polyps/escape.png", "outside_source_root"),
])
def test_bad_images_are_quarantined_with_reason(bad_workspace: dict[str, Any], rel: str, reason: str) -> None:
    q = bad_workspace["b0001"]["quarantine"][rel]
    assert q["reason"] == reason, q
    assert q["kind"] == ("entry" if reason == "outside_source_root" else "image")


def test_png_bomb_is_rejected_from_the_header_without_decoding(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bomb(200_000, 200_000))  # 40 gigapixels: decoding would need 120 GB
    with pytest.raises(imaging.Rejected) as exc:
        imaging.decode_image(path, max_pixels=50_000_000, min_side=32)
    assert exc.value.reason == "too_many_pixels"


def test_sixteen_bit_grey_is_scaled_not_clipped(bad_workspace: dict[str, Any]) -> None:
    rec = _record(bad_workspace, "b0001", "polyps/sixteen.png")
    assert rec["source_mode"].startswith("I")
    arr = np.asarray(_stored(bad_workspace, rec))
    assert arr.shape == (40, 64, 3) and arr.dtype == np.uint8
    assert arr[0, 0, 0] == 0 and arr[-1, -1, 0] == 255
    assert 120 <= arr[20, 0, 0] <= 135  # mid-range stays mid-range (clipping would give 255)
    assert len(np.unique(arr[..., 0])) > 200


@pytest.mark.parametrize(("rel", "mode"), [("polyps/cmyk.jpg", "CMYK"), ("polyps/rgba.png", "RGBA"),
                                            ("polyps/grey.png", "L"), ("polyps/palette.gif", "P")])
def test_other_modes_become_8bit_rgb(bad_workspace: dict[str, Any], rel: str, mode: str) -> None:
    rec = _record(bad_workspace, "b0001", rel)
    assert rec["source_mode"] == mode
    stored = _stored(bad_workspace, rec)
    assert stored.mode == "RGB" and (stored.width, stored.height) == (rec["width"], rec["height"])
    assert imaging.rgb_sample_id(stored) == rec["sample_id"]
    if mode == "L":
        a = np.asarray(stored)
        assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()
    if mode == "RGBA":  # alpha dropped, colour kept
        src = bad_workspace["ws"] / "data/raw/b0001/files" / rel
        assert np.array_equal(np.asarray(stored), np.asarray(Image.open(src))[..., :3])


def test_exif_patient_name_is_gone_after_ingest(bad_workspace: dict[str, Any]) -> None:
    src = bad_workspace["ws"] / "data/raw/b0001/files/polyps/exif.jpg"
    assert PATIENT.encode() in src.read_bytes()  # the test file really carries it
    rec = _record(bad_workspace, "b0001", "polyps/exif.jpg")
    assert rec["metadata_stripped"] is True
    data = (bad_workspace["ws"] / rec["image_path"]).read_bytes()
    assert PATIENT.encode() not in data and b"Jane" not in data and b"Exif" not in data
    stored = _stored(bad_workspace, rec)
    assert "exif" not in stored.info and "comment" not in stored.info and not stored.getexif()
    # stripping is lossless: the stored file decodes to exactly the source pixels
    assert stored.tobytes() == Image.open(src).convert("RGB").tobytes()


def test_same_image_under_two_names_is_one_sample_and_one_duplicate(bad_workspace: dict[str, Any]) -> None:
    from cogalign_core.privacy import salted_hash

    kept = _record(bad_workspace, "b0001", "polyps/dup b copy.png")  # first in path order wins
    dups = bad_workspace["b0001"]["duplicates"]
    assert [(d["duplicate_of"], d["name_hash"]) for d in dups] == [
        (kept["sample_id"], salted_hash("polyps/dup_a.png", "test-salt"))]
    assert bad_workspace["b0001"]["summary"]["duplicates_within_batch"] == 1


def test_unicode_and_spaces_in_names_are_ingested_and_hashed(bad_workspace: dict[str, Any]) -> None:
    rec = _record(bad_workspace, "b0001", "polyps/Ünïcødé polyp 1 (copy).png")
    assert rec["class_label"] == "polyps"
    samples = (bad_workspace["ws"] / "data/ingest/samples.parquet").read_bytes()
    for name in ("Ünïcødé", "dup_a", "exif.jpg", "seq-7", "patient-1"):
        assert name.encode() not in samples


def test_seg_masks_missing_corrupt_wrong_size_and_non_binary(bad_workspace: dict[str, Any]) -> None:
    q = bad_workspace["b0002"]["quarantine"]
    assert (q["images/b.png"]["kind"], q["images/b.png"]["reason"]) == ("mask", "mask_missing")
    assert q["images/c.png"]["reason"] == "mask_corrupt"
    assert q["images/d.png"]["reason"] == "mask_size_mismatch"
    a = _record(bad_workspace, "b0002", "images/a.png")
    assert a["mask_binarise_threshold"] is None and a["mask_area_fraction"] == pytest.approx(200 / (48 * 40))
    e = _record(bad_workspace, "b0002", "images/e.png")
    assert e["mask_binarise_threshold"] == bad_workspace["params"].ingest.mask_threshold
    mask = np.asarray(_stored(bad_workspace, e, "mask_path"))
    assert mask.ndim == 2 and set(np.unique(mask).tolist()) == {0, 255}
    assert 0.4 < e["mask_area_fraction"] < 0.6


def test_seg_metadata_and_boxes_with_malformed_rows(bad_workspace: dict[str, Any]) -> None:
    q = bad_workspace["b0002"]["quarantine"]
    malformed = {k: v["detail"] for k, v in q.items() if v["reason"] == "malformed_manifest_row"}
    assert set(malformed) == {"metadata.csv#L3", "metadata.csv#L4", "metadata.csv#L5", "metadata.csv#L6",
                              "bboxes.json#e"}
    assert "fields" in malformed["metadata.csv#L3"] and "boolean" in malformed["metadata.csv#L4"]
    assert "duplicate" in malformed["metadata.csv#L6"]
    a = _record(bad_workspace, "b0002", "images/a.png")
    assert a["kvasir_sessile"] is True and a["group_id_hash"]
    # declared frame 96x80, stored 48x40: boxes scaled into the stored pixel frame
    assert a["boxes"] == [{"xmin": 5, "ymin": 10, "xmax": 25, "ymax": 20}]
    e = _record(bad_workspace, "b0002", "images/e.png")
    assert e["group_id_hash"] is None and e["boxes"] is None


def test_manifest_rows_and_dotdot_paths(bad_workspace: dict[str, Any]) -> None:
    q = bad_workspace["b0003"]["quarantine"]
    assert q["../secret_outside.png"]["reason"] == "outside_source_root"
    assert q["/etc/hostname"]["reason"] == "outside_source_root"
    assert q["imgs/missing.png"]["reason"] == "malformed_manifest_row"
    assert q["manifest.csv#L6"]["reason"] == "malformed_manifest_row"  # extra field
    assert q["manifest.csv#L8"]["reason"] == "malformed_manifest_row"  # bad bbox
    assert q["manifest.csv#L9"]["reason"] == "malformed_manifest_row"  # empty path
    assert (q["imgs/m2.png"]["kind"], q["imgs/m2.png"]["reason"]) == ("mask", "mask_missing")
    m1 = _record(bad_workspace, "b0003", "imgs/m1.png")
    assert m1["class_label"] == "polyps" and m1["group_id_hash"]
    assert m1["boxes"] == [{"xmin": 1, "ymin": 2, "xmax": 10, "ymax": 12}, {"xmin": 3, "ymin": 3, "xmax": 5, "ymax": 5}]
    assert m1["mask_binarise_threshold"] is None  # {0,1} masks are binary
    assert set(np.unique(np.asarray(_stored(bad_workspace, m1, "mask_path"))).tolist()) <= {0, 255}
    assert bad_workspace["b0003"]["summary"]["seen_by_unit"]["manifest_rows"] == 8


def test_conservation_holds_everywhere(bad_workspace: dict[str, Any]) -> None:
    for b in ("b0001", "b0002", "b0003"):
        s = bad_workspace[b]["summary"]
        assert s["conservation"]["ok"] and s["internal_errors"] == 0
        assert s["seen"] == s["ingested"] + s["duplicates_within_batch"] + s["quarantined"]
        assert s["quarantined"] == len(bad_workspace[b]["quarantine"])
        assert set(s["quarantined_by_reason"]) <= set(tables.QUARANTINE_REASONS)
    s1 = bad_workspace["b0001"]["summary"]
    assert (s1["seen"], s1["ingested"], s1["duplicates_within_batch"], s1["quarantined"]) == (17, 9, 1, 7)
    total = json.loads((bad_workspace["ws"] / "data/ingest/summary.json").read_text())["total"]
    assert total["conservation_ok"]
    assert total["seen"] == total["ingested"] + total["duplicates"] + total["quarantined"]
    merged_q = tables.read_rows(bad_workspace["ws"] / "data/ingest/quarantine.parquet", "quarantine")
    assert len(merged_q) == total["quarantined"]
