"""The Prefect API a run talks to: a configured server, or one local server per process that dies with it.

With ``PREFECT_API_URL`` set (a long-running server, ``cogalign serve``, the test harness) that
server is used and nothing is started. Otherwise the first run in a process starts a local server
(SQLite under the workspace's ``.cogalign/prefect``, no UI, no background services) and every later
run in the same process reuses it. The server runs under a supervisor (``cogalign.processes``):
it leads its own process group, is killed with the process that started it, even by SIGKILL, and
is recorded in the workspace's group records so the next run ends one that somehow outlived a
killed run. It is started without waiting (:func:`start_local_server`) so that its start-up, the
longest fixed cost of a run, overlaps the run's own checks; :func:`prefect_api` waits for it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from cogalign.processes import end_group, forget_group, record_group

ROLE = "prefect-server"
STARTUP_TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"


def configured_api_url() -> str | None:
    """The API URL set by the environment or, once Prefect is imported, by its settings (e.g. a harness)."""
    url = os.environ.get("PREFECT_API_URL")
    if url and url not in _OWN_URLS:
        return url
    if "prefect.settings" in sys.modules:
        from prefect.settings import PREFECT_API_URL

        value = PREFECT_API_URL.value()
        if value and value not in _OWN_URLS:
            return str(value)
    return None


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LocalServer:
    """A supervised ``uvicorn prefect.server.api.server:create_app`` on a free loopback port."""

    def __init__(self, workspace: Path, home: Path) -> None:
        self.workspace, self.home = workspace, home
        self.port = _free_port()
        self.proc = self._spawn()

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def _spawn(self) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        env.pop("PREFECT_API_URL", None)
        env.update({"PREFECT_HOME": str(self.home), "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                    "PREFECT__SERVER_FINAL": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                    "PREFECT_SERVER_LOGGING_LEVEL": env.get("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")})
        cmd = [sys.executable, "-m", "cogalign.processes", "--grace", "5", "--", sys.executable, "-m", "uvicorn",
               "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
               "--log-level", "error", "--lifespan", "on"]
        # cwd: the workspace, so a later run can tell this group's members from a recycled group id.
        proc = subprocess.Popen(cmd, cwd=self.workspace, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        record_group(self.workspace, proc.pid, ROLE)
        return proc

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self, timeout: float | None = None) -> str:
        """Block until the API answers; return its URL. A lost port race restarts on another port."""
        timeout = timeout or float(os.environ.get(STARTUP_TIMEOUT_ENV) or 180)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():  # e.g. the port was taken between choosing and binding it
                forget_group(self.workspace, self.proc.pid)
                self.port = _free_port()
                self.proc = self._spawn()
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                    if response.status == 200:
                        return self.api_url
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the local Prefect server did not answer within {timeout:.0f}s "
                           f"(set PREFECT_API_URL to use a running server, or raise {STARTUP_TIMEOUT_ENV})")

    def stop(self) -> None:
        """Stop the server (it gets ``--grace`` seconds to close its database) and forget its record."""
        end_group(self.proc, grace=6.0)
        forget_group(self.workspace, self.proc.pid)


_SERVER: LocalServer | None = None
_OWN_URLS: set[str] = set()  # URLs of servers this process started (not "configured")
_LOCK = threading.Lock()


def start_local_server(workspace: Path, home: Path) -> LocalServer | None:
    """Start (or find) this process's local server without waiting for it; None when one is configured.

    Call from a thread that lives as long as the server should (the main thread): the parent-death
    signal follows the thread that started the supervisor.
    """
    global _SERVER
    if configured_api_url():
        return None
    with _LOCK:
        if _SERVER is None or not _SERVER.alive():
            _SERVER = LocalServer(workspace, home)
            atexit.register(_stop_at_exit, _SERVER)
        return _SERVER


def _stop_at_exit(server: LocalServer) -> None:
    global _SERVER
    server.stop()
    if _SERVER is server:
        _SERVER = None


@contextlib.contextmanager
def prefect_api(workspace: Path, home: Path) -> Iterator[str]:
    """The API URL to run flows against, active for Prefect inside the block.

    A configured server is used as is; otherwise this process's local server (started here if
    :func:`start_local_server` was not called yet), waited for until it answers.
    """
    configured = configured_api_url()
    if configured:
        yield configured
        return
    server = start_local_server(workspace, home)
    assert server is not None
    url = server.wait_ready()
    _OWN_URLS.add(url)
    os.environ["PREFECT_API_URL"] = url  # Prefect reads it when imported; children inherit it
    if "prefect.settings" not in sys.modules:
        yield url
        return
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield url
