"""Deployments: prefect.yaml as read by `cogalign serve`, and a real run on a loopback Prefect server.

The server test starts ``prefect server start --host 127.0.0.1`` (its own PREFECT_HOME), serves the
workspace's ``end-to-end`` deployment with ``cogalign serve``, triggers a run through the REST API,
waits for it to complete and stops both processes by their PIDs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from cogalign.serve import read_deployments
from cogalign.workspace import Workspace, init_workspace

BIN = Path(sys.executable).parent
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def test_prefect_yaml_deployments_resolve_for_the_workspace(tmp_path: Path) -> None:
    ws = init_workspace(tmp_path / "ws", salt="deploy-" + "0" * 32)
    specs = {s.name: s for s in read_deployments(ws, drop_folder=tmp_path / "drop")}
    assert set(specs) == {"end-to-end", "retrain"}
    e2e, retrain = specs["end-to-end"], specs["retrain"]
    assert e2e.entrypoint == "cogalign.serve:run_workspace" and not e2e.schedules
    assert e2e.parameters == {"workspace": str(ws.root), "recipe": None}
    assert retrain.entrypoint == "cogalign.flows.retrain:retrain"
    assert retrain.parameters == {"workspace": str(ws.root), "drop_folder": str((tmp_path / "drop").resolve())}
    (cron,) = retrain.schedules
    assert cron["cron"] and cron["timezone"]  # a schedule with an explicit timezone
    assert e2e.work_pool == retrain.work_pool == "cogalign-process"
    doc = yaml.safe_load((ws.root / "prefect.yaml").read_text())
    assert doc["pull"][0]["prefect.deployments.steps.set_working_directory"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(proc: subprocess.Popen[bytes], grace: float = 15.0) -> None:
    """SIGTERM the process group (its own session), then SIGKILL after ``grace`` seconds."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    # Children that outlived the leader (uvicorn workers, flow-run processes) go too.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _wait_for(predicate, timeout: float, what: str, procs: list[subprocess.Popen[bytes]], logs: list[Path]):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                pytest.fail(f"{p.args} exited ({p.returncode}) while waiting for {what}:\n"
                            + "\n".join(log.read_text()[-3000:] for log in logs if log.exists()))
        with contextlib.suppress(httpx.HTTPError):
            value = predicate()
            if value:
                return value
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}:\n"
                + "\n".join(log.read_text()[-3000:] for log in logs if log.exists()))


@contextlib.contextmanager
def _background(cmd: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        yield proc
    finally:
        _stop(proc)


@pytest.mark.timeout(300)
def test_served_end_to_end_deployment_runs_on_a_loopback_server(tmp_path: Path) -> None:
    ws = init_workspace(tmp_path / "ws", sample=True, salt="deploy-" + "0" * 32, recipe="tiny")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_UI_ENABLED="false", PREFECT_SERVER_LOGGING_LEVEL="WARNING", PREFECT_LOGGING_LEVEL="INFO",
               HF_HUB_OFFLINE="1", DVC_NO_ANALYTICS="1")
    server_log, serve_log = tmp_path / "server.log", tmp_path / "serve.log"
    logs = [server_log, serve_log]
    with _background([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                     env, server_log) as server:
        client = httpx.Client(base_url=api, timeout=10)
        _wait_for(lambda: client.get("/health").status_code == 200, 120, "the Prefect server", [server], logs)
        serve_env = dict(env, PREFECT_API_URL=api)
        with _background([str(BIN / "cogalign"), "serve", "--workspace", str(ws.root), "--deployment",
                          "end-to-end"], serve_env, serve_log) as serve:
            deployment = _wait_for(
                lambda: (r := client.get("/deployments/name/cogalign-run/end-to-end")).status_code == 200 and r.json(),
                90, "the end-to-end deployment", [server, serve], logs)
            assert deployment["parameters"]["workspace"] == str(ws.root)
            # A busy SQLite-backed server answers 503 for a moment: retry that (bounded), nothing else.
            created = _wait_for(
                lambda: (r := client.post(f"/deployments/{deployment['id']}/create_flow_run",
                                          json={"parameters": {"until": "annotate"}})).status_code != 503 and r,
                60, "the server to accept the flow run", [server, serve], logs)
            assert created.status_code == 201, created.text
            run_id = created.json()["id"]
            state = _wait_for(
                lambda: (r := client.get(f"/flow_runs/{run_id}")).status_code == 200
                and (s := r.json()["state"]) and s["type"] in TERMINAL and s,
                150, "the flow run", [server, serve], logs)
            assert state["type"] == "COMPLETED", f"{state}\n{serve_log.read_text()[-4000:]}"
        assert serve.poll() is not None
    assert server.poll() is not None
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{api}/health", timeout=2)
    # The deployed run did what `cogalign run --until annotate` does: outputs, lock, a commit.
    assert (ws.root / "dvc.lock").is_file()
    assert (ws.root / "data/annotate/annotations.parquet").is_file()
    stages = yaml.safe_load((ws.root / "dvc.lock").read_text())["stages"]
    assert {"ingest_batch@b0001", "ingest", "annotate"} <= set(stages)
    assert Workspace.open(ws.root).git("log", "-1", "--format=%s").stdout.startswith("cogalign run ")
