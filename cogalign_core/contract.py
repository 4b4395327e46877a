"""The workspace contract: every path a stage reads or writes, and the params each stage declares.

This module is the one home of workspace paths. Stage modules, the CLI (forget, lineage, retrain)
and the Prefect flows name paths through it; ``dvc.yaml`` spells the same deps, outs and params
for DVC, and ``tests/test_contract.py`` checks the two agree. All paths are workspace-relative
POSIX strings; ``ITEM`` is DVC's foreach placeholder for per-batch stages.
"""

from __future__ import annotations

from dataclasses import dataclass

ITEM = "${item}"
SUMMARY = "summary.json"
PROVENANCE = "provenance.json"
DATA = "data"

# ------------------------------------------------------------------ raw zone (patient data, never pushed)
RAW = f"{DATA}/raw"
RAW_FILES = "files"  # inside a raw batch: the source tree exactly as received
RAW_BATCH_RECORD = "batch.json"  # inside a raw batch: layout, role, labels, what was not copied


def raw_batch(batch: str) -> str:
    """A raw batch folder (DVC-tracked by ``<folder>.dvc``)."""
    return f"{RAW}/{batch}"


def raw_batch_files(batch: str) -> str:
    return f"{raw_batch(batch)}/{RAW_FILES}"


def raw_batch_record(batch: str) -> str:
    return f"{raw_batch(batch)}/{RAW_BATCH_RECORD}"


# ------------------------------------------------------------------ ingest
INGEST = f"{DATA}/ingest"
INGEST_BATCHES = f"{INGEST}/batches"
BATCH_RECORDS = "records.parquet"  # file names inside a per-batch ingest folder
BATCH_QUARANTINE = "quarantine.parquet"
BATCH_DUPLICATES = "duplicates.parquet"
SAMPLES = f"{INGEST}/samples.parquet"
QUARANTINE = f"{INGEST}/quarantine.parquet"
DUPLICATES = f"{INGEST}/duplicates.parquet"
INGEST_SUMMARY = f"{INGEST}/{SUMMARY}"
INGEST_PROVENANCE = f"{INGEST}/{PROVENANCE}"


def ingest_batch(batch: str) -> str:
    """A per-batch ingest output folder: images/, masks/, records, quarantine, duplicates, summary."""
    return f"{INGEST_BATCHES}/{batch}"


# ------------------------------------------------------------------ annotate, clinician input, review
ANNOTATE = f"{DATA}/annotate"
ANNOTATIONS = f"{ANNOTATE}/annotations.parquet"
ANNOTATION_REJECTS = f"{ANNOTATE}/rejects.parquet"
CLINICIAN_LABELS = "clinician/labels.csv"
REVIEW = f"{DATA}/review"
CLINICIAN_PROMPTS = f"{REVIEW}/clinician_prompts.parquet"
CLINICIAN_MASKS = f"{REVIEW}/masks"
REVIEW_IMPORT_REPORT = f"{REVIEW}/last_import.json"


def split_table(stage_dir: str, split: str) -> str:
    """One split's table in a stage folder (same schema as the stage's whole table)."""
    return f"{stage_dir}/split_{split}.parquet"


def annotation_split(split: str) -> str:
    return split_table(ANNOTATE, split)


# ------------------------------------------------------------------ masks, counterfactuals
MASKS = f"{DATA}/masks"
MASKS_TABLE = f"{MASKS}/masks.parquet"
MASK_REVIEW = f"{MASKS}/review.parquet"
MASK_QC = f"{MASKS}/qc.json"
COUNTERFACTUAL = f"{DATA}/counterfactual"
COUNTERFACTUALS = f"{COUNTERFACTUAL}/counterfactuals.parquet"


def counterfactual_split(split: str) -> str:
    return split_table(COUNTERFACTUAL, split)


# ------------------------------------------------------------------ models
def stage_dir(stage: str) -> str:
    """The output folder of a stage (``data/<stage>``)."""
    return f"{DATA}/{stage}"


def model_dir(stage: str) -> str:
    """A model stage's reloadable model (``save_pretrained``)."""
    return f"{stage_dir(stage)}/model"


BASE_MODEL = stage_dir("base_model")
BASE_MODEL_REFERENCE = f"{BASE_MODEL}/base_model.json"
TRAINING_LOG = "log.csv"  # inside a training stage's folder
MODEL_CARD = "README.md"  # inside a model folder: its Hugging Face model card

# ------------------------------------------------------------------ evaluation
EVALUATE = stage_dir("evaluate")
PREDICTIONS = f"{EVALUATE}/predictions.parquet"
METRICS = f"{EVALUATE}/metrics.json"
REPORT = f"{EVALUATE}/report.html"
EVALUATED_SPLITS: tuple[str, ...] = ("test", "external_test")  # the sections evaluate scores
EVALUATED_MODEL_CARDS = f"{EVALUATE}/model_cards"  # <model>/README.md: each model's card with the metrics

# ------------------------------------------------------------------ registry (git-tracked, outside DVC outputs)
REGISTRY = f"{DATA}/registry"
DROP_LEDGER = f"{REGISTRY}/drop_ledger.json"
FORGOTTEN = f"{REGISTRY}/forgotten.json"
CHAMPION = f"{REGISTRY}/champion.json"
CHAMPION_PREDICTIONS = f"{REGISTRY}/champion_predictions.parquet"
DECISIONS = f"{REGISTRY}/decisions"

# ------------------------------------------------------------------ local state (git-ignored, outside DVC)
STATE = ".cogalign"
SETTINGS = f"{STATE}/settings.yaml"  # execution settings (cogalign_core.settings)
CHECKPOINTS = f"{STATE}/checkpoints"  # <stage>/<key>/: training checkpoints (cogalign_core.train.checkpoints)

# ------------------------------------------------------------------ code fingerprints
CODE = "code"


def fingerprint(stage: str) -> str:
    """The code fingerprint a stage depends on (``code/<stage>.json``; foreach items share one)."""
    return f"{CODE}/{stage.split('@', 1)[0]}.json"


# ------------------------------------------------------------------ the stages
@dataclass(frozen=True)
class StageIO:
    """What one DVC stage reads and writes. ``deps`` exclude the stage's code fingerprint (always a dep).

    ``foreach`` names the params list a per-item stage iterates over (its paths use :data:`ITEM`).
    ``persist`` names outs DVC keeps when the stage reruns (``persist: true``): the stage reuses each
    sample's earlier result from them when its reuse key is unchanged (:mod:`cogalign_core.reuse`).
    """

    deps: tuple[str, ...]
    outs: tuple[str, ...]
    params: tuple[str, ...]
    foreach: str | None = None
    persist: tuple[str, ...] = ()


_TRAIN_SPLITS = (annotation_split("train"),)
# SFT on real images only (the recipe validator refuses counterfactuals in an `sft` recipe), so `sft` need not
# wait for the mask and counterfactual stages; `sft_cf` reads the train split's counterfactuals too.
_SFT_INPUTS = (BASE_MODEL, annotation_split("train"), annotation_split("val"))

STAGES: dict[str, StageIO] = {
    "ingest_batch": StageIO(deps=(raw_batch(ITEM),), outs=(ingest_batch(ITEM),),
                            params=("privacy.salt", "ingest"), foreach="batches"),
    "ingest": StageIO(deps=(INGEST_BATCHES,),
                      outs=(SAMPLES, QUARANTINE, DUPLICATES, INGEST_SUMMARY, INGEST_PROVENANCE),
                      params=("batches", "privacy.salt", "ingest.phash_max_distance")),
    "annotate": StageIO(deps=(SAMPLES, INGEST_BATCHES, CLINICIAN_LABELS), outs=(ANNOTATE,),
                        params=("batches", "annotate")),
    "masks": StageIO(deps=(ANNOTATIONS, INGEST_BATCHES, REVIEW), outs=(MASKS,), params=("masks",),
                     persist=(MASKS,)),
    "counterfactual": StageIO(deps=(ANNOTATIONS, MASKS, INGEST_BATCHES), outs=(COUNTERFACTUAL,),
                              params=("counterfactual",), persist=(COUNTERFACTUAL,)),
    "base_model": StageIO(deps=_TRAIN_SPLITS, outs=(BASE_MODEL,), params=("model",)),
    "sft": StageIO(deps=_SFT_INPUTS, outs=(stage_dir("sft"),), params=("model",)),
    "sft_cf": StageIO(deps=(*_SFT_INPUTS, counterfactual_split("train")), outs=(stage_dir("sft_cf"),),
                      params=("model",)),
    "rl_no_cf": StageIO(deps=(stage_dir("sft"), annotation_split("train")), outs=(stage_dir("rl_no_cf"),),
                        params=("model",)),
    "rl": StageIO(deps=(stage_dir("sft"), annotation_split("train"), counterfactual_split("train")),
                  outs=(stage_dir("rl"),), params=("model",)),
    "evaluate": StageIO(deps=(BASE_MODEL, stage_dir("sft"), stage_dir("sft_cf"), stage_dir("rl_no_cf"),
                              stage_dir("rl"), ANNOTATIONS, COUNTERFACTUAL, MASKS, INGEST_BATCHES),
                        outs=(EVALUATE,), params=("evaluate", "model.recipe")),
}


def consumed_splits(stage: str) -> tuple[str, ...]:
    """Annotation splits whose samples (or their counterfactuals) a stage learns from or scores.

    Training stages read per-split tables (their deps say which); evaluate reads the whole
    annotation table and scores :data:`EVALUATED_SPLITS`.
    """
    base = stage.split("@", 1)[0]
    if base == "evaluate":
        return EVALUATED_SPLITS
    prefix = split_table(ANNOTATE, "").removesuffix(".parquet")
    return tuple(d.removeprefix(prefix).removesuffix(".parquet") for d in STAGES[base].deps if d.startswith(prefix))


def uses_counterfactuals(stage: str) -> bool:
    """True when a stage reads counterfactual images (a dep inside the counterfactual folder)."""
    base = stage.split("@", 1)[0]
    return any(d == COUNTERFACTUAL or d.startswith(COUNTERFACTUAL + "/") for d in STAGES[base].deps)


def summary_path(stage: str) -> str | None:
    """The ``summary.json`` of a stage run (``ingest_batch@b0002`` for a foreach item), or None."""
    base, _, item = stage.partition("@")
    if base not in STAGES:
        return None
    outs = [o.replace(ITEM, item) for o in STAGES[base].outs]
    files = [o for o in outs if o.endswith("/" + SUMMARY)]
    folders = [f"{o}/{SUMMARY}" for o in outs if "." not in o.rsplit("/", 1)[-1]]
    return (files or folders or [None])[0]


def is_under(path: str, folder: str) -> bool:
    """True when ``path`` is ``folder`` or inside it (workspace-relative POSIX paths)."""
    return path == folder or path.startswith(folder.rstrip("/") + "/")
