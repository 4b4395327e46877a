"""Recipes resolve and validate offline: offline families (tiny, lite0-small) and real ones (vendored configs,
meta-device build)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from cogalign_core.config import PipelineParams
from cogalign_core.train import recipe, validate

REAL_FAMILIES = ("qwen3-vl-2b", "qwen3-vl-8b", "qwen2.5-vl-3b")
OFFLINE_FAMILIES = ("tiny", "lite0-small")


def test_shipped_families() -> None:
    assert set(recipe.families()) >= {*OFFLINE_FAMILIES, *REAL_FAMILIES}


@pytest.mark.parametrize("family", [*OFFLINE_FAMILIES, *REAL_FAMILIES])
def test_family_dry_run(family: str) -> None:
    report = validate.dry_run(family)
    assert report["methods"] == ["grpo", "grpo_no_cf", "sft", "sft_cf"]
    assert report["image_tokens"] >= 16
    if family not in OFFLINE_FAMILIES:
        assert report["lora_target_modules"] > 0 and report["parameters"] > 1e9


def test_sft_cf_extends_sft_with_counterfactuals_only() -> None:
    for family in recipe.families():
        sft = recipe.load_recipe(family, "sft").model_dump(exclude={"method"})
        cf = recipe.load_recipe(family, "sft_cf").model_dump(exclude={"method"})
        assert cf["sft"].pop("include_counterfactuals") and not sft["sft"].pop("include_counterfactuals")
        # A larger data set may get a larger step budget (same passes over the data), never a smaller one.
        assert cf["train"].pop("max_steps") >= sft["train"].pop("max_steps"), family
        cf["sft"].pop("eval_steps"), sft["sft"].pop("eval_steps")
        assert cf == sft, family  # everything else is inherited through `extends: sft`


def test_stage_recipe_applies_seed_and_step_overrides() -> None:
    from cogalign_core.config.model import ModelParams

    base = recipe.load_recipe("lite0-small", "grpo")
    r = recipe.stage_recipe("lite0-small", "grpo", ModelParams(seed=3, rl_max_steps=2, sft_max_steps=9))
    assert r.train.seed == base.train.seed + 3 and r.train.max_steps == 2
    assert recipe.stage_recipe("lite0-small", "sft", ModelParams(sft_max_steps=9)).train.max_steps == 9


def test_recipe_invariants() -> None:
    for family in recipe.families():
        sft = recipe.load_recipe(family, "sft")
        assert sft.sft is not None and not sft.sft.include_counterfactuals  # SFT-only is the paper's baseline
        cf = recipe.load_recipe(family, "sft_cf").sft
        assert cf is not None and cf.include_counterfactuals
        for method in ("grpo", "grpo_no_cf"):
            g = recipe.load_recipe(family, method).grpo
            assert g is not None and g.num_generations >= 8 and g.beta > 0
            assert g.use_counterfactuals == (method == "grpo")
            if family in OFFLINE_FAMILIES:
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
    assert PipelineParams().model.recipe == "lite0-small"  # the default: a model that sees
    params = PipelineParams.model_validate({"model": {"recipe": "qwen3-vl-2b"}})
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
