"""Hugging Face model cards (``README.md``) beside every saved model, refreshed by ``evaluate``.

The stage that saves a model writes its card into the model folder (``data/<stage>/model/``, and
``adapter/`` for LoRA recipes; ``data/base_model/model/`` for offline-built base models), atomically,
after its summary and provenance. The YAML front matter comes from ``huggingface_hub``'s
``ModelCardData`` (base model, library, pipeline tag, tags, licence, source datasets); the body has
the data lineage (batch ids and row counts, the inputs' content hashes), the recipe and params,
a training-curve summary from ``log.csv``, the evaluation, limitations and the notice that the
model is for research use only and not a medical device.

A training stage cannot know its evaluation, and ``evaluate`` must not rewrite another stage's DVC
output, so ``evaluate`` writes the refreshed cards under its own output:
``data/evaluate/model_cards/<model>/README.md`` (the training card with the evaluation table and
``model-index`` results filled in). Cards hold only facts that a rerun reproduces (no dates), so
DVC hashes stay stable.
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from cogalign_core import contract
from cogalign_core.io import atomic_dir, atomic_write_text

CARD_FILE = contract.MODEL_CARD
NOTICE = "Research use only, not a medical device."
LICENSE_NAME = "research-use-only"
EVALUATION_HEADING = "## Evaluation"
TASK_TYPE = "image-text-to-text"
BASE_TAGS: tuple[str, ...] = ("cogalign", "endoscopy", "colonoscopy", "medical-imaging", "vision-language",
                              "research-only", "not-a-medical-device")
NOT_EVALUATED = ("Not evaluated by the stage that trained it. The `evaluate` stage writes this card with its "
                 f"metrics to `{contract.EVALUATED_MODEL_CARDS}/{{model}}/{CARD_FILE}` (and `{contract.METRICS}`, "
                 f"`{contract.REPORT}`).")
LIMITATIONS = """\
- **{notice}** It must not be used to diagnose, triage or treat patients, nor in any clinical decision.
- Trained only on the batches listed under *Data lineage*: performance on other hospitals, endoscopes and
  populations is unknown. The bundled sample's sources (Kvasir-SEG, CVC-ClinicDB, Kvasir v2) are licensed
  for research and education only.
- Answers follow a fixed four-level format (location, morphology, microvascular pattern, diagnosis, and a
  lesion box); labels at the finer levels are partly derived from masks and dataset labels, not from
  histology."""
OFFLINE_LIMITATION = """
- Built offline (`{kind}` model kind): a small, randomly initialised language model learns the answer format
  and what the image features separate on this data; it shows that the pipeline works, not that the method
  works clinically. Read every figure beside the evaluation's constant-answer and majority-class baselines."""

TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

{{ description }}

> **{{ notice }}**

## Model

{{ model_table }}

## Data lineage

{{ lineage }}

## Recipe and params

{{ recipe_and_params }}

## Training curve

{{ curve }}

## Evaluation

{{ evaluation }}

## Limitations

{{ limitations }}
"""


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.4g}"
    return str(v).replace("|", "\\|")


def _yaml_block(obj: Any) -> str:
    return "```yaml\n" + yaml.safe_dump(obj, sort_keys=False).rstrip() + "\n```"


# ------------------------------------------------------------------------------------------ facts

def lineage_counts(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, str, str, int]]:
    """(batch_id, dataset, split, rows) of annotation rows, sorted."""
    c = Counter((str(r.get("batch_id")), str(r.get("dataset")), str(r.get("split"))) for r in rows)
    return [(*k, n) for k, n in sorted(c.items())]


def curve_summary(log_csv: Path) -> list[dict[str, Any]]:
    """Per logged series of ``log.csv``: points, first and last (step, value), min and max."""
    if not log_csv.is_file():
        return []
    with log_csv.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    out = []
    for name in (rows[0].keys() if rows else []):
        if name == "step":
            continue
        points = [(int(r["step"]), float(r[name])) for r in rows if r.get(name) not in (None, "")]
        if points:
            values = [v for _, v in points]
            out.append({"series": name, "points": len(points), "first_step": points[0][0], "first": points[0][1],
                        "last_step": points[-1][0], "last": points[-1][1], "min": min(values), "max": max(values)})
    return out


def evaluation_table(model_metrics: Mapping[str, Any]) -> str:
    """Markdown tables of one model's metrics (``metrics.json[model]``): one per evaluated section."""
    parts = []
    for section, body in model_metrics.items():
        rows = [(name, s.get("value"), _ci(s), s.get("n"), s.get("constant_baseline"), s.get("majority_baseline"))
                for name, s in body.get("all", {}).items()]
        parts.append(f"**{section}** (95 % grouped-bootstrap intervals; baselines score a constant answer and the "
                     f"train split's majority answer with the same code)\n\n"
                     + _table(["metric", "value", "95 % CI", "n", "constant answer", "majority answer"], rows))
    return "\n\n".join(parts) or "No test rows were evaluated."


def _ci(stat: Mapping[str, Any]) -> str:
    lo, hi = stat.get("ci_low"), stat.get("ci_high")
    return "" if lo is None or hi is None else f"{lo:.3g} – {hi:.3g}"


def eval_results(model_metrics: Mapping[str, Any]) -> list[EvalResult]:
    """``model-index`` entries: every metric with a value, per evaluated section."""
    out = []
    for section, body in model_metrics.items():
        for name, s in body.get("all", {}).items():
            if s.get("value") is None:
                continue
            out.append(EvalResult(task_type=TASK_TYPE, dataset_type=f"cogalign-{section}",
                                  dataset_name=f"CogAlign {section} split", dataset_split=section,
                                  metric_type=name, metric_name=name, metric_value=s["value"]))
    return out


# ------------------------------------------------------------------------------------------ cards

def build_card(*, model_name: str, title: str, description: str, base_model: str | None, tags: Sequence[str],
               datasets: Sequence[str], model_table: Sequence[tuple[str, Any]], lineage: str,
               recipe_and_params: str, curve: str, evaluation: str, offline_kind: str | None = None) -> ModelCard:
    """A card from the module template; front matter through ``ModelCardData``."""
    data = ModelCardData(model_name=model_name, base_model=base_model, library_name="transformers",
                         pipeline_tag=TASK_TYPE, license="other", license_name=LICENSE_NAME,
                         tags=[*BASE_TAGS, *tags], datasets=list(datasets) or None)
    return ModelCard.from_template(
        data, template_str=TEMPLATE, title=title, description=description, notice=NOTICE,
        model_table=_table(["", ""], model_table), lineage=lineage, recipe_and_params=recipe_and_params,
        curve=curve, evaluation=evaluation, limitations=LIMITATIONS.format(notice=NOTICE)
        + (OFFLINE_LIMITATION.format(kind=offline_kind) if offline_kind else ""))


def write_card(folder: Path, card: ModelCard) -> Path:
    """Write ``folder/README.md`` atomically."""
    path = folder / CARD_FILE
    atomic_write_text(path, str(card).rstrip() + "\n")
    return path


def _lineage_text(rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Any], provenance: Mapping[str, Any],
                  excluded: Sequence[str]) -> str:
    parts = ["Annotation rows the stage read, by registered batch, source dataset and split:",
             _table(["batch", "dataset", "split", "rows"], lineage_counts(rows))]
    by_kind = summary.get("train_by_kind") or summary.get("prompts_by_kind")
    used = summary.get("train_examples", summary.get("prompts"))
    if used is not None:
        parts.append(f"Training examples after class balancing: {used}"
                     + (" (" + ", ".join(f"{k}: {v}" for k, v in sorted(by_kind.items())) + ")" if by_kind else ""))
    if summary.get("counterfactual_train") is not None:
        parts.append(f"Counterfactual normals and matched controls included: {summary['counterfactual_train']}")
    if excluded:
        parts.append("Source datasets held out of training: " + ", ".join(excluded))
    inputs = provenance.get("inputs") or {}
    if inputs:
        parts.append("Inputs (workspace paths, SHA-256 of their content; full record in the stage's "
                     "`provenance.json`):\n\n" + _table(["input", "sha256"], sorted(inputs.items())))
    return "\n\n".join(parts)


def _curve_text(log_csv: Path, summary: Mapping[str, Any]) -> str:
    rows = curve_summary(log_csv)
    if not rows:
        return "No training log."
    head = f"{summary.get('steps')} optimisation steps; per-step values in the stage's `log.csv`."
    return head + "\n\n" + _table(["series", "points", "first (step)", "last (step)", "min", "max"], [
        (r["series"], r["points"], f"{_cell(r['first'])} ({r['first_step']})", f"{_cell(r['last'])} ({r['last_step']})",
         r["min"], r["max"]) for r in rows])


def training_card(stage: str, recipe: Any, params: Any, out_dir: Path, rows: Sequence[Mapping[str, Any]],
                  started_from: str) -> ModelCard:
    """The card of a trained arm, from the files the stage wrote into ``out_dir`` (summary, provenance, log)."""
    summary = json.loads((out_dir / "summary.json").read_text())
    provenance = json.loads((out_dir / contract.PROVENANCE).read_text())
    pretrained = recipe.model.kind == "pretrained"
    base = recipe.model.name_or_path if pretrained else started_from
    method = "GRPO" if recipe.grpo is not None else "SFT"
    tags = [recipe.method, method.lower(), *(["lora"] if recipe.lora.enabled else []),
            *(["counterfactuals"] if (recipe.grpo and recipe.grpo.use_counterfactuals)
              or (recipe.sft and recipe.sft.include_counterfactuals) else [])]
    table = [("pipeline stage", f"`{stage}`"), ("method", f"{method} (`{recipe.family}/{recipe.method}` recipe)"),
             ("architecture", recipe.model.architecture), ("model kind", recipe.model.kind),
             ("started from", f"`{started_from}`" + (f" ({recipe.model.name_or_path})" if pretrained else "")),
             ("training steps", summary.get("steps")), ("processes", summary.get("processes", 1)),
             ("LoRA", "yes (merged into these weights; adapter in `adapter/`)" if recipe.lora.enabled else "no"),
             ("dtype", recipe.model.dtype)]
    return build_card(
        model_name=f"cogalign-{recipe.family}-{stage}", title=f"CogAlign `{stage}` model ({recipe.family})",
        description=f"A vision-language model for colonoscopy frames trained by the CogAlign pipeline's `{stage}` "
        f"stage ({method}). It answers in four levels — anatomical location, morphology, microvascular pattern, "
        "diagnosis — with a lesion box.",
        base_model=base, tags=tags, datasets=sorted({str(r.get("dataset")) for r in rows}), model_table=table,
        lineage=_lineage_text(rows, summary, provenance, params.model.train_exclude_datasets),
        recipe_and_params="Resolved recipe:\n\n" + _yaml_block(recipe.model_dump(mode="json"))
        + "\n\nWorkspace params (`params.yaml: model`):\n\n" + _yaml_block(params.model.model_dump(mode="json")),
        curve=_curve_text(out_dir / "log.csv", summary), evaluation=NOT_EVALUATED.format(model=stage),
        offline_kind=None if pretrained else recipe.model.kind)


def write_training_cards(workspace: Path, stage: str, recipe: Any, params: Any, started_from: str) -> list[Path]:
    """Write the card of ``data/<stage>`` into its ``model/`` (and ``adapter/``) folder."""
    from cogalign_core.train import data
    from cogalign_core.train.recipe import SFT_METHODS

    splits = ["train", "val"] if recipe.method in SFT_METHODS else ["train"]
    rows = data.training_annotations(workspace, splits, params.model)
    out = workspace / contract.stage_dir(stage)
    card = training_card(stage, recipe, params, out, rows, started_from)
    return [write_card(out / name, card) for name in ("model", "adapter") if (out / name).is_dir()]


def write_base_model_card(workspace: Path, recipe: Any, params: Any, facts: Mapping[str, Any],
                          model_dir: Path) -> Path:
    """The card of an offline-built base model (random text model, tokenizer trained on the train split)."""
    from cogalign_core.train import data

    rows = data.training_annotations(workspace, ["train"], params.model)
    vision = facts.get("vision_weights")
    table = [("pipeline stage", "`base_model`"), ("architecture", facts.get("architecture")),
             ("model kind", recipe.model.kind), ("parameters", facts.get("parameters")),
             ("image tokens per canvas", facts.get("image_tokens_per_canvas")),
             ("vocabulary", facts.get("vocab_size"))]
    if vision:
        table.append(("vision tower weights", ", ".join(f"{k}: {v}" for k, v in sorted(vision.items()))))
    card = build_card(
        model_name=f"cogalign-{recipe.family}-base", title=f"CogAlign base model ({recipe.family}, untrained)",
        description="The model every training arm starts from, built offline: a seeded random language model "
        + ("and projector around a pretrained, frozen vision tower" if vision else "and vision encoder")
        + ", with a tokenizer trained on the train split's prompts and answers. It has not been trained to answer.",
        base_model=None, tags=["base-model"], datasets=sorted({str(r.get("dataset")) for r in rows}),
        model_table=table,
        lineage="Tokenizer corpus: the train split's prompts and gold answers, by batch and dataset:\n\n"
        + _table(["batch", "dataset", "split", "rows"], lineage_counts(rows)),
        recipe_and_params=_yaml_block(recipe.model_dump(mode="json")), curve="Not trained.",
        evaluation=NOT_EVALUATED.format(model="base_model"), offline_kind=recipe.model.kind)
    return write_card(model_dir, card)


def _replace_section(text: str, heading: str, body: str) -> str:
    """``text`` with the markdown section under ``heading`` (up to the next ``## ``) replaced by ``body``."""
    start = text.find(heading + "\n")
    if start < 0:
        return text.rstrip() + f"\n\n{heading}\n\n{body}\n"
    rest = start + len(heading) + 1
    end = text.find("\n## ", rest)
    return text[:rest] + "\n" + body + "\n" + (text[end:] if end >= 0 else "")


def evaluated_card(card: ModelCard, model_metrics: Mapping[str, Any]) -> ModelCard:
    """A copy of ``card`` with the evaluation table and ``model-index`` results of ``model_metrics``."""
    out = ModelCard(str(card), ignore_metadata_errors=True)
    out.data.eval_results = eval_results(model_metrics) or None
    out.data.metrics = sorted({r.metric_type for r in out.data.eval_results or []}) or None
    out.text = _replace_section(out.text, EVALUATION_HEADING, evaluation_table(model_metrics))
    return out


def write_evaluated_cards(workspace: Path, metric_tree: Mapping[str, Any], model_dirs: Mapping[str, Path]) -> Path:
    """``data/evaluate/model_cards/<model>/README.md`` for every evaluated model, as one atomic folder.

    A model folder without a card (an external pretrained base model) gets a minimal one.
    """
    folder_out = workspace / contract.EVALUATED_MODEL_CARDS
    with atomic_dir(folder_out) as tmp:
        for name, folder in model_dirs.items():
            source = folder / CARD_FILE
            card = (ModelCard.load(source, ignore_metadata_errors=True) if source.is_file() else build_card(
                model_name=f"cogalign-{name}", title=f"CogAlign `{name}` model", description=f"Model `{name}`.",
                base_model=None, tags=[], datasets=[], model_table=[("folder", str(folder))], lineage="Unknown.",
                recipe_and_params="Unknown.", curve="Unknown.", evaluation=""))
            (tmp / name).mkdir()
            write_card(tmp / name, evaluated_card(card, metric_tree.get(name, {})))
    return folder_out
