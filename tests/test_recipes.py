"""Recipes resolve and validate offline: tiny and real families (vendored configs, meta-device build)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from cogalign_core.config import PipelineParams
from cogalign_core.train import recipe, validate

REAL_FAMILIES = ("qwen3-vl-2b", "qwen3-vl-8b", "qwen2.5-vl-3b")


def test_shipped_families() -> None:
    assert set(recipe.families()) >= {"tiny", *REAL_FAMILIES}


@pytest.mark.parametrize("family", ["tiny", *REAL_FAMILIES])
def test_family_dry_run(family: str) -> None:
    report = validate.dry_run(family)
    assert report["methods"] == ["grpo", "grpo_no_cf", "sft"]
    assert report["image_tokens"] >= 16
    if family != "tiny":
        assert report["lora_target_modules"] > 0 and report["parameters"] > 1e9


def test_recipe_invariants() -> None:
    for family in recipe.families():
        sft = recipe.load_recipe(family, "sft")
        assert sft.sft is not None and not sft.sft.include_counterfactuals  # SFT-only is the paper's baseline
        for method in ("grpo", "grpo_no_cf"):
            g = recipe.load_recipe(family, method).grpo
            assert g is not None and g.num_generations >= 8 and g.beta > 0
            assert g.use_counterfactuals == (method == "grpo")
            if family == "tiny":
                assert g.temperature >= 1.0
    real = recipe.load_recipe("qwen3-vl-8b", "sft")
    assert real.lora.enabled and real.model.kind == "pretrained" and real.accelerate_config


def test_bad_recipes_fail_clearly() -> None:
    with pytest.raises(FileNotFoundError, match="no recipe"):
        recipe.load_recipe("no-such-model", "sft")
    base = recipe.load_recipe("tiny", "grpo").model_dump()
    base["grpo"]["reward_weights"] = {"format": 1.0, "made_up": 1.0}
    with pytest.raises(ValidationError, match="unknown rewards"):
        recipe.Recipe.model_validate(base)
    base = recipe.load_recipe("tiny", "grpo").model_dump()
    base["grpo"]["num_generations"] = 1
    with pytest.raises(ValidationError):
        recipe.Recipe.model_validate(base)
    base = recipe.load_recipe("tiny", "sft").model_dump()
    base["model"]["tiny"]["mrope_section"] = [4, 4, 4]
    with pytest.raises(ValidationError, match="mrope_section"):
        recipe.Recipe.model_validate(base)


def test_params_select_the_recipe() -> None:
    params = PipelineParams.model_validate({"model": {"recipe": "qwen3-vl-2b", "sft_include_counterfactuals": True}})
    assert params.model.recipe == "qwen3-vl-2b"
    with pytest.raises(ValidationError):
        PipelineParams.model_validate({"model": {"recipie": "tiny"}})


def test_offline_absent_real_weights_fail_clearly(tmp_path, monkeypatch) -> None:
    from cogalign_core.train import base_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    r = recipe.load_recipe("qwen3-vl-2b", "sft")
    with pytest.raises(base_model.BaseModelUnavailable, match=r"not in the local Hugging Face cache"):
        base_model.resolve_pretrained(r, None)
    with pytest.raises(base_model.BaseModelUnavailable, match=r"config\.json missing"):
        base_model.resolve_pretrained(r, str(tmp_path))
