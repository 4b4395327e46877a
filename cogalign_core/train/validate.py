"""Offline dry run of a recipe family: recipes parse, the vendored config builds the model on the meta
device (no weights, no download), LoRA targets exist (and stay out of a frozen vision tower), the
canvas fits the vision patch grid, and the accelerate config exists.

``python -m cogalign_core.train.validate [FAMILY ...]`` prints one JSON report per family.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

import torch
import yaml
from transformers import AutoConfig, AutoModelForImageTextToText

from cogalign_core.train import modeling
from cogalign_core.train.recipe import METHODS, accelerate_config_text, families, load_recipe, vendored_config
from cogalign_core.train.sft import lora_target_regex


class RecipeInvalid(ValueError):
    """A recipe family fails its offline dry run."""


def dry_run(family: str) -> dict[str, Any]:
    """Validate ``family`` offline; return facts (parameter counts, LoRA targets, image tokens)."""
    recipes = {m: load_recipe(family, m) for m in METHODS}  # type: ignore[arg-type]
    sft = recipes["sft"]
    report: dict[str, Any] = {"family": family, "methods": sorted(recipes), "kind": sft.model.kind}
    for m, r in recipes.items():
        if r.model != sft.model or r.canvas != sft.canvas or r.grounding != sft.grounding or r.lora != sft.lora:
            raise RecipeInvalid(f"{family}/{m}: model, canvas, grounding and lora must match sft.yaml")
    if sft.model.kind == "tiny":
        assert sft.model.tiny is not None
        report["image_tokens"] = modeling.count_image_tokens(sft.canvas.size, sft.model.tiny.patch_size)
        return report
    if sft.model.kind == "composed":
        from cogalign_core.train import composed

        assert sft.model.composed is not None
        report["image_tokens"] = composed.image_tokens(sft.model.composed, sft.canvas.size)
        report["vision_weights"] = sft.model.composed.vision_weights
        return report
    raw = vendored_config(family)
    if raw is None:
        raise RecipeInvalid(f"{family}: real recipes must vendor their model's config.json")
    raw = dict(raw)
    config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    if sft.model.architecture not in (config.architectures or []):
        raise RecipeInvalid(f"{family}: recipe architecture {sft.model.architecture} vs config {config.architectures}")
    patch = config.vision_config.patch_size
    merge = config.vision_config.spatial_merge_size
    if sft.canvas.size % (patch * merge):
        raise RecipeInvalid(f"{family}: canvas {sft.canvas.size} px is not a multiple of {patch} x {merge}")
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    if type(model).__name__ != sft.model.architecture:
        raise RecipeInvalid(f"{family}: config builds {type(model).__name__}, recipe expects {sft.model.architecture}")
    names = [n for n, _ in model.named_modules()]
    pattern = re.compile(lora_target_regex(sft))
    targets = [n for n in names if pattern.match(n)]
    if sft.lora.enabled and not targets:
        raise RecipeInvalid(f"{family}: LoRA targets {sft.lora.target_modules} match no module")
    if sft.lora.freeze_vision and any(".visual." in f".{n}" for n in targets):
        raise RecipeInvalid(f"{family}: LoRA targets reach into the frozen vision tower")
    if sft.accelerate_config:
        yaml.safe_load(accelerate_config_text(sft.accelerate_config))
    report.update({
        "parameters": sum(p.numel() for p in model.parameters()),
        "vision_parameters": sum(p.numel() for n, p in model.named_parameters() if ".visual." in f".{n}"),
        "lora_target_modules": len(targets),
        "image_tokens": (sft.canvas.size // (patch * merge)) ** 2,
        "accelerate_config": sft.accelerate_config,
    })
    return report


def main(argv: list[str] | None = None) -> int:
    names = (argv if argv is not None else sys.argv[1:]) or families()
    for name in names:
        sys.stdout.write(json.dumps(dry_run(name), sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
