"""Parameters of the ingest stages."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class IngestParams(BaseModel):
    """Raw-file validation, decoding and near-duplicate grouping."""

    model_config = ConfigDict(extra="forbid")
    min_side: int = Field(
        32, ge=1, description="Images with a side below this many pixels are quarantined (too_small).")
    max_pixels: int = Field(
        50_000_000, ge=1,
        description="Images declaring more pixels than this are quarantined before decoding (too_many_pixels): "
        "the decompression-bomb guard.")
    mask_threshold: int = Field(
        127, ge=0, le=254,
        description="Masks with more than two grey levels are binarised as value > threshold (colour masks: "
        "per-pixel channel maximum); the threshold is recorded per sample. Two-level masks ({0,1}, {0,255}, ...) "
        "are binary as they are.")
    phash_max_distance: int = Field(
        6, ge=0, le=64,
        description="Hamming distance on the 64-bit perceptual hash at or under which two images are near-duplicates "
        "(grouped into one split group). A new image joins the cluster of its earliest near neighbour, so adding "
        "a batch never changes an existing cluster id.")
