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
        "tiny",
        description="Recipe family: a directory under recipes/ (tiny, qwen3-vl-2b, qwen3-vl-8b, qwen2.5-vl-3b). "
        "Its sft.yaml, grpo.yaml and grpo_no_cf.yaml configure the sft, rl and rl_no_cf stages.",
    )
    base_model_path: str | None = Field(
        None,
        description="Real recipes only: a local directory holding the base model's weights, used instead of the "
        "recipe's hub name (e.g. a pre-downloaded snapshot on an offline GPU box). Recorded by content hash in "
        "data/base_model/, never copied.",
    )
    sft_include_counterfactuals: bool | None = Field(
        None,
        description="Add counterfactual normals and controls (train split, not excluded) to SFT. None keeps the "
        "recipe's choice (off in every shipped recipe, so SFT-only is the paper's baseline).",
    )
    sft_max_steps: int | None = Field(
        None, ge=1, description="Override the SFT recipe's max_steps (e.g. a short smoke run). None keeps the recipe.")
    rl_max_steps: int | None = Field(
        None, ge=1, description="Override the GRPO recipes' max_steps for rl and rl_no_cf. None keeps the recipe.")
