"""EXIF orientation on ingest: a JPEG stored rotated (as phones and some capture stations write
it) with its mask drawn on the image as displayed is stored upright, and the mask stays aligned.

Real Kvasir-SEG images and expert masks from the bundled sample, re-saved rotated with an EXIF
Orientation tag, go through the real registration and ingest stage.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image, ImageOps

from cogalign_core import imaging, ingest, raw_batch, tables
from cogalign_core.config import PipelineParams, PrivacyParams, dump_params
from cogalign_core.privacy import salted_hash

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample" / "kvasir-seg"
# The transpose that undoes each orientation: stored = displayed.transpose(STORE[o]).
STORE = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}


def _save_rotated(displayed: Image.Image, orientation: int, path: Path) -> None:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    displayed.transpose(STORE[orientation]).save(path, "JPEG", quality=95, exif=exif)


def _binary(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L")) > 127


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


@pytest.fixture(scope="module")
def rotated_batch(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A seg dataset of four rotated JPEGs: masks drawn on the displayed image, except ``raw_frame``."""
    src = tmp_path_factory.mktemp("src") / "kvasir-seg"
    (src / "images").mkdir(parents=True)
    (src / "masks").mkdir()
    stems = sorted(p.stem for p in (SAMPLE / "images").glob("*.jpg"))[:4]
    cases = {"square6": (stems[0], 6, True), "wide8": (stems[1], 8, False), "wide3": (stems[2], 3, False),
             "raw_frame": (stems[3], 6, False)}
    displayed_masks = {}
    for name, (stem, orientation, square) in cases.items():
        image = Image.open(SAMPLE / "images" / f"{stem}.jpg").convert("RGB")
        mask = Image.open(SAMPLE / "masks" / f"{stem}.png").convert("L")
        if square:
            side = min(image.size)
            image, mask = image.crop((0, 0, side, side)), mask.crop((0, 0, side, side))
        assert square or image.size[0] != image.size[1]
        _save_rotated(image, orientation, src / "images" / f"{name}.jpg")
        # The fixture is what it claims: the tag turns the stored raster into the displayed image.
        with Image.open(src / "images" / f"{name}.jpg") as check:
            assert check.size != image.size or orientation == 3 or square
            assert ImageOps.exif_transpose(check).size == image.size
        drawn = mask.transpose(STORE[orientation]) if name == "raw_frame" else mask
        drawn.save(src / "masks" / f"{name}.png")
        displayed_masks[name] = np.asarray(mask) > 127
    ws = tmp_path_factory.mktemp("ws")
    params = PipelineParams(batches=["b0001"], privacy=PrivacyParams(salt="orientation-test"))
    (ws / "params.yaml").write_text(dump_params(params))
    raw_batch.register_batch(src, ws / "data/raw", "b0001")
    ingest.run_batch_stage(ws, params, "b0001")
    out = ws / ingest.BATCHES_DIR / "b0001"
    return {"ws": ws, "src": src, "masks": displayed_masks,
            "records": tables.read_rows(out / "records.parquet", "samples"),
            "quarantine": tables.read_rows(out / "quarantine.parquet", "quarantine")}


def test_rotated_jpegs_are_stored_upright_with_aligned_masks(rotated_batch: dict[str, object]) -> None:
    ws, src = rotated_batch["ws"], rotated_batch["src"]
    by_id = {r["sample_id"]: r for r in rotated_batch["records"]}
    assert len(by_id) == 3
    for name in ("square6", "wide8", "wide3"):
        with Image.open(src / "images" / f"{name}.jpg") as raw:
            displayed = ImageOps.exif_transpose(raw).convert("RGB")
        # The stored pixels are the displayed image, exactly (its sample id hashes them).
        record = by_id[imaging.rgb_sample_id(displayed)]
        assert (record["width"], record["height"]) == displayed.size
        with Image.open(ws / record["image_path"]) as stored:
            assert stored.size == displayed.size and not stored.getexif()
            assert np.array_equal(np.asarray(stored.convert("RGB")), np.asarray(displayed))
        assert record["metadata_stripped"]
        assert _iou(_binary(ws / record["mask_path"]), rotated_batch["masks"][name]) >= 0.99


def test_mask_drawn_on_the_unrotated_raster_is_rejected_naming_the_orientation(
        rotated_batch: dict[str, object]) -> None:
    (row,) = rotated_batch["quarantine"]
    # The table holds the keyed hash of the file's name, never the name (cogalign quarantine resolves it).
    assert row["name_hash"] == salted_hash("images/raw_frame.jpg", "orientation-test")
    assert row["reason"] == "mask_size_mismatch" and "raw_frame" not in row["detail"]
    assert "EXIF orientation 6" in row["detail"] and "displayed" in row["detail"]
