"""Parameters of the counterfactual stage (placeholder; the counterfactual stage owns this module)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class CounterfactualParams(BaseModel):
    """Counterfactual normals and matched controls."""

    model_config = ConfigDict(extra="forbid")
