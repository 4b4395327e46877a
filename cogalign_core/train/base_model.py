"""DVC stage ``base_model``: the model every training stage starts from.

Tiny recipes build it here, offline and deterministically: a byte-level BPE tokenizer trained on
the *train split's* prompts and gold answers only (plus the taxonomy vocabulary), the stock
Qwen3-VL processor, and a seeded random Qwen3-VL-architecture model, saved with
``save_pretrained`` to ``data/base_model/model/`` (reloadable with ``AutoModelForImageTextToText``
and ``AutoProcessor``, ``local_files_only``).

Real recipes treat the weights as an external input: a hub id (resolved in the local Hugging Face
cache, downloaded only when the hub is reachable and not offline) or a local directory
(``params.model.base_model_path``). It is recorded by revision and content hash in
``data/base_model/base_model.json``, never copied into the DVC cache. Offline and absent, the stage
fails with a message saying how to provide it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from cogalign_core import answer_format, canvas, contract
from cogalign_core.config import PipelineParams
from cogalign_core.io import atomic_dir, atomic_write_json
from cogalign_core.provenance import path_digest, write_provenance
from cogalign_core.train import data
from cogalign_core.train.recipe import Recipe, load_recipe

OUT_DIR = Path(contract.BASE_MODEL)
MODEL_DIR = Path(contract.model_dir("base_model"))
REFERENCE_FILE = Path(contract.BASE_MODEL_REFERENCE)
IDENTITY_KEYS: tuple[str, ...] = ("kind", "name", "revision", "sha256")
WEIGHT_SUFFIXES: tuple[str, ...] = (".safetensors", ".json", ".bin", ".model", ".txt", ".jinja")
OFFLINE_KINDS: tuple[str, ...] = ("tiny", "composed")  # built by this stage into data/base_model/model


class BaseModelUnavailable(RuntimeError):
    """The recipe's external base model cannot be found (offline and not cached, or a bad path)."""


def canvas_spec(recipe: Recipe) -> canvas.CanvasSpec:
    """The recipe's canvas as a :class:`cogalign_core.canvas.CanvasSpec`."""
    return canvas.CanvasSpec(**recipe.canvas.model_dump())


def tokenizer_corpus(annotations: list[dict[str, Any]], recipe: Recipe) -> list[str]:
    """Texts the tiny tokenizer is trained on: train-split prompts and answers, and the taxonomy.

    Val/test rows never contribute (their answers must not shape the vocabulary).
    """
    spec = canvas_spec(recipe)
    texts = [answer_format.system_prompt(False), answer_format.system_prompt(True), answer_format.QUESTION]
    for grounding in (False, True):
        texts += [e["answer"] for e in data.real_examples(annotations, ["train"], spec, grounding)]
    texts += recipe.prompt_taxonomy_terms()
    return sorted(set(texts))


def build_offline(workspace: Path, recipe: Recipe, params: PipelineParams) -> dict[str, Any]:
    """Build and save an offline model (tiny or composed) into ``data/base_model/model``; return summary facts."""
    from cogalign_core.train import modeling

    modeling.configure_cpu_threads()
    # The tokenizer never sees val/test text, nor a source held out of training.
    annotations = data.training_annotations(workspace, ["train"], params.model)
    if not annotations:
        raise data.DataError("the train split is empty (after train_exclude_datasets): the offline tokenizer "
                             "needs train texts")
    corpus = tokenizer_corpus(annotations, recipe)
    facts: dict[str, Any] = {}
    if recipe.model.tiny is not None:
        spec = recipe.model.tiny
        tokenizer = modeling.train_tokenizer(corpus, spec.vocab_size)
        processor: Any = modeling.build_tiny_processor(tokenizer, spec, recipe.canvas.size)
        model = modeling.build_tiny_model(spec, tokenizer, recipe.canvas.size)
        image_tokens = modeling.count_image_tokens(recipe.canvas.size, spec.patch_size)
    else:
        from cogalign_core.train import composed, vision_weights

        cspec = recipe.model.composed
        assert cspec is not None
        tokenizer = composed.train_tokenizer(corpus, cspec)
        processor = composed.build_processor(tokenizer, cspec, recipe.canvas.size)
        model = composed.build_model(cspec, tokenizer, recipe.canvas.size, seed=cspec.text.seed + params.model.seed)
        image_tokens = composed.image_tokens(cspec, recipe.canvas.size)
        tower = modeling.vision_tower(model)
        facts = {"vision_weights": vision_weights.source_record(cspec.vision_weights),
                 "vision_parameters": sum(p.numel() for p in tower.parameters())}
    with atomic_dir(workspace / MODEL_DIR) as tmp:
        modeling.save_model_and_processor(model, processor, tmp)
    return {
        "kind": recipe.model.kind,
        "architecture": type(model).__name__,
        "train_rows": len(annotations),
        "corpus_texts": len(corpus),
        "vocab_size": len(tokenizer),
        "parameters": sum(p.numel() for p in model.parameters()),
        "image_tokens_per_canvas": image_tokens,
        "canvas_size": recipe.canvas.size,
        **facts,
    }


def _weights_digest(path: Path) -> str:
    """Content hash of a model directory's weight/config files (what determines the model)."""
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not any(p.suffix in (".safetensors", ".bin") for p in files):
        raise BaseModelUnavailable(f"{path} holds no weights (*.safetensors / *.bin)")
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0" + path_digest(p).encode() + b"\n")
    return h.hexdigest()


def resolve_pretrained(recipe: Recipe, local_override: str | None) -> dict[str, Any]:
    """Locate a real recipe's weights without copying them; raise :class:`BaseModelUnavailable` if absent."""
    name = local_override or recipe.model.name_or_path
    assert name is not None
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise BaseModelUnavailable(f"{local} is not a model directory (config.json missing)")
        return {"kind": "pretrained", "source": "local", "path": str(local.resolve()), "name": name,
                "revision": None, "sha256": _weights_digest(local)}
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        path = Path(snapshot_download(name, revision=recipe.model.revision, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError) as exc:
        if offline:
            raise BaseModelUnavailable(
                f"base model {name!r} (revision {recipe.model.revision or 'main'}) is not in the local Hugging Face "
                f"cache and HF_HUB_OFFLINE is set. Download it on a connected machine "
                f"(`hf download {name}`), or set params.yaml model.base_model_path to a local copy.") from exc
        try:
            path = Path(snapshot_download(name, revision=recipe.model.revision))
        except Exception as exc2:  # network errors come in many types; all mean "not available"
            raise BaseModelUnavailable(f"could not download base model {name!r}: {exc2}") from exc2
    return {"kind": "pretrained", "source": "hub", "path": str(path), "name": name,
            "revision": path.name, "sha256": _weights_digest(path)}


def resolve_base_model_dir(workspace: Path) -> Path:
    """Directory the training stages load the base model from (tiny: ``data/base_model/model``)."""
    ref_path = workspace / REFERENCE_FILE
    if not ref_path.is_file():
        raise FileNotFoundError(f"{workspace / REFERENCE_FILE} not found: run the base_model stage first")
    ref = json.loads(ref_path.read_text())
    path = workspace / MODEL_DIR if ref["kind"] in OFFLINE_KINDS else Path(ref["path"])
    if not (path / "config.json").is_file():
        raise BaseModelUnavailable(f"base model directory {path} is missing or incomplete")
    return path


def run_stage(workspace: Path, params: PipelineParams, item: str | None) -> None:
    """Build (tiny) or resolve (real) the base model; write base_model.json, summary.json, provenance.json."""
    del item
    recipe = load_recipe(params.model.recipe, "sft")
    if recipe.model.kind in OFFLINE_KINDS:
        facts = build_offline(workspace, recipe, params)
        reference = {"kind": recipe.model.kind, "path": MODEL_DIR.as_posix(), "family": recipe.family,
                     **({"vision_weights": facts["vision_weights"]} if "vision_weights" in facts else {})}
        inputs = [data.split_table(data.ANNOTATE_DIR, "train")]
    else:
        facts = resolve_pretrained(recipe, params.model.base_model_path)
        # The local path differs between machines, so only the identity (name, revision, hash) is a DVC fact.
        reference = {**facts, "family": recipe.family}
        facts = {k: v for k, v in facts.items() if k != "path"}
        inputs = []
    atomic_write_json(workspace / REFERENCE_FILE, reference)
    atomic_write_json(workspace / OUT_DIR / "summary.json", facts)
    write_provenance(workspace / OUT_DIR, "base_model", workspace, inputs,
                     params={"model": params.model.model_dump(mode="json"), "recipe": recipe.model_dump(mode="json")},
                     extra={"base_model": {k: v for k, v in facts.items() if k in IDENTITY_KEYS},
                            **({"vision_weights": facts["vision_weights"]} if "vision_weights" in facts else {})})
    if recipe.model.kind in OFFLINE_KINDS:
        from cogalign_core.train.model_card import write_base_model_card

        write_base_model_card(workspace, recipe, params, facts, workspace / MODEL_DIR)
