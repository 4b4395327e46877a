"""GPU check (<= 8 min on one H100): Qwen3-VL-2B from its vendored config with random weights, 20 SFT steps
(LoRA, bf16) and 5 GRPO steps at the recipe's settings, on real sample images. No download.

Prints per-step times, tokens/s, MFU and peak GPU memory. ``--tiny`` runs the same code path with the
tiny recipe on CPU (a smoke test of the script itself).

Needs torch, transformers, trl, peft, accelerate, datasets, tokenizers, pydantic, pyyaml, pyarrow,
opencv-python-headless and this package (``pip install --no-deps`` the carried wheels on a bare box).

MFU = achieved FLOP/s / peak bf16 FLOP/s (``--peak-tflops``, default 989 for H100 SXM dense). Training
FLOPs per token are taken as 4 x parameters for LoRA with a frozen base (2N forward + 2N activation
gradients; the adapters' weight gradients are negligible) and 6 x parameters for full training;
attention's quadratic term is left out, so MFU is slightly underestimated.

    python scripts/gpu_check.py [--tiny] [--sft-steps 20] [--grpo-steps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import AutoConfig, Qwen3VLForConditionalGeneration, TrainerCallback

from cogalign_core.config import PipelineParams
from cogalign_core.sample_workspace import build_stage_tables
from cogalign_core.train import base_model, data, grpo, modeling, sft
from cogalign_core.train.recipe import load_recipe, vendored_config
from cogalign_core.train.trainlog import StepLog


class StepTimer(TrainerCallback):
    """Wall time of every optimisation step (device-synchronised)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._t)


def build_model(family: str, ws: Path, device: str):
    """Random-weight model of ``family`` (vendored config; tiny: the tiny spec) and a processor."""
    recipe = load_recipe(family, "sft")
    annotations = data.load_annotations(ws)
    tok = modeling.train_tokenizer(base_model.tokenizer_corpus(annotations, recipe), 4096)
    if recipe.model.kind == "tiny":
        assert recipe.model.tiny is not None
        processor = modeling.build_tiny_processor(tok, recipe.model.tiny, recipe.canvas.size)
        model = modeling.build_tiny_model(recipe.model.tiny, tok, recipe.canvas.size)
        return model.to(device), processor, recipe
    raw = dict(vendored_config(family) or {})
    # Our trained tokenizer stands in for Qwen's (no download): point the vision/special ids at its tokens;
    # the vocabulary (embedding) size stays the real one, so compute and memory are the real model's.
    ids = {t: tok.convert_tokens_to_ids(t) for t in modeling.SPECIAL_TOKENS}
    raw.update(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
               vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    raw["text_config"] = {**raw["text_config"], "eos_token_id": ids[modeling.EOS_TOKEN],
                          "pad_token_id": ids[modeling.PAD_TOKEN], "bos_token_id": None}
    config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    vision = config.vision_config
    image_processor = modeling.image_processor_for_canvas(recipe.canvas.size, vision.patch_size,
                                                          vision.spatial_merge_size)
    from transformers import Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    processor = Qwen3VLProcessor(image_processor=image_processor, tokenizer=tok,
                                 video_processor=Qwen3VLVideoProcessor(patch_size=vision.patch_size),
                                 chat_template=modeling.CHAT_TEMPLATE)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3VLForConditionalGeneration._from_config(config, dtype=modeling.torch_dtype(recipe.model.dtype),
                                                             attn_implementation=recipe.model.attn_implementation)
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(eos_token_id=ids[modeling.EOS_TOKEN],
                                               pad_token_id=ids[modeling.PAD_TOKEN])
    return model, processor, recipe


def report(name: str, timer: StepTimer, log: StepLog, token_key: str, n_params: int, flops_per_token: int,
           peak_tflops: float, warmup: int) -> dict[str, float]:
    steps = timer.times[warmup:] or timer.times
    tokens = [v for _, v in log.series(token_key)]
    per_step_tokens = (tokens[-1] - tokens[0]) / max(1, len(tokens) - 1) if len(tokens) > 1 else float("nan")
    step_s = statistics.median(steps)
    tps = per_step_tokens / step_s
    out = {"steps": len(timer.times), "step_s_median": step_s, "step_s_first": timer.times[0],
           "tokens_per_step": per_step_tokens, "tokens_per_s": tps,
           "mfu": tps * flops_per_token * n_params / (peak_tflops * 1e12)}
    if torch.cuda.is_available():
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(name, json.dumps(out, sort_keys=True), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny recipe on CPU (smoke test)")
    parser.add_argument("--family", default="qwen3-vl-2b")
    parser.add_argument("--sft-steps", type=int, default=20)
    parser.add_argument("--grpo-steps", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    args = parser.parse_args()
    family = "tiny" if args.tiny else args.family
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    print(f"device={device} torch={torch.__version__} family={family}", flush=True)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        ws = Path(tmp) / "ws"
        params = PipelineParams.model_validate({"model": {"recipe": family},
                                                "masks": {"qc_segmenters": ["box_ellipse"]}})
        build_stage_tables(ws, 48, params)  # the real data stages on part of the sample
        model, processor, recipe = build_model(family, ws, device)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"parameters={n_params / 1e9:.3f}B", flush=True)
        # SFT (recipe settings, LoRA on real recipes)
        train, _, _ = sft.sft_examples(ws, recipe, params.model)
        ds = data.to_dataset(train, ws, base_model.canvas_spec(recipe))
        timer, log = StepTimer(), StepLog()
        trainer = sft.build_trainer(model, processor, ds, None, recipe, ws / "sft-out", args.sft_steps,
                                    callbacks=[timer, log])
        trainer.train()
        fpt = 4 if recipe.lora.enabled else 6
        results["sft"] = report("SFT", timer, log, "num_tokens", n_params, fpt, args.peak_tflops, warmup=2)
        model = trainer.model.merge_and_unload() if recipe.lora.enabled else trainer.model
        del trainer
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        # GRPO (recipe settings: group size, lengths, beta; generation with HF generate)
        grecipe = load_recipe(family, "grpo")
        examples, _ = grpo.grpo_examples(ws, grecipe, params.model)
        gds = data.to_dataset(examples, ws, base_model.canvas_spec(grecipe), with_completion=False)
        timer, log = StepTimer(), StepLog()
        if not grecipe.lora.enabled and grecipe.grpo is not None and grecipe.grpo.beta > 0:
            modeling.save_model_and_processor(model, processor, ws / "policy")  # TRL loads the reference from disk
            model, processor = modeling.load_model_and_processor(ws / "policy", grecipe.model.dtype)
        trainer = grpo.build_trainer(model, processor, gds, grecipe, ws / "grpo-out", args.grpo_steps,
                                     callbacks=[timer, log])
        trainer.train()
        results["grpo"] = report("GRPO", timer, log, "num_tokens", n_params, fpt, args.peak_tflops, warmup=1)
        lengths = log.series("completions/mean_length")
        print("GRPO completion mean length per step:", [round(v, 1) for _, v in lengths], flush=True)
    print("RESULT", json.dumps(results, sort_keys=True))


if __name__ == "__main__":
    main()
