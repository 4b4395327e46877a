"""The whole tiny pipeline on the bundled sample: outputs, reloadable models, report, lineage, reruns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cogalign import lineage as lin
from cogalign.compare import compare_metrics, read_metrics_at
from cogalign.runner import apply_overrides, run_pipeline
from cogalign.workspace import Workspace
from cogalign_core import tables
from tests.conftest import copy_workspace

pytestmark = pytest.mark.slow

OUTPUTS = (
    "data/ingest/samples.parquet", "data/ingest/quarantine.parquet", "data/annotate/annotations.parquet",
    "data/masks/masks.parquet", "data/masks/review.parquet", "data/masks/qc.json",
    "data/counterfactual/counterfactuals.parquet", "data/evaluate/metrics.json",
    "data/evaluate/predictions.parquet", "data/evaluate/report.html", "dvc.lock",
)


def test_every_stage_output_exists_and_is_committed(full_workspace: Path) -> None:
    for rel in OUTPUTS:
        assert (full_workspace / rel).is_file(), rel
    ws = Workspace.open(full_workspace)
    lock = yaml.safe_load((full_workspace / "dvc.lock").read_text())["stages"]
    for stage in ("masks", "counterfactual", "base_model", "sft", "rl_no_cf", "rl", "evaluate"):
        assert stage in lock, stage
    assert ws.git("status", "--porcelain", "--", "dvc.lock").stdout == ""
    metrics = json.loads(ws.dvc("metrics", "show", "--json").stdout)
    assert any("data/evaluate/metrics.json" in json.dumps(v) for v in metrics.values())


@pytest.mark.parametrize("stage", ["sft", "rl_no_cf", "rl"])
def test_trained_models_reload_offline_with_their_weights_and_answers(full_workspace: Path, stage: str) -> None:
    """The saved model reloads with exactly the saved tensors and answers the first evaluation batch as the
    evaluate stage recorded (greedy decoding, same batch)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from cogalign_core import evaluate
    from cogalign_core.settings import load_settings
    from cogalign_core.train.base_model import canvas_spec
    from cogalign_core.train.feature_cache import FeatureCache, cached_tower
    from cogalign_core.train.infer import generate_answers
    from cogalign_core.train.modeling import freeze_vision_tower
    from cogalign_core.train.recipe import load_recipe

    model_dir = full_workspace / "data" / stage / "model"
    model = AutoModelForImageTextToText.from_pretrained(model_dir, local_files_only=True)
    processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    assert model.config.model_type == "qwen3_vl" and processor.tokenizer is not None
    saved: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        saved |= load_file(f)
    loaded = {id(t): t for t in model.state_dict().values()}  # tied weights appear once
    assert len(saved) == len(loaded) > 10
    # Every loaded tensor is a saved one (names may be remapped on load): nothing was initialised afresh.
    digests = sorted((tuple(t.shape), hash(t.float().numpy().tobytes())) for t in saved.values())
    assert sorted((tuple(t.shape), hash(t.float().numpy().tobytes())) for t in loaded.values()) == digests

    params = Workspace.open(full_workspace).params
    recipe = load_recipe(params.model.recipe, evaluate.RECIPE_METHOD[stage])  # type: ignore[arg-type]
    spec = canvas_spec(recipe)
    annotations = tables.read_rows(full_workspace / "data/annotate/annotations.parquet")
    cfs = tables.read_rows(full_workspace / "data/counterfactual/counterfactuals.parquet")
    ep = params.evaluate
    prompts, _ = evaluate.build_prompts(annotations, cfs, ep.max_samples_per_condition, ep.seed, spec)
    prompts, images, _ = evaluate.load_prompt_images(prompts, full_workspace, spec, ep.blank_gray, ep.blank_side)
    batch = load_settings(full_workspace).generate_batch_size
    freeze_vision_tower(model)
    with cached_tower(model, FeatureCache()):  # the tower path evaluate takes
        answers = [a.strip() for a in generate_answers(model, processor, images[:batch], recipe.grounding,
                                                       max_new_tokens=ep.max_new_tokens, batch_size=batch)]
    recorded = [r["completion"] for r in tables.read_rows(full_workspace / "data/evaluate/predictions.parquet")
                if r["model"] == stage][:batch]
    assert answers == recorded


def test_rerun_is_up_to_date(full_workspace: Path, tmp_path: Path) -> None:
    outcome = run_pipeline(copy_workspace(full_workspace, tmp_path / "ws"))
    assert outcome.up_to_date


def test_masks_and_counterfactuals_are_real(full_workspace: Path) -> None:
    masks = tables.read_rows(full_workspace / "data/masks/masks.parquet")
    accepted = [m for m in masks if m["status"] == "accepted"]
    assert accepted and all((full_workspace / m["mask_path"]).is_file() for m in accepted)
    qc = json.loads((full_workspace / "data/masks/qc.json").read_text())
    assert "box_ellipse" in json.dumps(qc) and "grabcut" in json.dumps(qc)
    cfs = tables.read_rows(full_workspace / "data/counterfactual/counterfactuals.parquet")
    kinds = {c["kind"] for c in cfs if not c["excluded"]}
    assert {"counterfactual_normal", "control"} <= kinds
    assert all(c["exclusion_reason"] for c in cfs if c["excluded"])
    ann = {a["sample_id"]: a for a in tables.read_rows(full_workspace / "data/annotate/annotations.parquet")}
    assert all(c["split"] == ann[c["parent_sample_id"]]["split"] for c in cfs)
    assert all(c["diagnosis"] == "normal" for c in cfs if c["kind"] == "counterfactual_normal")


def test_dilation_margin_change_makes_only_counterfactual_stale(full_workspace: Path, tmp_path: Path) -> None:
    ws = Workspace.open(copy_workspace(full_workspace, tmp_path / "ws"))
    apply_overrides(ws, {"counterfactual.margin_fraction": str(ws.params.counterfactual.margin_fraction + 0.05)})
    stale = set(json.loads(ws.dvc("status", "--json").stdout))
    assert stale == {"counterfactual"}


def test_code_edits_make_exactly_their_importers_stale_and_unused_recipes_nothing(
        full_workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from importlib import resources

    from cogalign_core import fingerprint

    ws = Workspace.open(copy_workspace(full_workspace, tmp_path / "ws"))
    package = Path(fingerprint.__file__).resolve().parent
    recipes = Path(str(resources.files(fingerprint.RECIPES_PACKAGE)))
    real = fingerprint.read_source

    def stale_after_editing(target: Path | None) -> set[str]:
        """Simulate an edit of ``target`` (a comment appended), refresh fingerprints, ask DVC."""
        monkeypatch.setattr(fingerprint, "read_source", lambda p: real(p) + (b"\n# edit\n" if p == target else b""))
        ws.update_fingerprints()
        return set(json.loads(ws.dvc("status", "--json").stdout))

    training = {"base_model", "sft", "sft_cf", "rl_no_cf", "rl", "evaluate"}
    assert ws.params.model.recipe == "tiny"
    assert stale_after_editing(recipes / "qwen3-vl-8b" / "grpo.yaml") == set()  # a recipe no stage uses
    assert stale_after_editing(recipes / "tiny" / "grpo.yaml") == training  # the family is read as a whole
    assert stale_after_editing(package / "segmenters" / "quality.py") == {"masks", "counterfactual"}
    assert stale_after_editing(package / "answer_format.py") == {"annotate", "counterfactual"} | training
    assert stale_after_editing(None) == set()  # the edit undone: nothing stale


def test_report_is_self_contained(full_workspace: Path) -> None:
    """Every resource the report loads is embedded: each src/href is a data: URI (or an in-page anchor), every
    embedded image decodes, and no stylesheet pulls anything from outside."""
    import base64
    import io
    import re
    from html.parser import HTMLParser

    from PIL import Image

    class Resources(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.refs: list[tuple[str, str, str]] = []
            self.css: list[str] = []
            self._in_style = False

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            self._in_style = tag == "style"
            for name, value in attrs:
                if name in ("src", "href", "srcset", "poster", "data", "action", "xlink:href") and value:
                    self.refs.append((tag, name, value))
                elif name == "style" and value:
                    self.css.append(value)

        def handle_data(self, data: str) -> None:
            if self._in_style:
                self.css.append(data)

    parser = Resources()
    parser.feed((full_workspace / "data/evaluate/report.html").read_text())
    assert parser.refs and any(tag == "img" for tag, _, _ in parser.refs)
    assert [r for r in parser.refs if not r[2].startswith(("data:", "#"))] == []
    for tag, _, value in parser.refs:
        if tag == "img":
            header, payload = value.split(",", 1)
            assert header in ("data:image/png;base64", "data:image/jpeg;base64")
            Image.open(io.BytesIO(base64.b64decode(payload))).verify()
    css = "\n".join(parser.css)
    assert "@import" not in css and not re.search(r"url\(\s*['\"]?(?!data:)", css)


def test_metrics_carry_intervals_and_baselines(full_workspace: Path) -> None:
    metrics = json.loads((full_workspace / "data/evaluate/metrics.json").read_text())
    from cogalign.compare import flatten_figures

    figures = flatten_figures(metrics)
    assert any(k.startswith("rl.") for k in figures) and any(k.startswith("sft.") for k in figures)
    for key, fig in figures.items():
        assert {"value", "ci_low", "ci_high", "n", "constant_baseline", "majority_baseline"} <= set(fig), key
        if fig["n"] == 0:
            assert fig["value"] is None, key
    assert any("real_normal_specificity" in k for k in figures)
    assert any("counterfactual_specificity" in k for k in figures)


def test_compare_same_revision_is_within_noise(full_workspace: Path) -> None:
    ws = Workspace.open(full_workspace)
    head = ws.revision()
    assert head
    rows = compare_metrics(read_metrics_at(str(ws.root), head), read_metrics_at(str(ws.root), head))
    assert rows and all(r.delta in (0, None) and not r.outside_noise for r in rows)


def test_rl_lineage_lists_train_raw_files_and_no_test_file(full_workspace: Path) -> None:
    ws = Workspace.open(full_workspace)
    record = lin.lineage(ws, "data/rl/model")
    assert record["stage"] == "rl" and record["revision"] and record["flow_run_id"]
    assert [s["stage"] for s in record["chain"]][:1] == ["ingest_batch@b0001"]
    assert record["raw_batches"] == ["data/raw/b0001"]
    chain_params = json.dumps([s["params"] for s in record["chain"]])
    assert ws.params.privacy.salt not in chain_params  # the pseudonymisation key never leaks
    train_files = record["raw_files"]["train"]
    ann = tables.read_rows(full_workspace / "data/annotate/annotations.parquet")
    assert len(train_files) == sum(a["split"] == "train" for a in ann)
    assert all(f.startswith("data/raw/b0001/files/") and (full_workspace / f).is_file() for f in train_files)
    test_files = set(lin.artifact_lineage(ws, "data/evaluate/metrics.json")["raw_files"]["test"])
    assert test_files and not (test_files & set(train_files))
    assert "flowchart" in lin.to_mermaid(record)


def test_lineage_finds_the_workspace_from_a_path_inside_it(full_workspace: Path, tmp_path: Path) -> None:
    import contextlib

    from typer.testing import CliRunner

    from cogalign.cli import app

    def lineage(*args: str) -> dict:
        result = CliRunner().invoke(app, ["lineage", *args, "--json"])
        assert result.exit_code == 0, result.output
        return json.loads(result.output)

    with contextlib.chdir(tmp_path):  # outside the workspace: the path names it
        assert lineage(str(full_workspace / "data/rl/model"))["stage"] == "rl"
    with contextlib.chdir(full_workspace / "data" / "sft"):  # inside it: relative paths and sample ids
        assert lineage("model")["stage"] == "sft"
        sid = tables.read_rows(full_workspace / "data/ingest/samples.parquet")[0]["sample_id"]
        assert lineage(sid)["kind"] == "sample"
    with contextlib.chdir(tmp_path):
        result = CliRunner().invoke(app, ["lineage", "data/rl/model"])
        assert result.exit_code == 2 and "not inside a cogalign workspace" in result.output


def test_counterfactual_lineage_reaches_its_raw_image(full_workspace: Path) -> None:
    ws = Workspace.open(full_workspace)
    cf = next(c for c in tables.read_rows(full_workspace / "data/counterfactual/counterfactuals.parquet")
              if c["kind"] == "counterfactual_normal" and not c["excluded"])
    record = lin.lineage(ws, cf["sample_id"])
    assert record["kind"] == "derived_image"
    parent = record["parent"]
    assert parent["target"] == cf["parent_sample_id"]
    assert parent["raw_file"] and (full_workspace / parent["raw_file"]).is_file()
    assert any(d["sample_id"] == cf["sample_id"] for d in parent["derived"])


def test_forced_rerun_leaves_provenance_and_outputs_identical(full_workspace: Path, tmp_path: Path) -> None:
    ws = Workspace.open(copy_workspace(full_workspace, tmp_path / "ws"))
    lock_before = yaml.safe_load((ws.root / "dvc.lock").read_text())["stages"]
    prov_before = (ws.root / "data/counterfactual/provenance.json").read_bytes()
    ws.dvc("repro", "--force", "--single-item", "counterfactual")
    lock_after = yaml.safe_load((ws.root / "dvc.lock").read_text())["stages"]
    assert lock_after["counterfactual"]["outs"] == lock_before["counterfactual"]["outs"]
    assert (ws.root / "data/counterfactual/provenance.json").read_bytes() == prov_before


def test_external_test_batch_retrains_nothing(full_workspace: Path, tmp_path: Path) -> None:
    from cogalign.workspace import register
    from tests.test_pipeline_spine import _new_batch

    ws = Workspace.open(copy_workspace(full_workspace, tmp_path / "ws"))
    register(ws, _new_batch(tmp_path / "external", n=4), role="test", dataset="kvasir-seg")
    run_pipeline(ws.root, until="annotate")
    ann = tables.read_rows(ws.root / "data/annotate/annotations.parquet")
    assert sum(a["split"] == "external_test" for a in ann) == 4
    stale = json.loads(ws.dvc("status", "--json", "base_model", "sft", "rl_no_cf", "rl").stdout)
    assert stale == {}


def test_evaluate_test_source_scores_every_image_of_an_unseen_folder(full_workspace: Path, tmp_path: Path) -> None:
    from PIL import Image
    from typer.testing import CliRunner

    from cogalign.cli import app
    from tests.conftest import SAMPLE

    ws = Workspace.open(copy_workspace(full_workspace, tmp_path / "ws"))
    unseen = tmp_path / "other-hospital" / "normal-cecum"  # a classes layout: the folder names the label
    unseen.mkdir(parents=True)
    normals = sorted((SAMPLE / "kvasir-v2-normal-cecum" / "normal-cecum").glob("*.jpg"))
    assert len(normals) > 20  # more than the old per-condition cap of 20
    for img in normals:
        with Image.open(img) as im:  # mirrored: new pixels the workspace has never seen
            im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(unseen / img.name, quality=92)
    result = CliRunner().invoke(app, ["evaluate", "--workspace", str(ws.root), "--test-source", str(unseen.parent)])
    assert result.exit_code == 0, result.output
    assert "retrained" not in result.output
    ext = [a for a in tables.read_rows(ws.root / "data/annotate/annotations.parquet") if a["split"] == "external_test"]
    assert len(ext) > 20  # every unique image of the folder (near-duplicates collapse at ingest)
    preds = tables.read_rows(ws.root / "data/evaluate/predictions.parquet")
    for arm in ws.params.evaluate.models:
        scored = {p["sample_id"] for p in preds if p["model"] == arm and p["section"] == "external_test"
                  and p["condition"] == "normal"}
        assert scored == {a["sample_id"] for a in ext}, arm
    spec = json.loads((ws.root / "data/evaluate/metrics.json").read_text())["rl"]["external_test"]["all"]
    assert spec["real_normal_specificity"]["n"] == len(ext)
