"""Checkpoint and resume of the training stages (issue 12, item 1).

Unit tests pin the key (what makes a checkpoint reusable) and what counts as a complete checkpoint.
The stage-level test SIGKILLs a real ``python -m cogalign_core.stage sft`` process after its first
checkpoint and checks that a run with other params ignores it while a rerun with the same params
resumes and ends with the weights of an uninterrupted run. The acceptance test does the same
through ``cogalign run`` for ``sft`` and then ``rl``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from cogalign_core.train import checkpoints as ckpt
from cogalign_core.train.recipe import TrainSpec
from cogalign_core.train.trainlog import StepLog
from tests.conftest import COGALIGN, TINY, cli_env, copy_stage_tables, copy_workspace

TRAIN = TrainSpec(max_steps=10, learning_rate=1e-3, save_steps=5, save_total_limit=2)


def _checkpoint(directory: Path, step: int, state: str | None) -> Path:
    folder = directory / f"{ckpt.CHECKPOINT_PREFIX}{step}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    if state is not None:
        (folder / ckpt.STATE_FILE).write_text(state)
    return folder


def _state(step: int, history: list[dict[str, float]] | None = None) -> str:
    return json.dumps({"global_step": step, "max_steps": 10, "log_history": history or []})


def test_key_changes_with_every_ingredient(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "data").mkdir()
    table = tmp_path / "data" / "split_train.parquet"
    table.write_bytes(b"rows v1")
    params = {"model": {"seed": 0}, "recipe": {"train": {"max_steps": 10}}}
    key, ingredients = ckpt.run_key(tmp_path, "sft", ["data/split_train.parquet"], params)
    assert ckpt.run_key(tmp_path, "sft", ["data/split_train.parquet"], params)[0] == key  # deterministic
    assert ingredients["processes"] == 1 and ingredients["code"]["stage"] == "sft"
    assert set(ingredients) == {"stage", "inputs", "params", "code", "packages", "processes"}
    others = {
        "stage": ckpt.run_key(tmp_path, "sft_cf", ["data/split_train.parquet"], params)[0],
        "params": ckpt.run_key(tmp_path, "sft", ["data/split_train.parquet"], {**params, "model": {"seed": 1}})[0],
        "inputs": ckpt.run_key(tmp_path, "sft", ["data/split_train.parquet", "data/missing"], params)[0],
    }
    table.write_bytes(b"rows v2")
    others["input content"] = ckpt.run_key(tmp_path, "sft", ["data/split_train.parquet"], params)[0]
    table.write_bytes(b"rows v1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    others["processes"] = ckpt.run_key(tmp_path, "sft", ["data/split_train.parquet"], params)[0]
    assert len({key, *others.values()}) == len(others) + 1, others


def test_only_complete_checkpoints_count_and_cut_ones_are_removed(tmp_path: Path) -> None:
    opened = ckpt.open_checkpoints(tmp_path, "sft", [], {"p": 1}, TRAIN)
    d = opened.directory
    assert d.parent == tmp_path / ckpt.CHECKPOINTS_DIR / "sft" and d.name == opened.key
    assert opened.resume_from() is None
    _checkpoint(d, 5, _state(5))
    _checkpoint(d, 10, _state(10)[:20])  # killed while writing trainer_state.json
    _checkpoint(d, 15, None)  # killed before trainer_state.json
    _checkpoint(d, 20, _state(15))  # state of another step: not this folder's
    assert ckpt.latest_complete(d) == d / "checkpoint-5"
    reopened = ckpt.open_checkpoints(tmp_path, "sft", [], {"p": 1}, TRAIN)
    assert reopened == opened
    assert sorted(p.name for p in d.iterdir()) == ["checkpoint-5", ckpt.KEY_FILE]
    assert json.loads((d / ckpt.KEY_FILE).read_text())["params"] == {"p": 1}
    assert opened.trainer_args() == {"save_strategy": "steps", "save_steps": 5, "save_total_limit": 2}
    other = ckpt.open_checkpoints(tmp_path, "sft", [], {"p": 2}, TRAIN)  # other params: another folder
    assert other.directory != d and other.resume_from() is None
    opened.finish()  # the stage wrote its outputs: every key of the stage goes
    assert not (tmp_path / ckpt.CHECKPOINTS_DIR / "sft").exists()


def test_resume_point_restores_the_logged_history(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    opened = ckpt.open_checkpoints(tmp_path, "rl", [], {}, TRAIN)
    log = StepLog()
    assert ckpt.resume_point(opened, log) is None and ckpt.resume_point(None, log) is None
    history = [{"loss": 2.0, "grad_norm": 1.0, "step": 1}, {"loss": 1.5, "step": 2}, {"eval_loss": 1.7, "step": 2}]
    folder = _checkpoint(opened.directory, 2, _state(2, history))
    assert ckpt.resume_point(opened, log) == str(folder)
    assert log.rows == {1: {"loss": 2.0, "grad_norm": 1.0}, 2: {"loss": 1.5, "eval_loss": 1.7}}
    assert "rl: resumed from step 2 of 10" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- real runs

def _set_model_params(ws: Path, **values: object) -> None:
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["model"].update(values)
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _complete_checkpoint(ws: Path, stage: str, skip: tuple[Path, ...] = ()) -> Path | None:
    """A complete checkpoint of ``stage`` in a key folder other than ``skip``."""
    for key_dir in sorted((ws / ckpt.CHECKPOINTS_DIR / stage).glob("*")):
        if key_dir not in skip and (found := ckpt.latest_complete(key_dir)):
            return found
    return None


def _wait_for(predicate, proc: subprocess.Popen[bytes], timeout: float, what: str):  # type: ignore[no-untyped-def]
    """Poll the file system until ``predicate`` is truthy; fail if ``proc`` ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := predicate():
            return found
        if proc.poll() is not None:
            pytest.fail(f"process exited ({proc.returncode}) before {what}")
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def _stage(ws: Path, stage: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cogalign_core.stage", stage], cwd=ws, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1"))


def _kill_after_first_checkpoint(ws: Path, stage: str, skip: tuple[Path, ...] = ()) -> Path:
    proc = subprocess.Popen([sys.executable, "-m", "cogalign_core.stage", stage], cwd=ws, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    try:
        found = _wait_for(lambda: _complete_checkpoint(ws, stage, skip), proc, 300, f"a {stage} checkpoint")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (ws / f"data/{stage}/model").exists()  # killed before the stage wrote its outputs
    return found


@pytest.fixture(scope="module")
def tiny_base(stage_tables: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The stage tables with the tiny base model built (read-only; tests copy it)."""
    from cogalign_core.config import load_params
    from cogalign_core.train import base_model

    ws = copy_stage_tables(stage_tables, tmp_path_factory.mktemp("ckpt-base") / "ws")
    _set_model_params(ws, recipe=TINY, sft_max_steps=16)
    base_model.run_stage(ws, load_params(ws), None)
    return ws


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_killed_sft_resumes_to_the_uninterrupted_model_and_other_params_start_over(
        tiny_base: Path, tmp_path: Path) -> None:
    reference = copy_stage_tables(tiny_base, tmp_path / "reference")
    done = _stage(reference, "sft")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed" not in done.stderr

    ws = copy_stage_tables(tiny_base, tmp_path / "ws")
    first = _kill_after_first_checkpoint(ws, "sft")  # tiny sft saves every 10 steps
    assert first.name == "checkpoint-10"
    # Other params: the checkpoint is for other inputs, so this run starts at step 0 under its own key.
    _set_model_params(ws, sft_max_steps=15)
    other = _kill_after_first_checkpoint(ws, "sft", skip=(first.parent,))
    assert other.parent != first.parent and first.is_dir()
    state = json.loads((other / ckpt.STATE_FILE).read_text())
    assert state["max_steps"] == 15 and next(e["step"] for e in state["log_history"] if "loss" in e) == 1

    _set_model_params(ws, sft_max_steps=16)  # back to the first params: resume from step 10
    resumed = _stage(ws, "sft")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"sft: resumed from step 10 of 16 (checkpoint {first.parent.name}/checkpoint-10)" in resumed.stderr
    summary = json.loads((ws / "data/sft/summary.json").read_text())
    assert summary["steps"] == 16
    # RNG, optimizer, scheduler and data position were restored: the very same weights and log.
    ours, theirs = load_file(ws / "data/sft/model/model.safetensors"), load_file(
        reference / "data/sft/model/model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert (ws / "data/sft/log.csv").read_text() == (reference / "data/sft/log.csv").read_text()
    # The outputs hold only the final model and its logs; every checkpoint of the stage is gone.
    assert sorted(p.name for p in (ws / "data/sft").iterdir()) == [
        "log.csv", "model", "provenance.json", "summary.json"]
    assert not (ws / ckpt.CHECKPOINTS_DIR / "sft").exists()


# ---------------------------------------------------------------------------------------- acceptance




def _start_run(ws: Path, log: Path, *args: str) -> subprocess.Popen[bytes]:
    with open(log, "wb") as fh:
        return subprocess.Popen([COGALIGN, "run", "--workspace", str(ws), "--until", "rl", *args], env=cli_env(),
                                stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


def _kill_run_after_checkpoint(ws: Path, stage: str, log: Path, *args: str) -> None:
    run = _start_run(ws, log, *args)
    try:
        _wait_for(lambda: _complete_checkpoint(ws, stage), run, 600, f"a {stage} checkpoint")
    except BaseException:
        print(log.read_text()[-3000:])
        raise
    finally:
        os.killpg(run.pid, signal.SIGKILL)  # the whole run, as `kill -9 -PGID` would
        run.wait(timeout=30)
    deadline = time.monotonic() + 30  # its stage processes end with it (parent-death signal)
    while time.monotonic() < deadline and _stage_processes(ws):
        time.sleep(0.1)
    assert not _stage_processes(ws)


def _stage_processes(ws: Path) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and Path(os.readlink(entry / "cwd")) == ws.resolve():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _stage_logs(ws: Path, stage: str) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted((ws / ".cogalign").rglob(f"{stage}.log")))


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_cogalign_run_killed_in_sft_then_in_rl_resumes_both(full_workspace: Path, tmp_path: Path) -> None:
    from cogalign_core.train.modeling import load_model_and_processor

    # The finished demo pipeline; shorter training makes base_model, sft and rl stale (--until rl).
    ws = copy_workspace(full_workspace, tmp_path / "ws")
    _kill_run_after_checkpoint(ws, "sft", tmp_path / "run1.log", "-S", "model.sft_max_steps=16",
                               "-S", "model.rl_max_steps=4")
    assert "resumed" not in _stage_logs(ws, "sft")
    _kill_run_after_checkpoint(ws, "rl", tmp_path / "run2.log")  # resumes sft, then is killed in rl
    assert "sft: resumed from step 10 of 16" in _stage_logs(ws, "sft")

    final = subprocess.run([COGALIGN, "run", "--workspace", str(ws), "--until", "rl"], env=cli_env(),
                           capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    assert "rl: resumed from step 2 of 4" in _stage_logs(ws, "rl")
    for stage, steps in (("sft", 16), ("rl", 4)):
        assert json.loads((ws / f"data/{stage}/summary.json").read_text())["steps"] == steps
        log_steps = [line.split(",")[0] for line in (ws / f"data/{stage}/log.csv").read_text().splitlines()[1:]]
        assert log_steps == [str(s) for s in range(1, steps + 1)], stage  # the log covers the steps before the kill
        model, processor = load_model_and_processor(ws / f"data/{stage}/model")
        assert model.config.architectures and processor.tokenizer is not None
        assert not (ws / ckpt.CHECKPOINTS_DIR / stage).exists()
