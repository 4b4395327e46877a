"""Tiny model end to end on real sample images: base_model -> SFT (full and LoRA) -> sft_cf -> GRPO, reloaded offline.

The tables come from the pipeline's own data stages run on part of the sample (``stage_tables``).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cogalign_core.config import PipelineParams
from cogalign_core.train import base_model, data, grpo, infer, modeling, sft
from cogalign_core.train.recipe import load_recipe
from tests.conftest import TINY, copy_stage_tables

pytestmark = pytest.mark.slow


def _params(**model: object) -> PipelineParams:
    return PipelineParams.model_validate({"model": {"recipe": TINY, **model}})


@pytest.fixture(scope="module")
def workspace(stage_tables: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_stage_tables(stage_tables, tmp_path_factory.mktemp("tiny") / "ws")


@pytest.fixture(scope="module")
def trained(workspace: Path) -> Path:
    params = _params(sft_max_steps=40)
    base_model.run_stage(workspace, params, None)
    sft.run_stage(workspace, params, None)
    return workspace


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def test_base_model_is_deterministic_and_reloads(trained: Path, tmp_path: Path) -> None:
    ref = json.loads((trained / base_model.REFERENCE_FILE).read_text())
    assert ref["kind"] == "tiny"
    model, processor = modeling.load_model_and_processor(trained / base_model.MODEL_DIR)
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration"
    tok = processor.tokenizer
    for tag in modeling.answer_tag_tokens():  # tags are single, non-special tokens: TRL keeps them
        assert len(tok(tag, add_special_tokens=False)["input_ids"]) == 1 and tag not in tok.all_special_tokens
    # Rebuilding from the same annotations gives byte-identical weights and tokenizer.
    rebuilt = tmp_path / "ws"
    (rebuilt / "data/annotate").mkdir(parents=True)
    train_table = data.split_table(data.ANNOTATE_DIR, "train")
    (rebuilt / train_table).write_bytes((trained / train_table).read_bytes())
    base_model.run_stage(rebuilt, _params(), None)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        rel = base_model.MODEL_DIR / name
        assert (rebuilt / rel).read_bytes() == (trained / rel).read_bytes(), name


def test_sft_learns_the_format(trained: Path) -> None:
    out = trained / sft.OUT_DIR
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 40 and "counterfactual_train" not in summary  # counterfactuals kept out
    assert set(summary["train_by_kind"]) == {"kind:real_lesion", "kind:real_normal", "label:lesion", "label:normal"}
    rows = list(csv.DictReader((out / "log.csv").open()))
    losses = [float(r["loss"]) for r in rows if r["loss"]]
    assert len(losses) == 40 and sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert any(r["eval_loss"] for r in rows)
    # Every trained parameter changed; the frozen vision tower did not.
    before, after = _weights(trained / base_model.MODEL_DIR), _weights(out / "model")
    assert before.keys() == after.keys()
    for name, w in before.items():
        changed = not torch.equal(w, after[name])
        assert changed == (".visual." not in f".{name}"), name
    # Reloads offline, and its greedy answers on train images parse.
    model, processor = modeling.load_model_and_processor(out / "model")
    recipe = load_recipe(TINY, "sft")
    train = data.real_examples(data.load_annotations(trained), ["train"], base_model.canvas_spec(recipe), True)
    ds = data.to_dataset(train[:24], trained, base_model.canvas_spec(recipe))
    answers = infer.generate_answers(model, processor, [r["image"] for r in ds], grounding=True)
    assert infer.parse_rate(answers, grounding=True) >= 0.9, answers[:3]
    assert (out / "provenance.json").is_file()


def test_lora_path(trained: Path, tmp_path: Path) -> None:
    recipe = load_recipe(TINY, "sft")
    recipe = recipe.model_copy(update={"lora": recipe.lora.model_copy(update={"enabled": True, "r": 4, "alpha": 8})})
    out = tmp_path / "sft-lora"
    summary = sft.train_sft(trained, recipe, trained / base_model.MODEL_DIR, out, _params().model, max_steps=6)
    assert summary["lora"] and summary["steps"] == 6
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    lora_b = {k: v for k, v in adapter.items() if "lora_B" in k}
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b.values())  # B starts at zero: it trained
    assert not any(".visual." in k for k in adapter)
    before, merged = _weights(trained / base_model.MODEL_DIR), _weights(out / "model")
    assert before.keys() == merged.keys()  # merged back into a plain model
    q = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(before[q], merged[q])
    emb = "model.language_model.embed_tokens.weight"
    assert torch.equal(before[emb], merged[emb])
    modeling.load_model_and_processor(out / "model")


def test_sft_cf_stage_trains_on_counterfactuals_with_rl_labels(trained: Path) -> None:
    params = _params(sft_max_steps=4)
    sft.run_cf_stage(trained, params, None)
    out = trained / "data/sft_cf"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["counterfactual_train"] > 0
    assert {"kind:counterfactual_normal", "kind:control"} <= set(summary["train_by_kind"])
    # The same examples, labelled exactly as the RL stage labels them.
    recipe = load_recipe(TINY, "sft_cf")
    train, _, _ = sft.sft_examples(trained, recipe, params.model)
    rl, _ = grpo.grpo_examples(trained, load_recipe(TINY, "grpo"), params.model)
    rl_cf = {e["sample_id"]: e["answer"] for e in rl if e["kind"] in ("counterfactual_normal", "control")}
    sft_cf = {e["sample_id"]: e["answer"] for e in train if e["kind"] in ("counterfactual_normal", "control")}
    assert sft_cf and set(rl_cf) <= set(sft_cf) and all(sft_cf[k] == v for k, v in rl_cf.items())
    assert all(e["answer"].count("<diagnosis>normal</diagnosis>") == 1 for e in train
               if e["kind"] == "counterfactual_normal")
    before, after = _weights(trained / base_model.MODEL_DIR), _weights(out / "model")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    prov = json.loads((out / "provenance.json").read_text())
    assert any("counterfactual" in i for i in json.dumps(prov["inputs"]).split('"'))
    modeling.load_model_and_processor(out / "model")


def test_grpo_stages(trained: Path) -> None:
    model_params = _params().model
    no_cf, _ = grpo.grpo_examples(trained, load_recipe(TINY, "grpo_no_cf"), model_params)
    assert {e["kind"] for e in no_cf} <= {"real_lesion", "real_normal"}
    with_cf, counts = grpo.grpo_examples(trained, load_recipe(TINY, "grpo"), model_params)
    assert {"counterfactual_normal", "control"} <= {e["kind"] for e in with_cf}
    normal = counts["prompts_by_kind"]["label:normal"] / counts["prompts"]
    assert 0.4 <= normal <= 0.6
    # Every counterfactual row of the train split is either used or skipped with a reason.
    assert counts["counterfactual_train"] > 0
    skipped = sum(counts["counterfactual_skipped"].values())
    assert counts["counterfactual_train"] + skipped == counts["counterfactual_rows"]

    grpo.run_stage(trained, _params(rl_max_steps=3), None)
    out = trained / "data/rl"
    rows = list(csv.DictReader((out / "log.csv").open()))
    assert len(rows) == 3
    for name in ("format_reward", "cognition_reward", "diagnosis_reward", "grounding_reward"):
        assert all(r[f"reward_{name}.mean"] != "" for r in rows), name
    assert all(r["frac_reward_zero_std"] != "" for r in rows)
    assert any(float(r["reward_std"]) > 0 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["use_counterfactuals"]
    before, after = _weights(trained / sft.OUT_DIR / "model"), _weights(out / "model")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    modeling.load_model_and_processor(out / "model")
