"""Parameters of the model registry: which model is the challenger and when it replaces the champion."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cogalign_core.config.evaluate import MODEL_STAGES


def _default_guarded() -> dict[str, float]:
    return {"lesion_sensitivity": 0.02, "counterfactual_specificity": 0.02, "real_normal_specificity": 0.02}


class PromotionParams(BaseModel):
    """Promotion gate of `cogalign retrain`: the challenger replaces the champion only when it is better."""

    model_config = ConfigDict(extra="forbid")
    candidate: str = Field(
        "rl",
        description="Model stage whose fresh evaluation is the challenger (one of evaluate.models). Its weights "
        "are data/<candidate>/model of the run that evaluated it.")
    section: str = Field(
        "test",
        description="Evaluation section the models are compared on: test (held-out split of the training "
        "sources) or external_test (batches registered with --role test).")
    primary_metric: str = Field(
        "balanced_accuracy",
        description="Metric (a key of metrics.json, higher is better unless listed in lower_is_better) the "
        "challenger must improve. The default, the mean of lesion sensitivity and real-normal specificity, "
        "cannot be gamed by the class mix (both trivial baselines score 0.5).")
    margin: float = Field(
        0.01, ge=0,
        description="Required improvement of the primary metric, in metric units (0.01 = one percentage "
        "point). 0 still requires a strictly higher value.")
    guarded: dict[str, float] = Field(
        default_factory=_default_guarded,
        description="Metric -> tolerance: the challenger may be at most this much worse than the champion on "
        "each (e.g. 0.02 = two percentage points). A guarded metric the champion had but the challenger "
        "cannot measure blocks promotion.")
    lower_is_better: list[str] = Field(
        default_factory=list,
        description="Metrics (primary or guarded) where a lower value is better; all others are higher-is-better.")
    min_common_prompts: int = Field(
        10, ge=1,
        description="Both models are scored on the prompts both answered (the champion's fixed test prompts "
        "that the challenger's evaluation also holds). Fewer common prompts than this: no promotion.")

    @field_validator("candidate")
    @classmethod
    def _known_candidate(cls, v: str) -> str:
        if v not in MODEL_STAGES:
            raise ValueError(f"registry.candidate {v!r} is not a model stage; expected one of {list(MODEL_STAGES)}")
        return v

    @field_validator("section")
    @classmethod
    def _known_section(cls, v: str) -> str:
        if v not in ("test", "external_test"):
            raise ValueError(f"registry.section must be test or external_test, not {v!r}")
        return v

    @field_validator("guarded")
    @classmethod
    def _non_negative(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: t for k, t in v.items() if t < 0}
        if bad:
            raise ValueError(f"registry.guarded tolerances must be >= 0: {bad}")
        return v


class RegistryParams(BaseModel):
    """Model registry and scheduled retraining (data/registry/, `cogalign retrain`)."""

    model_config = ConfigDict(extra="forbid")
    promotion: PromotionParams = Field(default_factory=PromotionParams, description=PromotionParams.__doc__)
    drop_layout: str = Field(
        "auto",
        description="Layout of the drop folder's new files when they become a raw batch (auto | seg | classes | "
        "manifest | collection); see `cogalign ingest --help`.")
