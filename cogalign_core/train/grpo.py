"""DVC stages ``rl`` and ``rl_no_cf``: GRPO from the SFT model with clinical-cognition rewards (TRL ``GRPOTrainer``).

``rl`` trains on the train split's real lesions, real normals, counterfactual normals and controls
(``counterfactuals.parquet`` rows with ``excluded`` false); ``rl_no_cf`` on the real images only,
the ablation that credits any gain to the counterfactual images. Prompts are resampled so about
``normal_fraction`` of them are labelled normal, real and derived images each on their own
(:func:`data.balance_groups`): a constant answer cannot earn most of the reward, and neither can
"inpainted -> normal".

Rewards (:mod:`cogalign_core.rewards`) and their weights, group size, KL beta, temperature and
lengths come from the recipe. Outputs in ``data/rl[_no_cf]/``: ``model/`` (merged, reloadable),
``adapter/`` (LoRA recipes), ``log.csv`` (per step: loss, total reward and its std, each reward's
mean, the fraction of zero-variance groups, KL, completion length), ``summary.json``,
``provenance.json``.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, ProcessorMixin, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from cogalign_core import accounting, contract
from cogalign_core.config import PipelineParams
from cogalign_core.config.model import ModelParams
from cogalign_core.io import atomic_write_json
from cogalign_core.rewards import REWARDS
from cogalign_core.train import base_model, data, modeling, sft
from cogalign_core.train.checkpoints import Checkpoints, resume_point, training_dir
from cogalign_core.train.feature_cache import cached_tower
from cogalign_core.train.launch import relaunch_if_allocated
from cogalign_core.train.recipe import ARM_METHODS, Recipe, stage_recipe
from cogalign_core.train.trainlog import ProgressCallback, StepLog, write_log_csv

SFT_MODEL = sft.OUT_DIR / "model"


def reward_functions(recipe: Recipe) -> tuple[list[Any], list[float]]:
    """The recipe's reward functions and their weights, in the recipe's order."""
    assert recipe.grpo is not None
    names = list(recipe.grpo.reward_weights)
    return [REWARDS[n] for n in names], [recipe.grpo.reward_weights[n] for n in names]


def log_columns(recipe: Recipe) -> list[str]:
    """Trainer log keys written to log.csv, in order."""
    funcs, _ = reward_functions(recipe)
    return ["loss", "reward", "reward_std", "frac_reward_zero_std",
            *[f"rewards/{f.__name__}/mean" for f in funcs], *[f"rewards/{f.__name__}/std" for f in funcs],
            "kl", "entropy", "completions/mean_length", "completions/clipped_ratio", "learning_rate", "grad_norm"]


def csv_names(recipe: Recipe) -> dict[str, str]:
    """Trainer log key -> log.csv column name (slashes become underscores/dots for plot tools)."""
    return {c: c.replace("rewards/", "reward_").replace("/", ".") for c in log_columns(recipe)}


def grpo_config(recipe: Recipe, output_dir: str | Path, max_steps: int | None = None,
                checkpoint_args: Mapping[str, Any] | None = None) -> GRPOConfig:
    """TRL ``GRPOConfig`` from the recipe (no external loggers; checkpoints only with ``checkpoint_args``)."""
    t, g = recipe.train, recipe.grpo
    assert g is not None
    _, weights = reward_functions(recipe)
    return GRPOConfig(
        output_dir=str(output_dir), max_steps=max_steps or t.max_steps,
        per_device_train_batch_size=t.per_device_batch_size, gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate, lr_scheduler_type=t.lr_scheduler_type, warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, seed=t.seed, data_seed=t.seed,
        logging_steps=t.logging_steps, gradient_checkpointing=t.gradient_checkpointing, bf16=t.bf16,
        dataloader_num_workers=t.dataloader_num_workers,
        num_generations=g.num_generations, beta=g.beta, temperature=g.temperature, top_p=g.top_p,
        max_completion_length=g.max_completion_length, reward_weights=weights, loss_type=g.loss_type,
        # use_cache: without it Trainer turns the KV cache off in the model config and every generated token
        # recomputes the whole sequence (20x slower generation on CPU).
        report_to="none", disable_tqdm=True, remove_unused_columns=False, use_cache=True,
        log_completions=False, **(checkpoint_args or {"save_strategy": "no"}),
    )


def build_trainer(model: PreTrainedModel, processor: ProcessorMixin, train_ds: Any, recipe: Recipe,
                  output_dir: str | Path, max_steps: int | None = None,
                  callbacks: list[TrainerCallback] | None = None,
                  checkpoint_args: Mapping[str, Any] | None = None) -> GRPOTrainer:
    """A ``GRPOTrainer`` for the recipe (LoRA-wrapped when the recipe says so)."""
    if recipe.lora.freeze_vision:
        modeling.freeze_vision_tower(model)
    funcs, _ = reward_functions(recipe)
    args = grpo_config(recipe, output_dir, max_steps, checkpoint_args)
    return GRPOTrainer(model=model, reward_funcs=funcs, args=args,
                       train_dataset=train_ds, processing_class=processor,
                       peft_config=sft.lora_config(recipe) if recipe.lora.enabled else None, callbacks=callbacks)


def grpo_examples(workspace: Path, recipe: Recipe, model_params: ModelParams
                  ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Balanced GRPO prompts (train split) and counts of what went in and came out."""
    g = recipe.grpo
    assert g is not None
    spec = base_model.canvas_spec(recipe)
    annotations = data.training_annotations(workspace, ["train"], model_params)
    real = data.real_examples(annotations, ["train"], spec, recipe.grounding)
    counts: dict[str, Any] = {"annotation_rows": len(annotations), "real_train": len(real),
                              "excluded_datasets": list(model_params.train_exclude_datasets)}
    cf: list[dict[str, Any]] = []
    offered, skipped = len(real), Counter[str]()
    if g.use_counterfactuals:
        cf_rows = data.load_counterfactuals(workspace, ["train"], model_params.train_exclude_datasets)
        offered += len(cf_rows)
        cf, skipped = data.counterfactual_examples(cf_rows, annotations, ["train"], spec, recipe.grounding)
        counts.update({"counterfactual_rows": len(cf_rows), "counterfactual_train": len(cf),
                       "counterfactual_skipped": dict(sorted(skipped.items()))})
    pool = real + cf
    counts[accounting.KEY] = accounting.block("train rows", offered, len(pool), skipped)
    if not pool:
        raise data.DataError("no train examples for GRPO")
    balanced = data.balance_groups(real, cf, g.normal_fraction, recipe.train.seed, g.max_prompts)
    counts.update({"pool_by_kind": data.kind_counts(pool), "prompts": len(balanced),
                   "prompts_by_kind": data.kind_counts(balanced)})
    return balanced, counts


def reward_trajectory(log: StepLog, recipe: Recipe) -> dict[str, dict[str, float | None]]:
    """First and last logged value of each reward's mean, the total reward and zero-variance fraction."""
    funcs, _ = reward_functions(recipe)
    keys = {f.__name__: f"rewards/{f.__name__}/mean" for f in funcs}
    keys.update({"reward": "reward", "frac_reward_zero_std": "frac_reward_zero_std"})
    out: dict[str, dict[str, float | None]] = {}
    for name, key in keys.items():
        s = log.series(key)
        out[name] = {"first": s[0][1] if s else None, "last": s[-1][1] if s else None}
    return out


def train_grpo(workspace: Path, recipe: Recipe, start_dir: Path, out_dir: Path, model_params: ModelParams,
               max_steps: int | None = None, checkpoints: Checkpoints | None = None) -> dict[str, Any]:
    """Run GRPO from ``start_dir``; write model/, adapter/ (LoRA), log.csv and summary.json to ``out_dir``.

    With ``checkpoints`` it saves resume points there and resumes from the newest one. Under a
    multi-process launch only process 0 writes; the others return an empty summary.
    """
    examples, counts = grpo_examples(workspace, recipe, model_params)
    modeling.configure_cpu_threads()
    train_ds = data.to_dataset(examples, workspace, base_model.canvas_spec(recipe), with_completion=False)
    model, processor = modeling.load_model_and_processor(start_dir, recipe.model.dtype,
                                                         recipe.model.attn_implementation)
    log = StepLog()
    with training_dir(checkpoints, "cogalign-grpo-") as workdir:
        trainer = build_trainer(model, processor, train_ds, recipe, workdir, max_steps,
                                callbacks=[log, ProgressCallback()],
                                checkpoint_args=checkpoints.trainer_args() if checkpoints else None)
        # A frozen tower encodes each image once: generation, the policy and the reference model
        # share one cache (their towers are bit-identical), so the G copies of a prompt cost one.
        with contextlib.ExitStack() as stack:
            cache = stack.enter_context(cached_tower(trainer.model))
            if getattr(trainer, "ref_model", None) is not None:
                modeling.freeze_vision_tower(trainer.ref_model)
                stack.enter_context(cached_tower(trainer.ref_model, cache))
            trainer.train(resume_from_checkpoint=resume_point(checkpoints, log))
    if not trainer.is_world_process_zero():
        return {}
    modeling.save_trained(trainer.model, processor, out_dir, recipe.lora.enabled)
    write_log_csv(out_dir / "log.csv", log, log_columns(recipe), rename=csv_names(recipe))
    spread = log.series("reward_std")
    summary = {**counts, "steps": trainer.state.global_step, "processes": trainer.args.world_size,
               "lora": recipe.lora.enabled,
               "use_counterfactuals": bool(recipe.grpo and recipe.grpo.use_counterfactuals),
               "rewards": reward_trajectory(log, recipe),
               "steps_with_reward_spread": sum(v > 0 for _, v in spread),
               "tower_feature_cache": {"hits": cache.hits, "misses": cache.misses}}
    atomic_write_json(out_dir / "summary.json", summary)
    return summary


def _run(workspace: Path, params: PipelineParams, stage: str) -> None:
    recipe = stage_recipe(params.model.recipe, ARM_METHODS[stage], params.model)
    relaunch_if_allocated(stage, recipe)  # several devices: one process each, under accelerate
    start = workspace / SFT_MODEL
    if not (start / "config.json").is_file():
        raise FileNotFoundError(f"{start} not found: run the sft stage first")
    out = workspace / contract.stage_dir(stage)
    inputs = [data.split_table(data.ANNOTATE_DIR, "train"), SFT_MODEL.as_posix()]
    if recipe.grpo is not None and recipe.grpo.use_counterfactuals:
        inputs.append(data.split_table(data.COUNTERFACTUAL_DIR, "train"))
    sft.train_and_publish(workspace, stage, recipe, params, inputs, SFT_MODEL.as_posix(),
                          lambda checkpoints: train_grpo(workspace, recipe, start, out, params.model,
                                                         checkpoints=checkpoints))


def run_stage(workspace: Path, params: PipelineParams, item: str | None) -> None:
    """DVC stage ``rl``: GRPO with counterfactual normals and controls."""
    del item
    _run(workspace, params, "rl")


def run_no_cf_stage(workspace: Path, params: PipelineParams, item: str | None) -> None:
    """DVC stage ``rl_no_cf``: the same GRPO without counterfactual images."""
    del item
    _run(workspace, params, "rl_no_cf")
