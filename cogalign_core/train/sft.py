"""DVC stages ``sft`` and ``sft_cf``: hierarchical clinical-cognition SFT with TRL's ``SFTTrainer``.

Data: the train split's examples in TRL's conversational prompt-completion format (system prompt with
the reasoning steps, the canvas image, the question -> the tagged answer), completion-only loss:

- ``sft``: real lesions and real normals only (the paper's SFT baseline);
- ``sft_cf``: the same plus the train split's counterfactual normals and matched controls, labelled
  as the RL stage labels them — plain supervision on the images counterfactual RL sees.

With ``sft.normal_fraction`` the examples are resampled so about that share is labelled normal, real
and derived images each on their own (:func:`data.balance_groups`).
Validation loss on (a fixed subset of) the val split's real images. Sources in
``params.model.train_exclude_datasets`` are left out of both.

Outputs in ``data/<stage>/``: ``model/`` (merged, reloadable with AutoModelForImageTextToText /
AutoProcessor), ``adapter/`` (LoRA recipes), ``log.csv`` (step, loss, eval_loss, learning_rate,
grad_norm), ``summary.json`` (counts and losses), ``provenance.json``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, ProcessorMixin, TrainerCallback
from trl import SFTConfig, SFTTrainer

from cogalign_core import accounting, contract
from cogalign_core.config import PipelineParams
from cogalign_core.config.model import ModelParams
from cogalign_core.io import atomic_write_json
from cogalign_core.provenance import write_provenance
from cogalign_core.train import base_model, data, infer, model_card, modeling
from cogalign_core.train.checkpoints import Checkpoints, open_checkpoints, resume_point, training_dir
from cogalign_core.train.feature_cache import cached_tower
from cogalign_core.train.launch import is_main_process, relaunch_if_allocated
from cogalign_core.train.recipe import ARM_METHODS, Recipe, stage_recipe
from cogalign_core.train.trainlog import ProgressCallback, StepLog, write_log_csv

OUT_DIR = Path(contract.stage_dir("sft"))
LOG_COLUMNS: tuple[str, ...] = ("loss", "eval_loss", "learning_rate", "grad_norm")
PARSE_CHECK_SAMPLES = 32


def lora_target_regex(recipe: Recipe) -> str:
    """PEFT ``target_modules`` regex: the recipe's module names, in the language model only when the
    vision tower is frozen (Qwen-VL vision blocks use other names, but merger MLPs could collide)."""
    names = "|".join(sorted(recipe.lora.target_modules))
    scope = r"model\.language_model\..*" if recipe.lora.freeze_vision else r".*"
    return rf"^{scope}\.({names})$"


def lora_config(recipe: Recipe) -> Any:
    """The recipe's ``peft.LoraConfig``."""
    from peft import LoraConfig

    return LoraConfig(r=recipe.lora.r, lora_alpha=recipe.lora.alpha, lora_dropout=recipe.lora.dropout,
                      target_modules=lora_target_regex(recipe), task_type="CAUSAL_LM", bias="none",
                      modules_to_save=list(recipe.lora.modules_to_save) or None)


def sft_config(recipe: Recipe, output_dir: str | Path, max_steps: int | None = None, do_eval: bool = True,
               checkpoint_args: Mapping[str, Any] | None = None) -> SFTConfig:
    """TRL ``SFTConfig`` from the recipe (no external loggers; checkpoints only with ``checkpoint_args``)."""
    t, s = recipe.train, recipe.sft
    assert s is not None
    return SFTConfig(
        output_dir=str(output_dir), max_steps=max_steps or t.max_steps,
        per_device_train_batch_size=t.per_device_batch_size, per_device_eval_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type, warmup_steps=t.warmup_steps, weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm, seed=t.seed, data_seed=t.seed, logging_steps=t.logging_steps,
        gradient_checkpointing=t.gradient_checkpointing, bf16=t.bf16,
        dataloader_num_workers=t.dataloader_num_workers, max_length=s.max_length,
        completion_only_loss=True, eval_strategy="steps" if do_eval else "no", eval_steps=s.eval_steps,
        # use_cache: Trainer copies it into the model's config, which the saved model (and its generation) keeps.
        report_to="none", disable_tqdm=True, packing=False, padding_free=False, use_cache=True,
        dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False,
        **(checkpoint_args or {"save_strategy": "no"}),
    )


def build_trainer(model: PreTrainedModel, processor: ProcessorMixin, train_ds: Any, eval_ds: Any | None,
                  recipe: Recipe, output_dir: str | Path, max_steps: int | None = None,
                  callbacks: list[TrainerCallback] | None = None,
                  checkpoint_args: Mapping[str, Any] | None = None) -> SFTTrainer:
    """An ``SFTTrainer`` for the recipe (LoRA-wrapped when the recipe says so; the tower frozen first,
    BatchNorm included, since PEFT freezes weights but not running statistics)."""
    if recipe.lora.freeze_vision:
        modeling.freeze_vision_tower(model)
    args = sft_config(recipe, output_dir, max_steps, do_eval=eval_ds is not None, checkpoint_args=checkpoint_args)
    return SFTTrainer(model=model, args=args,
                      train_dataset=train_ds, eval_dataset=eval_ds, processing_class=processor,
                      peft_config=lora_config(recipe) if recipe.lora.enabled else None, callbacks=callbacks)


def sft_examples(workspace: Path, recipe: Recipe, model_params: ModelParams
                 ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """(train examples, val examples, counts) for SFT; counterfactuals when the recipe includes them."""
    assert recipe.sft is not None
    spec = base_model.canvas_spec(recipe)
    annotations = data.training_annotations(workspace, ["train", "val"], model_params)
    real = data.real_examples(annotations, ["train"], spec, recipe.grounding)
    counts: dict[str, Any] = {"annotation_rows": len(annotations), "real_train": len(real),
                              "excluded_datasets": list(model_params.train_exclude_datasets)}
    cf: list[dict[str, Any]] = []
    offered, skipped = len(real), Counter[str]()
    if recipe.sft.include_counterfactuals:
        cf_rows = data.load_counterfactuals(workspace, ["train"], model_params.train_exclude_datasets)
        cf, skipped = data.counterfactual_examples(cf_rows, annotations, ["train"], spec, recipe.grounding)
        offered += len(cf_rows)
        counts["counterfactual_train"] = len(cf)
        counts["counterfactual_skipped"] = dict(sorted(skipped.items()))
    pool = real + cf
    counts[accounting.KEY] = accounting.block("train rows", offered, len(pool), skipped)
    if not pool:
        raise data.DataError("no train examples for SFT (is the train split empty?)")
    train = (data.balance_groups(real, cf, recipe.sft.normal_fraction, recipe.train.seed)
             if recipe.sft.normal_fraction else pool)
    val_all = data.real_examples(annotations, ["val"], spec, recipe.grounding)
    val = val_all[:recipe.sft.max_eval_samples]
    counts.update({"pool_by_kind": data.kind_counts(pool), "train_examples": len(train),
                   "train_by_kind": data.kind_counts(train), "val_rows": len(val_all), "val_used": len(val)})
    return train, val, counts


def train_sft(workspace: Path, recipe: Recipe, base_dir: Path, out_dir: Path, model_params: ModelParams,
              max_steps: int | None = None, checkpoints: Checkpoints | None = None) -> dict[str, Any]:
    """Run SFT from ``base_dir`` and write model/, adapter/ (LoRA), log.csv and summary.json to ``out_dir``.

    With ``checkpoints`` it saves resume points there and resumes from the newest one. Under a
    multi-process launch only process 0 writes; the others return an empty summary.
    """
    train, val, counts = sft_examples(workspace, recipe, model_params)
    modeling.configure_cpu_threads()
    spec = base_model.canvas_spec(recipe)
    train_ds = data.to_dataset(train, workspace, spec)
    eval_ds = data.to_dataset(val, workspace, spec) if val else None
    model, processor = modeling.load_model_and_processor(base_dir, recipe.model.dtype,
                                                         recipe.model.attn_implementation)
    log = StepLog()
    with training_dir(checkpoints, "cogalign-sft-") as workdir:
        trainer = build_trainer(model, processor, train_ds, eval_ds, recipe, workdir, max_steps,
                                callbacks=[log, ProgressCallback()],
                                checkpoint_args=checkpoints.trainer_args() if checkpoints else None)
        with cached_tower(trainer.model) as cache:  # a frozen tower encodes each image once
            trainer.train(resume_from_checkpoint=resume_point(checkpoints, log))
            if eval_ds is not None:
                trainer.evaluate()
            if not trainer.is_world_process_zero():
                return {}
            trained = modeling.save_trained(trainer.model, processor, out_dir, recipe.lora.enabled)
            check = train_ds.select(range(min(PARSE_CHECK_SAMPLES, len(train_ds))))
            answers = infer.generate_answers(trained, processor, list(check["image"]), recipe.grounding)
    write_log_csv(out_dir / "log.csv", log, LOG_COLUMNS)
    losses, evals = log.series("loss"), log.series("eval_loss")
    summary = {
        **counts, "steps": trainer.state.global_step, "processes": trainer.args.world_size,
        "lora": recipe.lora.enabled,
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "loss_first": losses[0][1] if losses else None, "loss_last": losses[-1][1] if losses else None,
        "eval_loss_first": evals[0][1] if evals else None, "eval_loss_last": evals[-1][1] if evals else None,
        "train_parse_rate": infer.parse_rate(answers, recipe.grounding), "train_parse_checked": len(answers),
        "tower_feature_cache": {"hits": cache.hits, "misses": cache.misses},
    }
    atomic_write_json(out_dir / "summary.json", summary)
    return summary


def train_and_publish(workspace: Path, stage: str, recipe: Recipe, params: PipelineParams, inputs: list[str],
                      start_model: str, train: Callable[[Checkpoints], dict[str, Any]]) -> None:
    """What every training stage does around its trainer: open the checkpoints keyed by ``inputs`` and
    the params used, ``train`` (returns the summary), then on process 0 only write the provenance and
    the model cards (``start_model``: the workspace path training started from) and drop the checkpoints.
    """
    used = {"model": params.model.model_dump(mode="json"), "recipe": recipe.model_dump(mode="json")}
    checkpoints = open_checkpoints(workspace, stage, inputs, used, recipe.train)
    summary = train(checkpoints)
    if not is_main_process():
        return
    out = workspace / contract.stage_dir(stage)
    write_provenance(out, stage, workspace, inputs, params=used, extra={"steps": summary["steps"]})
    model_card.write_training_cards(workspace, stage, recipe, params, start_model)
    checkpoints.finish()


def _run(workspace: Path, params: PipelineParams, stage: str) -> None:
    method = ARM_METHODS[stage]
    recipe = stage_recipe(params.model.recipe, method, params.model)
    assert recipe.sft is not None
    relaunch_if_allocated(stage, recipe)  # several devices: one process each, under accelerate
    base_dir = base_model.resolve_base_model_dir(workspace)
    out = workspace / contract.stage_dir(stage)
    inputs = [data.split_table(data.ANNOTATE_DIR, "train"), data.split_table(data.ANNOTATE_DIR, "val"),
              base_model.REFERENCE_FILE.as_posix()]
    if recipe.model.kind in base_model.OFFLINE_KINDS:
        inputs.append(base_model.MODEL_DIR.as_posix())
    if recipe.sft.include_counterfactuals:
        inputs.append(data.split_table(data.COUNTERFACTUAL_DIR, "train"))
    train_and_publish(workspace, stage, recipe, params, inputs, base_model.MODEL_DIR.as_posix(),
                      lambda checkpoints: train_sft(workspace, recipe, base_dir, out, params.model,
                                                    checkpoints=checkpoints))


def run_stage(workspace: Path, params: PipelineParams, item: str | None) -> None:
    """DVC stage ``sft``: real images only."""
    del item
    _run(workspace, params, "sft")


def run_cf_stage(workspace: Path, params: PipelineParams, item: str | None) -> None:
    """DVC stage ``sft_cf``: real images plus counterfactual normals and matched controls."""
    del item
    _run(workspace, params, "sft_cf")
