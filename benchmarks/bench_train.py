"""Our SFT and GRPO training vs TRL's trainers driven directly, same model/data/settings.

"Ours" is what the stages do: :func:`cogalign_core.train.sft.build_trainer` /
:func:`cogalign_core.train.grpo.build_trainer` from the recipe (default: lite0-small, the demo's) with
the stage's per-step log callback (:class:`cogalign_core.train.trainlog.StepLog`) and the stage's
frozen-tower feature cache (:func:`cogalign_core.train.feature_cache.cached_tower`). "TRL" is a bare
``SFTTrainer`` / ``GRPOTrainer`` given the same ``SFTConfig``/``GRPOConfig`` (built by the recipe's
config functions, so the settings cannot drift apart), the same weights with the same frozen vision
tower, the same dataset and reward functions, no callback and no cache. "ours, no cache" is our
trainer without the cache, so the wrapping and the cache are measured apart. The clock covers trainer
construction and ``--steps`` training steps on every side; each side runs ``--repeats`` times,
alternating, and the best time counts. Ratio = TRL time / our time (>= 0.95: our stage is not slower).
The tables come from the real data stages on part of the bundled sample.

    python benchmarks/bench_train.py [--recipe lite0-small] [--steps 10] [--grpo-steps 3] [--repeats 2]
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
from cogalign_core.sample_workspace import build_stage_tables
from cogalign_core.train import base_model, data, grpo, modeling, sft
from cogalign_core.train.feature_cache import cached_tower
from cogalign_core.train.recipe import load_recipe
from cogalign_core.train.trainlog import StepLog


def _timed(build: Callable[[], Any], cache: bool = False) -> float:
    """Seconds to construct a trainer and train it (inside the stage's feature cache with ``cache``)."""
    start = time.perf_counter()
    trainer = build()
    if cache:
        with cached_tower(trainer.model):
            trainer.train()
    else:
        trainer.train()
    return time.perf_counter() - start


def _report(name: str, steps: int, ours: float, no_cache: float, trl: float) -> None:
    print(f"{name} {steps} steps: ours {ours:.2f}s ({ours / steps:.3f} s/step), ours without the cache "
          f"{no_cache:.2f}s, TRL {trl:.2f}s ({trl / steps:.3f} s/step); ratio TRL/ours = {trl / ours:.3f}, "
          f"TRL/ours-without-cache = {trl / no_cache:.3f}")


def bench_sft(ws: Path, family: str, params: PipelineParams, steps: int, repeats: int) -> None:
    recipe = load_recipe(family, "sft")
    spec = base_model.canvas_spec(recipe)
    train, _, _ = sft.sft_examples(ws, recipe, params.model)
    ds = data.to_dataset(train, ws, spec)
    model_dir = ws / base_model.MODEL_DIR
    ours, no_cache, trl = [], [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            for cache, times in ((True, ours), (False, no_cache)):
                model, proc = modeling.load_model_and_processor(model_dir)
                times.append(_timed(partial(sft.build_trainer, model, proc, ds, None, recipe, tmp, steps,
                                            callbacks=[StepLog()]), cache))
            model, proc = modeling.load_model_and_processor(model_dir)
            modeling.freeze_vision_tower(model)  # what the recipe asks for, done by hand
            args = sft.sft_config(recipe, tmp, steps, do_eval=False)
            trl.append(_timed(partial(SFTTrainer, model=model, args=args, train_dataset=ds, processing_class=proc)))
    _report("SFT ", steps, min(ours), min(no_cache), min(trl))


def bench_grpo(ws: Path, family: str, params: PipelineParams, steps: int, repeats: int) -> None:
    recipe = load_recipe(family, "grpo")
    examples, _ = grpo.grpo_examples(ws, recipe, params.model)
    ds = data.to_dataset(examples, ws, base_model.canvas_spec(recipe), with_completion=False)
    model_dir = ws / sft.OUT_DIR / "model"
    funcs, _ = grpo.reward_functions(recipe)
    ours, no_cache, trl = [], [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            for cache, times in ((True, ours), (False, no_cache)):
                model, proc = modeling.load_model_and_processor(model_dir)
                times.append(_timed(partial(grpo.build_trainer, model, proc, ds, recipe, tmp, steps,
                                            callbacks=[StepLog()]), cache))
            model, proc = modeling.load_model_and_processor(model_dir)
            modeling.freeze_vision_tower(model)
            args = grpo.grpo_config(recipe, tmp, steps)
            trl.append(_timed(partial(GRPOTrainer, model=model, reward_funcs=funcs, args=args, train_dataset=ds,
                                      processing_class=proc)))
    _report("GRPO", steps, min(ours), min(no_cache), min(trl))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--grpo-steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--recipe", default="lite0-small")
    parser.add_argument("--per-dataset", type=int, default=32, help="sample images per dataset for the tables")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        ws = Path(tmp) / "ws"
        params = PipelineParams.model_validate({"model": {"recipe": args.recipe, "sft_max_steps": 20},
                                                "masks": {"qc_segmenters": ["box_ellipse"]}})
        build_stage_tables(ws, args.per_dataset, params)
        base_model.run_stage(ws, params, None)
        sft.run_stage(ws, params, None)  # GRPO starts from an SFT model, as in the pipeline
        bench_sft(ws, args.recipe, params, args.steps, args.repeats)
        bench_grpo(ws, args.recipe, params, args.grpo_steps, args.repeats)


if __name__ == "__main__":
    main()
