"""Live progress: the stage-side progress file (items for data stages, steps + loss / reward for the
trainers), the displays, and ``cogalign run`` showing it while it runs (plain-line mode) and sending
the same lines to the Prefect logs.
"""

from __future__ import annotations

import io
import os
import subprocess
from pathlib import Path

import pytest

from cogalign.progress import PlainDisplay, ProgressBoard, RichDisplay, StageProgressFeed
from cogalign_core.progress import PROGRESS_ENV, ProgressRecord, ProgressWriter, format_progress, read_progress
from tests.conftest import COGALIGN, TINY, copy_stage_tables, copy_workspace


def test_writer_and_reader_round_trip_with_eta(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    writer = ProgressWriter(path, "item", "masks", total=200, min_interval=3600)
    writer.start()
    writer.started -= 10  # ten seconds in
    writer.update(50, force=True)
    record = read_progress(path)
    assert record is not None and (record.done, record.total, record.unit, record.desc) == (50, 200, "item", "masks")
    assert record.eta_seconds() == pytest.approx(30, rel=0.05)  # 50 items took 10 s: 150 more take 30 s
    writer.update(120)  # throttled: not written yet
    assert read_progress(path).done == 50  # type: ignore[union-attr]
    writer.update(200)  # the last unit is always written
    assert read_progress(path).done == 200  # type: ignore[union-attr]
    assert format_progress(read_progress(path), "masks").startswith("200/200 items (100%)")  # type: ignore[arg-type]
    assert not list(tmp_path.glob(".*"))  # atomic replace leaves no temp file
    assert read_progress(tmp_path / "missing.json") is None
    (tmp_path / "bad.json").write_text("{")
    assert read_progress(tmp_path / "bad.json") is None
    resumed = ProgressWriter(tmp_path / "r.json", "step", total=100, min_interval=0)
    resumed.start(done=40)  # a training run resumed at step 40: its rate counts only the new steps
    resumed.started -= 10
    resumed.update(50)
    assert read_progress(tmp_path / "r.json").eta_seconds() == pytest.approx(50, rel=0.05)  # type: ignore[union-attr]
    silent = ProgressWriter(None, "item")  # no COGALIGN_PROGRESS_FILE: nothing is written, nothing fails
    silent.update(3, total=4)
    assert not silent.enabled


def test_plain_display_throttles_and_always_shows_the_last_count(tmp_path: Path) -> None:
    out = io.StringIO()
    board = ProgressBoard()
    path = tmp_path / "sft.progress.json"
    writer = ProgressWriter(path, "step", total=300, min_interval=0)
    with board.attached(PlainDisplay(out, interval=3600)):
        feed = StageProgressFeed("sft", path, board=board, interval=3600)
        board.started("sft", "cpu")
        writer.start()
        for step in range(1, 5):
            writer.update(step, loss=2.0 / step)
            feed.poll()
        board.finished("sft", "ran", 75.0)
    lines = [line.split(" ", 1)[1] for line in out.getvalue().splitlines()]
    assert lines[0] == "sft: started on cpu"
    assert lines[-2].startswith("sft: 4/300 steps (1%)  loss 0.5") and "ETA" in lines[-2]
    assert lines[-1] == "sft: ran in 1m15s"
    assert len(lines) == 3  # throttled: the steps in between were not printed


def test_rich_display_shows_a_bar_per_running_stage() -> None:
    from rich.console import Console

    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=120)
    record = ProgressRecord("step", "", 120, 300, 0.0, 60.0, {"reward": 0.42})
    with RichDisplay(console) as display:
        display.started("rl", "0")
        display.progress("rl", record)
        display.bars.refresh()
        live = buffer.getvalue()
        display.finished("rl", "ran", 61.0)
    assert "rl" in live and "120/300" in live and "reward 0.42" in live and "ETA 1m30s" in live
    assert "rl: ran in 1m01s" in buffer.getvalue()


def test_map_items_reports_items_done(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cogalign_core.executor import map_items

    path = tmp_path / "p.json"
    monkeypatch.setenv(PROGRESS_ENV, str(path))
    assert map_items(abs, [-1, -2, -3, -4, -5], workers=1, desc="decode") == [1, 2, 3, 4, 5]
    record = read_progress(path)
    assert record is not None and (record.unit, record.desc, record.done, record.total) == ("item", "decode", 5, 5)


@pytest.mark.slow
def test_trainers_report_steps_with_loss_and_reward(stage_tables: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from cogalign_core.config import PipelineParams
    from cogalign_core.train import base_model, grpo, sft
    from cogalign_core.train.recipe import load_recipe

    ws = copy_stage_tables(stage_tables, tmp_path / "ws")
    params = PipelineParams.model_validate({"model": {"recipe": TINY}})
    base_model.run_stage(ws, params, None)
    monkeypatch.setenv(PROGRESS_ENV, str(tmp_path / "sft.json"))
    sft.train_sft(ws, load_recipe(TINY, "sft"), ws / base_model.MODEL_DIR, tmp_path / "sft", params.model,
                  max_steps=3)
    record = read_progress(tmp_path / "sft.json")
    assert record is not None and (record.unit, record.done, record.total) == ("step", 3, 3)
    assert "loss" in record.metrics
    monkeypatch.setenv(PROGRESS_ENV, str(tmp_path / "rl.json"))
    grpo.train_grpo(ws, load_recipe(TINY, "grpo"), tmp_path / "sft" / "model", tmp_path / "rl", params.model,
                    max_steps=2)
    record = read_progress(tmp_path / "rl.json")
    assert record is not None and (record.unit, record.done, record.total) == ("step", 2, 2)
    assert "reward" in record.metrics


@pytest.mark.timeout(420)
def test_cogalign_run_prints_progress_lines_and_logs_them_to_prefect(spine_workspace: Path, tmp_path: Path) -> None:
    from prefect.settings import PREFECT_API_URL

    ws = copy_workspace(spine_workspace, tmp_path / "ws")
    env = dict(os.environ, HF_HUB_OFFLINE="1", DVC_NO_ANALYTICS="1", COLUMNS="200", PREFECT_LOGGING_LEVEL="INFO",
               COGALIGN_PROGRESS_INTERVAL="0.2", PREFECT_API_URL=str(PREFECT_API_URL.value()))
    out = subprocess.run([COGALIGN, "run", "--workspace", str(ws), "--until", "annotate", "--force"], env=env,
                         capture_output=True, text=True, timeout=400, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = [line.split(" ", 1)[1] for line in out.stdout.splitlines() if line[:2].isdigit()]
    assert "ingest_batch@b0001: started on cpu" in lines
    count = [line for line in lines if line.startswith("ingest_batch@b0001: ") and " items" in line]
    assert count and "292/292 items (100%)" in count[-1], lines  # the stage's last count, whatever the timing
    assert lines.index(count[-1]) < lines.index(next(x for x in lines if x.startswith("ingest_batch@b0001: ran in")))
    assert any(line.startswith("annotate: ran in") for line in lines)
    assert "┃ stage" in out.stdout  # the summary table follows the live lines

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    run_id = out.stdout.split("flow run ", 1)[1].split()[0]
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
    assert any(log.message == count[-1] for log in logs), [log.message for log in logs]
