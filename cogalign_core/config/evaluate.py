"""Parameters of the evaluation stage."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cogalign_core import taxonomy
from cogalign_core.arms import ARM_METHODS

MODEL_STAGES: tuple[str, ...] = ("base_model", *ARM_METHODS)


def _no_finding_answer() -> dict[str, str]:
    return {"location": taxonomy.NOT_ASSESSABLE, "morphology": taxonomy.NO_LESION,
            "microvascular": taxonomy.NOT_ASSESSABLE, "diagnosis": taxonomy.NORMAL}


class EvaluateParams(BaseModel):
    """Evaluation of the trained models."""

    model_config = ConfigDict(extra="forbid")
    models: list[str] = Field(
        default_factory=lambda: list(ARM_METHODS),
        description="Model stages to evaluate, each loaded from data/<stage>/model. Add base_model when it holds "
        "real pretrained weights (the tiny base model is random and says nothing).")
    max_samples_per_condition: int | None = Field(
        None, ge=1,
        description="Optional cap per test section and condition (real lesion, real normal, counterfactual, control, "
        "both), taken from each source dataset in turn in a seeded hash order of the sample ids, so every source is "
        "scored; None (the default) scores every test image and every "
        "usable test counterfactual/control. Probes reuse the chosen real images. The report states n everywhere.")
    max_new_tokens: int = Field(
        48, ge=8,
        description="Cap on generated tokens per answer (greedy decoding). A full grounded answer is about 35 tokens "
        "with the tiny tokenizer; raise it for real tokenizers if answers come back truncated (format_validity).")
    bootstrap_resamples: int = Field(1000, ge=10, description="Group-bootstrap resamples for the 95 % intervals.")
    seed: int = Field(0, description="Seed of sample selection, probe shuffling and the bootstrap.")
    blank_gray: int = Field(128, ge=0, le=255, description="Grey level of the blank grounding-probe image.")
    blank_side: int = Field(256, ge=16, description="Side in pixels of the blank probe image before the canvas.")
    gallery_size: int = Field(6, ge=0, description="Lesion samples shown in the report gallery.")
    constant_answer: dict[str, str] = Field(
        default_factory=_no_finding_answer,
        description="The fixed answer scored as the 'constant answer' baseline beside every metric (one term per "
        "level). The 'majority class' baseline is the per-level majority of the train split.")

    @field_validator("models")
    @classmethod
    def _known_models(cls, v: list[str]) -> list[str]:
        unknown = [m for m in v if m not in MODEL_STAGES]
        if unknown:
            raise ValueError(f"unknown model stages {unknown}; expected some of {list(MODEL_STAGES)}")
        if len(set(v)) != len(v):
            raise ValueError("evaluate.models lists a stage twice")
        return v

    @field_validator("constant_answer")
    @classmethod
    def _valid_answer(cls, v: dict[str, str]) -> dict[str, str]:
        if set(v) != set(taxonomy.LEVELS):
            raise ValueError(f"constant_answer needs exactly the levels {list(taxonomy.LEVELS)}")
        for level, term in v.items():
            if not taxonomy.is_term(level, taxonomy.normalise_term(term)):
                raise ValueError(f"constant_answer: {term!r} is not a {level} term")
        return {level: taxonomy.normalise_term(v[level]) for level in taxonomy.LEVELS}
