"""Training recipes: one YAML per (model family, method), validated by pydantic.

Recipes ship inside the package (``cogalign_core.recipes``, the repo's ``recipes/`` folder) as
``<family>/sft.yaml``, ``<family>/grpo.yaml`` and ``<family>/grpo_no_cf.yaml``; real model families
also vendor their model's ``config.json`` so a recipe validates without downloading anything.
"""

from __future__ import annotations

import json
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from cogalign_core import taxonomy

RECIPES_PACKAGE = "cogalign_core.recipes"
Method = Literal["sft", "grpo", "grpo_no_cf"]
METHODS: tuple[str, ...] = ("sft", "grpo", "grpo_no_cf")
VENDORED_CONFIG = "config.json"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TinyModelSpec(_Strict):
    """Size of the tiny Qwen3-VL-architecture model built offline by the base_model stage."""

    hidden_size: int = Field(64, ge=16, description="Text hidden size (= vision out_hidden_size).")
    num_hidden_layers: int = Field(2, ge=1, description="Text decoder layers.")
    num_attention_heads: int = Field(4, ge=1, description="Text attention heads.")
    num_key_value_heads: int = Field(2, ge=1, description="Text KV heads (GQA).")
    head_dim: int = Field(16, ge=8, description="Per-head dim; mrope_section must sum to head_dim // 2.")
    intermediate_size: int = Field(128, ge=16, description="Text MLP width.")
    mrope_section: list[int] = Field(default_factory=lambda: [4, 2, 2], description="Multimodal RoPE split (t, h, w).")
    vision_depth: int = Field(2, ge=1, description="Vision transformer blocks.")
    vision_hidden_size: int = Field(64, ge=16, description="Vision hidden size.")
    vision_heads: int = Field(4, ge=1, description="Vision attention heads.")
    vision_intermediate_size: int = Field(128, ge=16, description="Vision MLP width.")
    patch_size: int = Field(16, ge=4, description="Vision patch size in pixels; tokens per image = (size/patch/2)^2.")
    vocab_size: int = Field(1024, ge=300, description="Upper bound of the BPE vocabulary trained on the train split.")
    seed: int = Field(0, description="Seed of the random initialisation (the model is deterministic).")

    @model_validator(mode="after")
    def _check(self) -> TinyModelSpec:
        if sum(self.mrope_section) != self.head_dim // 2:
            raise ValueError(f"mrope_section {self.mrope_section} must sum to head_dim // 2 = {self.head_dim // 2}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.vision_hidden_size % self.vision_heads:
            raise ValueError("vision_hidden_size must be a multiple of vision_heads")
        return self


class ModelSpec(_Strict):
    """Where the base model comes from."""

    kind: Literal["tiny", "pretrained"] = Field(description="tiny: built offline; pretrained: external weights.")
    name_or_path: str | None = Field(None, description="Hub id or local path of the pretrained weights.")
    revision: str | None = Field(None, description="Hub revision (commit) pinned for the pretrained weights.")
    architecture: str = Field("Qwen3VLForConditionalGeneration", description="Expected architecture class.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Training dtype.")
    attn_implementation: str = Field("sdpa", description="Attention kernel (sdpa, flash_attention_2, eager).")
    tiny: TinyModelSpec | None = Field(None, description="Tiny model size (kind=tiny only).")

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if self.kind == "tiny" and self.tiny is None:
            self.tiny = TinyModelSpec()
        if self.kind == "pretrained" and not self.name_or_path:
            raise ValueError("a pretrained model needs name_or_path")
        return self


class CanvasConfig(_Strict):
    """The fixed square canvas every image is shown on (see cogalign_core.canvas)."""

    size: int = Field(224, ge=32, description="Canvas side in pixels (a multiple of patch_size * 2).")
    border_frac: float = Field(0.03, ge=0, lt=0.5, description="Black band around the content.")
    corner_frac: float = Field(0.12, ge=0, lt=0.5, description="Corner triangles cut off the content.")
    overlay_frac: float = Field(0.28, ge=0, lt=0.5, description="Black lower-left square (scope overlay).")


class LoraSpec(_Strict):
    """PEFT LoRA settings; ``enabled: false`` trains all parameters."""

    enabled: bool = False
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Module name suffixes of the language model to adapt.")
    freeze_vision: bool = Field(True, description="Keep the vision tower frozen (no adapters in it).")


class TrainSpec(_Strict):
    """Optimisation settings shared by SFT and GRPO."""

    max_steps: int = Field(ge=1)
    per_device_batch_size: int = Field(8, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(gt=0)
    lr_scheduler_type: str = "constant_with_warmup"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = 0
    logging_steps: int = Field(1, ge=1)
    gradient_checkpointing: bool = False
    bf16: bool = False
    dataloader_num_workers: int = Field(0, ge=0)


class SFTSpec(_Strict):
    """SFT-specific settings."""

    max_length: int | None = Field(None, ge=16, description="Truncate sequences (None: no truncation).")
    eval_steps: int = Field(10, ge=1, description="Validation loss every N steps (and at the end).")
    max_eval_samples: int = Field(64, ge=1, description="Validation subset size (first N by sample_id).")
    include_counterfactuals: bool = Field(False, description="Add counterfactual normals/controls to SFT.")


class GRPOSpec(_Strict):
    """GRPO-specific settings."""

    num_generations: int = Field(8, ge=2, description="Group size G (completions per prompt).")
    beta: float = Field(0.04, ge=0, description="KL coefficient against the reference (SFT) model.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1)
    max_completion_length: int = Field(64, ge=8)
    reward_weights: dict[str, float] = Field(
        default_factory=lambda: {"format": 0.5, "cognition": 1.0, "diagnosis": 1.0, "grounding": 0.5})
    use_counterfactuals: bool = Field(
        True, description="Include counterfactual normals and controls (rl), or not (rl_no_cf).")
    normal_fraction: float = Field(0.5, gt=0, lt=1, description="Target share of normal-labelled prompts.")
    max_prompts: int | None = Field(None, ge=1, description="Cap on the balanced prompt set (None: all).")
    loss_type: str = Field("dapo", description="TRL GRPO loss type.")

    @model_validator(mode="after")
    def _check(self) -> GRPOSpec:
        from cogalign_core.rewards import REWARDS

        unknown = set(self.reward_weights) - set(REWARDS)
        if unknown:
            raise ValueError(f"unknown rewards {sorted(unknown)}; known: {sorted(REWARDS)}")
        return self


class Recipe(_Strict):
    """One (model family, method) recipe."""

    family: str
    method: Method
    model: ModelSpec
    canvas: CanvasConfig = Field(default_factory=CanvasConfig)
    grounding: bool = Field(True, description="Ask for and train the lesion <box>.")
    lora: LoraSpec = Field(default_factory=LoraSpec)
    train: TrainSpec
    sft: SFTSpec | None = None
    grpo: GRPOSpec | None = None
    accelerate_config: str | None = Field(
        None, description="accelerate config under recipes/accelerate/ for multi-GPU.")

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        if self.method == "sft" and self.sft is None:
            self.sft = SFTSpec()
        if self.method != "sft" and self.grpo is None:
            raise ValueError(f"{self.family}/{self.method}: a grpo section is required")
        if self.method == "grpo_no_cf" and self.grpo is not None and self.grpo.use_counterfactuals:
            raise ValueError("grpo_no_cf must set grpo.use_counterfactuals: false")
        if self.model.tiny is not None and self.canvas.size % (self.model.tiny.patch_size * 2):
            raise ValueError("canvas.size must be a multiple of 2 * patch_size")
        return self

    def prompt_taxonomy_terms(self) -> list[str]:
        """All taxonomy terms (the tokenizer's corpus includes them)."""
        return [t for level in taxonomy.LEVELS for t in taxonomy.VOCABULARY[level]]


def recipes_root() -> Traversable:
    """The packaged recipes folder."""
    return resources.files(RECIPES_PACKAGE)


def families() -> list[str]:
    """Recipe families shipped with the package."""
    return sorted(p.name for p in recipes_root().iterdir() if p.is_dir() and (p / "sft.yaml").is_file())


def load_recipe(family: str, method: Method) -> Recipe:
    """Load and validate ``recipes/<family>/<method>.yaml``."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    path = recipes_root() / family / f"{method}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no recipe {family}/{method}.yaml; families: {families()}")
    data: dict[str, Any] = yaml.safe_load(path.read_text()) or {}
    data.setdefault("family", family)
    data.setdefault("method", method)
    return Recipe.model_validate(data)


def vendored_config(family: str) -> dict[str, Any] | None:
    """The vendored ``config.json`` of a real family's model, or None for families without one."""
    path = recipes_root() / family / VENDORED_CONFIG
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def accelerate_config_text(name: str) -> str:
    """Text of ``recipes/accelerate/<name>.yaml``."""
    path = recipes_root() / "accelerate" / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no accelerate config {name!r}")
    return path.read_text()
