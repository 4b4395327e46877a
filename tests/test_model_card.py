"""Model cards (issue 12, item 4): every saved model folder has a Hugging Face card, and ``evaluate``
writes each evaluated model's card with its metrics under its own output.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from cogalign_core.tables import read_rows
from cogalign_core.train import model_card

METRICS = {"test": {"all": {
    "diagnosis_accuracy": {"value": 0.75, "ci_low": 0.5, "ci_high": 0.9, "n": 20, "constant_baseline": 0.4,
                           "majority_baseline": 0.6},
    "box_iou": {"value": None, "ci_low": None, "ci_high": None, "n": 0, "constant_baseline": None,
                "majority_baseline": None}}, "by_source": {}}}


def _card() -> ModelCard:
    return model_card.build_card(
        model_name="cogalign-x-sft", title="T", description="D", base_model="data/base_model/model",
        tags=["sft"], datasets=["kvasir-seg"], model_table=[("stage", "`sft`")], lineage="L",
        recipe_and_params="R", curve="C", evaluation=model_card.NOT_EVALUATED.format(model="sft"))


def test_card_round_trips_and_the_evaluation_is_filled_in(tmp_path: Path) -> None:
    path = model_card.write_card(tmp_path, _card())
    card = ModelCard.load(path)
    assert card.data.library_name == "transformers" and card.data.license == "other"
    assert card.data.base_model == "data/base_model/model" and "not-a-medical-device" in card.data.tags
    assert model_card.NOTICE in card.text and card.data.eval_results is None
    evaluated = model_card.evaluated_card(card, METRICS)
    (tmp_path / "e").mkdir()
    model_card.write_card(tmp_path / "e", evaluated)
    again = ModelCard.load(tmp_path / "e" / model_card.CARD_FILE)
    (result,) = again.data.eval_results  # metrics without a value are left out of model-index
    assert (result.metric_type, result.metric_value, result.dataset_split) == ("diagnosis_accuracy", 0.75, "test")
    assert "| diagnosis_accuracy | 0.75 | 0.5 – 0.9 | 20 | 0.4 | 0.6 |" in again.text
    assert "Not evaluated" not in again.text
    # Only the evaluation section changed: the sections after it are still there, once.
    assert again.text.count("## Limitations") == 1 and again.text.count("## Evaluation") == 1
    assert again.text.split("## Evaluation")[0] == card.text.split("## Evaluation")[0]


@pytest.mark.slow
def test_pipeline_models_carry_cards_and_evaluate_adds_the_metrics(full_workspace: Path) -> None:
    ws = full_workspace
    annotations = read_rows(ws / "data/annotate/split_train.parquet")
    by_batch = Counter((r["batch_id"], r["dataset"]) for r in annotations)
    for stage in ("sft", "sft_cf", "rl_no_cf", "rl"):
        card = ModelCard.load(ws / f"data/{stage}/model/README.md")
        summary = json.loads((ws / f"data/{stage}/summary.json").read_text())
        assert card.data.model_name == f"cogalign-tiny-{stage}" and card.data.pipeline_tag == "image-text-to-text"
        assert card.data.base_model == ("data/sft/model" if stage.startswith("rl") else "data/base_model/model")
        assert card.data.license == "other" and card.data.license_name == "research-use-only"
        assert {"cogalign", "not-a-medical-device"} <= set(card.data.tags)
        assert set(card.data.datasets) == {r["dataset"] for r in annotations}
        text = card.text
        assert "Research use only, not a medical device." in text
        for (batch, dataset), n in by_batch.items():  # lineage: batch ids and row counts
            assert f"| {batch} | {dataset} | train | {n} |" in text
        assert f"{summary['steps']} optimisation steps" in text and "| loss |" in text
        assert "```yaml" in text and "Not evaluated" in text
    assert (ws / "data/base_model/model/README.md").is_file()

    metrics = json.loads((ws / "data/evaluate/metrics.json").read_text())
    evaluated = sorted(p.parent.name for p in (ws / "data/evaluate/model_cards").glob("*/README.md"))
    assert evaluated == sorted(metrics)
    for name, tree in metrics.items():
        card = ModelCard.load(ws / f"data/evaluate/model_cards/{name}/README.md")
        carried = {(r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results}
        expected = {(section, m): s["value"] for section, body in tree.items()
                    for m, s in body["all"].items() if s["value"] is not None}
        assert carried == expected and expected
        assert "Not evaluated" not in card.text
        # The training stage's own card is untouched (evaluate never edits another stage's output).
        assert "Not evaluated" in (ws / f"data/{name}/model/README.md").read_text()
