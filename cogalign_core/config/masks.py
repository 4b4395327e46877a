"""Parameters of the mask stage (placeholder; the mask stage owns this module)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class MaskParams(BaseModel):
    """Lesion mask segmentation and quality control."""

    model_config = ConfigDict(extra="forbid")
