"""Parameters of the model stages (base_model, sft, rl_no_cf, rl) in ``params.yaml``.

The training settings themselves live in the recipe YAMLs (``recipes/<family>/{sft,grpo,grpo_no_cf}.yaml``);
these params only pick the recipe family and carry the few per-workspace overrides.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ModelParams(BaseModel):
    """Which recipe family trains the model, and per-workspace overrides of it."""

    model_config = ConfigDict(extra="forbid")
    recipe: str = Field(
        "lite0-small",
        description="Recipe family: a directory under recipes/ (lite0-small, tiny, qwen3-vl-2b, qwen3-vl-8b, "
        "qwen2.5-vl-3b). Its sft.yaml, sft_cf.yaml, grpo.yaml and grpo_no_cf.yaml configure the sft, sft_cf, rl "
        "and rl_no_cf stages.",
    )
    base_model_path: str | None = Field(
        None,
        description="Real recipes only: a local directory holding the base model's weights, used instead of the "
        "recipe's hub name (e.g. a pre-downloaded snapshot on an offline GPU box). Recorded by content hash in "
        "data/base_model/, never copied.",
    )
    seed: int = Field(
        0, ge=0,
        description="Added to every seed the recipes set (text-model initialisation of offline-built models, data "
        "order, sampling). `cogalign study` varies it; each value is one recorded DVC experiment.")
    train_exclude_datasets: list[str] = Field(
        default_factory=list,
        description="Source datasets (the annotation table's `dataset`, e.g. kvasir-seg) left out of every training "
        "arm and of the offline tokenizer's corpus. The cross-source condition of `cogalign study`: train on the "
        "other sources, then read the held-out source's test rows in metrics.json's by_source section.")
    sft_max_steps: int | None = Field(
        None, ge=1, description="Override the SFT recipes' max_steps (sft and sft_cf; e.g. a short smoke run). "
        "None keeps the recipe.")
    rl_max_steps: int | None = Field(
        None, ge=1, description="Override the GRPO recipes' max_steps for rl and rl_no_cf. None keeps the recipe.")
