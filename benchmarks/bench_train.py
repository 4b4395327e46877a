"""Our SFT and GRPO steps on the tiny model vs TRL's trainers driven directly, same model/data/settings.

"Ours" is :func:`cogalign_core.train.sft.build_trainer` / :func:`cogalign_core.train.grpo.build_trainer`
built from the tiny recipe; "TRL" is ``SFTTrainer`` / ``GRPOTrainer`` constructed here by hand with
the same hyper-parameters, the same model weights and the same dataset. Each side trains
``--steps`` steps ``--repeats`` times, alternating, and the best wall time per side counts.
Ratio = TRL time / our time (>= 0.95: our wrapping adds nothing measurable).

    python benchmarks/bench_train.py [--steps 10] [--grpo-steps 3] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from trl import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

from cogalign_core.config import PipelineParams
from cogalign_core.train import base_model, data, grpo, modeling, sample_tables, sft
from cogalign_core.train.recipe import load_recipe


def _timed(trainer) -> float:
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start


def bench_sft(ws: Path, steps: int, repeats: int) -> tuple[float, float]:
    recipe = load_recipe("tiny", "sft")
    spec = base_model.canvas_spec(recipe)
    train, _, _ = sft.sft_examples(ws, recipe, False)
    ds = data.to_dataset(train, ws, spec)
    model_dir = ws / base_model.MODEL_DIR
    ours, trl = [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            model, proc = modeling.load_model_and_processor(model_dir)
            ours.append(_timed(sft.build_trainer(model, proc, ds, None, recipe, tmp, steps)))
            model, proc = modeling.load_model_and_processor(model_dir)
            for name, p in model.named_parameters():  # same frozen vision tower as the recipe
                if ".visual." in f".{name}":
                    p.requires_grad_(False)
            t = recipe.train
            args = SFTConfig(output_dir=tmp, max_steps=steps, per_device_train_batch_size=t.per_device_batch_size,
                             learning_rate=t.learning_rate, lr_scheduler_type=t.lr_scheduler_type,
                             warmup_steps=t.warmup_steps, seed=t.seed, data_seed=t.seed, logging_steps=1,
                             gradient_checkpointing=False, bf16=t.bf16, completion_only_loss=True, save_strategy="no",
                             report_to="none", disable_tqdm=True, remove_unused_columns=False,
                             dataset_kwargs={"skip_prepare_dataset": True})
            trl.append(_timed(SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=proc)))
    return min(ours), min(trl)


def bench_grpo(ws: Path, steps: int, repeats: int) -> tuple[float, float]:
    recipe = load_recipe("tiny", "grpo")
    examples, _ = grpo.grpo_examples(ws, recipe)
    ds = data.to_dataset(examples, ws, base_model.canvas_spec(recipe), with_completion=False)
    model_dir = ws / sft.OUT_DIR / "model"
    funcs, weights = grpo.reward_functions(recipe)
    ours, trl = [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            model, proc = modeling.load_model_and_processor(model_dir)
            ours.append(_timed(grpo.build_trainer(model, proc, ds, recipe, tmp, steps)))
            model, proc = modeling.load_model_and_processor(model_dir)
            for name, p in model.named_parameters():
                if ".visual." in f".{name}":
                    p.requires_grad_(False)
            t, g = recipe.train, recipe.grpo
            assert g is not None
            args = GRPOConfig(output_dir=tmp, max_steps=steps, per_device_train_batch_size=t.per_device_batch_size,
                              learning_rate=t.learning_rate, lr_scheduler_type=t.lr_scheduler_type, seed=t.seed,
                              data_seed=t.seed, logging_steps=1, num_generations=g.num_generations, beta=g.beta,
                              temperature=g.temperature, top_p=g.top_p,
                              max_completion_length=g.max_completion_length, reward_weights=weights,
                              loss_type=g.loss_type, save_strategy="no", report_to="none", disable_tqdm=True,
                              remove_unused_columns=False, gradient_checkpointing=False, bf16=t.bf16)
            trl.append(_timed(GRPOTrainer(model=model, reward_funcs=funcs, args=args, train_dataset=ds,
                                          processing_class=proc)))
    return min(ours), min(trl)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--grpo-steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--lesions", type=int, default=64)
    parser.add_argument("--normals", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        ws = Path(tmp)
        sample_tables.build_workspace(ws, args.lesions, args.normals, 24)
        params = PipelineParams.model_validate({"model": {"sft_max_steps": 20}})
        base_model.run_stage(ws, params, None)
        sft.run_stage(ws, params, None)  # GRPO starts from an SFT model, as in the pipeline
        ours, trl = bench_sft(ws, args.steps, args.repeats)
        print(f"SFT  {args.steps} steps: ours {ours:.2f}s ({ours / args.steps * 1e3:.0f} ms/step), "
              f"TRL {trl:.2f}s ({trl / args.steps * 1e3:.0f} ms/step), ratio TRL/ours = {trl / ours:.3f}")
        ours, trl = bench_grpo(ws, args.grpo_steps, args.repeats)
        print(f"GRPO {args.grpo_steps} steps: ours {ours:.2f}s ({ours / args.grpo_steps:.2f} s/step), "
              f"TRL {trl:.2f}s ({trl / args.grpo_steps:.2f} s/step), ratio TRL/ours = {trl / ours:.3f}")


if __name__ == "__main__":
    main()
