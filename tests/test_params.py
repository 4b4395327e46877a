"""params.yaml is generated from the pydantic models; execution settings are not params; stages read only
the params they declare."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from cogalign_core import contract, stage
from cogalign_core.config import PipelineParams, dump_params
from cogalign_core.config.declared import UndeclaredParamError, declared_view
from cogalign_core.executor import WORKERS_ENV, default_workers
from cogalign_core.settings import ExecutionSettings, load_settings
from tests.conftest import REPO, copy_workspace

EXECUTION_WORDS = ("workers", "device", "batch_size", "threads")


def _keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _keys(ann, f"{prefix}{name}.")
        else:
            out.append(prefix + name)
    return out


def test_repo_params_yaml_is_generated_from_the_models() -> None:
    assert (REPO / "params.yaml").read_text() == dump_params(PipelineParams())


def test_init_writes_the_repo_params_yaml_plus_a_salt(tmp_path: Path) -> None:
    from cogalign.workspace import init_workspace

    ws = init_workspace(tmp_path / "ws", salt="s" * 64)
    text = (ws.root / "params.yaml").read_text()
    assert text.replace("s" * 64, "''") == (REPO / "params.yaml").read_text()


def test_no_execution_setting_is_a_dvc_param() -> None:
    offenders = [k for k in _keys(PipelineParams) if any(w in k.rsplit(".", 1)[-1] for w in EXECUTION_WORDS)]
    assert offenders == []
    assert {"workers", "sam_device", "sam_batch_size", "generate_batch_size", "torch_threads"} <= set(
        ExecutionSettings.model_fields)


def test_settings_come_from_the_untracked_file_and_the_environment(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / contract.SETTINGS).parent.mkdir(parents=True)
    (tmp_path / contract.SETTINGS).write_text("workers: 3\nsam_device: cpu\n")
    monkeypatch.delenv(WORKERS_ENV, raising=False)
    assert load_settings(tmp_path).workers == 3 and load_settings(tmp_path).sam_device == "cpu"
    with contextlib.chdir(tmp_path):  # a stage process runs in its workspace
        assert default_workers() == 3
        monkeypatch.setenv(WORKERS_ENV, "2")
        assert default_workers() == 2
    (tmp_path / contract.SETTINGS).write_text("workrs: 3\n")
    with pytest.raises(ValueError, match=r"settings\.yaml"):
        load_settings(tmp_path)


def test_changing_execution_settings_reruns_nothing(spine_workspace: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from cogalign.runner import apply_overrides, is_up_to_date, run_pipeline
    from cogalign.workspace import Workspace

    ws = Workspace.open(copy_workspace(spine_workspace, tmp_path / "ws"))
    (ws.root / contract.SETTINGS).write_text("workers: 1\ntorch_threads: 2\nsam_batch_size: 2\n")
    monkeypatch.setenv(WORKERS_ENV, "1")
    assert ws.git("status", "--porcelain").stdout == ""  # the settings file is not versioned
    assert run_pipeline(ws.root, until="annotate").up_to_date
    # An override no stage declares reruns nothing but is committed (params.yaml is the history of settings).
    outcome = run_pipeline(ws.root, until="annotate", overrides={"registry.promotion.margin": "0.02"})
    assert outcome.up_to_date and outcome.revision and ws.git("status", "--porcelain").stdout == ""
    apply_overrides(ws, {"ingest.min_side": "33"})  # a real param, by contrast, makes ingest stale
    assert not is_up_to_date(ws, "annotate")


def _reads_an_undeclared_param(workspace: Path, params: PipelineParams, item: str | None) -> None:
    del workspace, item
    _ = params.annotate.split  # declared
    _ = params.masks.segmenter  # not declared by annotate


def test_a_stage_reading_an_undeclared_param_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "params.yaml").write_text(dump_params(PipelineParams()))
    monkeypatch.setitem(stage.STAGES, "annotate", stage.StageSpec(f"{__name__}:_reads_an_undeclared_param"))
    with pytest.raises(UndeclaredParamError, match=r"'annotate' reads params.yaml key 'masks'"):
        stage.run("annotate", workspace=tmp_path)


def test_declared_view_exposes_exactly_the_declared_keys() -> None:
    view = declared_view(PipelineParams(), contract.STAGES["ingest"].params, "ingest")
    assert view.batches == [] and view.ingest.phash_max_distance == 6 and view.privacy.salt == ""
    for read in (lambda: view.ingest.min_side, lambda: view.privacy.push_raw, lambda: view.masks,
                 lambda: view.ingest.model_dump()):
        with pytest.raises(UndeclaredParamError):
            read()
    whole = declared_view(PipelineParams(), contract.STAGES["masks"].params, "masks")
    assert whole.masks.model_dump() == PipelineParams().masks.model_dump()


def test_every_params_section_is_declared_by_some_stage_or_is_not_a_stage_param() -> None:
    declared = {p.split(".")[0] for io in contract.STAGES.values() for p in io.params}
    # privacy.push_raw and registry are read by the CLI (push, retrain), never by a stage.
    assert set(PipelineParams.model_fields) - declared == {"registry"}
    assert yaml.safe_load(dump_params(PipelineParams()))["privacy"]["push_raw"] is False
