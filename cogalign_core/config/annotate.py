"""Parameters of the annotation stage."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cogalign_core import contract


class SplitParams(BaseModel):
    """Group-aware, hash-based split assignment."""

    model_config = ConfigDict(extra="forbid")
    salt: str = Field(
        "cogalign-split-v1",
        description="Salt of the group-key hash that assigns splits; changing it reshuffles every split.")
    train: float = Field(0.7, ge=0, le=1, description="Fraction of groups (per diagnosis stratum) in train.")
    val: float = Field(0.1, ge=0, le=1, description="Fraction of groups (per diagnosis stratum) in val.")
    test: float = Field(0.2, ge=0, le=1, description="Fraction of groups (per diagnosis stratum) in test.")

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitParams:
        if abs(self.train + self.val + self.test - 1.0) > 1e-6:
            raise ValueError("annotate.split fractions must sum to 1")
        return self


class AnnotateParams(BaseModel):
    """Hierarchical labels, clinician overrides and splits."""

    model_config = ConfigDict(extra="forbid")
    clinician_csv: str | None = Field(
        contract.CLINICIAN_LABELS,
        description="Workspace-relative CSV of clinician labels (sample_id plus any of location, morphology, "
        "microvascular, diagnosis, paris); overrides dataset labels with provenance 'clinician'.")
    split: SplitParams = Field(default_factory=SplitParams, description=SplitParams.__doc__)
