"""Parameters of the evaluation stage (placeholder; the evaluation stage owns this module)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class EvaluateParams(BaseModel):
    """Evaluation of the trained models."""

    model_config = ConfigDict(extra="forbid")
