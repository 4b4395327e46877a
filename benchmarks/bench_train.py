"""Our SFT and GRPO training vs TRL's trainers driven directly, same model/data/settings.

"Ours" is what the stages do: :func:`cogalign_core.train.sft.build_trainer` /
:func:`cogalign_core.train.grpo.build_trainer` from the tiny recipe with the stage's per-step log
callback (:class:`cogalign_core.train.trainlog.StepLog`). "TRL" is a bare ``SFTTrainer`` /
``GRPOTrainer`` given the same ``SFTConfig``/``GRPOConfig`` (built by the recipe's config functions,
so the settings cannot drift apart), the same weights with the same frozen vision tower, the same
dataset and reward functions, and no callback. The clock covers trainer construction and
``--steps`` training steps on both sides; each side runs ``--repeats`` times, alternating, and the
best time counts. Ratio = TRL time / our time (>= 0.95: our wrapping adds nothing measurable).

    python benchmarks/bench_train.py [--steps 10] [--grpo-steps 3] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from trl import GRPOTrainer, SFTTrainer

from cogalign_core.config import PipelineParams
from cogalign_core.train import base_model, data, grpo, modeling, sample_tables, sft
from cogalign_core.train.recipe import load_recipe
from cogalign_core.train.trainlog import StepLog


def _timed(build: Callable[[], Any]) -> float:
    """Seconds to construct a trainer and train it."""
    start = time.perf_counter()
    build().train()
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
            ours.append(_timed(partial(sft.build_trainer, model, proc, ds, None, recipe, tmp, steps,
                                       callbacks=[StepLog()])))
            model, proc = modeling.load_model_and_processor(model_dir)
            sft.freeze_vision_tower(model)  # what the recipe asks for, done by hand
            args = sft.sft_config(recipe, tmp, steps, do_eval=False)
            trl.append(_timed(partial(SFTTrainer, model=model, args=args, train_dataset=ds, processing_class=proc)))
    return min(ours), min(trl)


def bench_grpo(ws: Path, steps: int, repeats: int) -> tuple[float, float]:
    recipe = load_recipe("tiny", "grpo")
    examples, _ = grpo.grpo_examples(ws, recipe)
    ds = data.to_dataset(examples, ws, base_model.canvas_spec(recipe), with_completion=False)
    model_dir = ws / sft.OUT_DIR / "model"
    funcs, _ = grpo.reward_functions(recipe)
    ours, trl = [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            model, proc = modeling.load_model_and_processor(model_dir)
            ours.append(_timed(partial(grpo.build_trainer, model, proc, ds, recipe, tmp, steps, callbacks=[StepLog()])))
            model, proc = modeling.load_model_and_processor(model_dir)
            sft.freeze_vision_tower(model)
            args = grpo.grpo_config(recipe, tmp, steps)
            trl.append(_timed(partial(GRPOTrainer, model=model, reward_funcs=funcs, args=args, train_dataset=ds,
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
