"""Parameters of the model stages (placeholder; the model layer owns this module)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ModelParams(BaseModel):
    """Which recipe family trains the model."""

    model_config = ConfigDict(extra="forbid")
    recipe: str = Field("tiny", description="Recipe directory under recipes/ (tiny, qwen3-vl-2b, qwen3-vl-8b, ...).")
