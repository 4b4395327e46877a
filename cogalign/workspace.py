"""Pipeline workspaces: a git + DVC repository holding one pipeline's data, params and history.

``init`` scaffolds one; ``register`` adds a raw batch; fingerprints, git commits and DVC calls used
by ``cogalign run`` live here too. DVC and git run as child processes of the current interpreter's
environment, so the stage commands (``python -m cogalign_core.stage``) resolve to this install.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from cogalign_core import contract, raw_batch, review
from cogalign_core.annotate import CLINICIAN_CSV_HEADER
from cogalign_core.config import PARAMS_FILE, PipelineParams, dump_params, load_params
from cogalign_core.io import atomic_write_text
from cogalign_core.stage import STAGES, fingerprint_text

TEMPLATE_FILES = ("dvc.yaml", "prefect.yaml")
STATE_DIR = Path(contract.STATE)
RUNS_DIR = STATE_DIR / "runs"
REMOTE_DIR = Path(".dvcstore")
GITIGNORE = """\
# cogalign run state (run ids, Prefect home, locks) and execution settings: kept outside versioned outputs
/.cogalign/
# local DVC remote of the demo
/.dvcstore/
"""


class WorkspaceError(RuntimeError):
    """A workspace operation that cannot proceed, with a message meant for the operator."""


@dataclass(frozen=True)
class Workspace:
    """A pipeline workspace directory."""

    root: Path

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Workspace:
        root = Path(path).resolve()
        if not (root / "dvc.yaml").exists() or not (root / ".dvc").is_dir():
            raise WorkspaceError(f"{root} is not a cogalign workspace (no dvc.yaml/.dvc): run `cogalign init {path}`")
        return cls(root)

    @classmethod
    def find(cls, path: str | os.PathLike[str]) -> Workspace:
        """The workspace holding ``path``: the nearest folder at or above it with dvc.yaml and .dvc/."""
        start = Path(path).resolve()
        for candidate in (start, *start.parents):
            if (candidate / "dvc.yaml").exists() and (candidate / ".dvc").is_dir():
                return cls(candidate)
        raise WorkspaceError(f"{path} is not inside a cogalign workspace (no dvc.yaml/.dvc above it): "
                             "pass --workspace")

    @property
    def params(self) -> PipelineParams:
        return load_params(self.root)

    def write_params(self, params: PipelineParams) -> None:
        atomic_write_text(self.root / PARAMS_FILE, dump_params(params))

    # ------------------------------------------------------------------ child processes
    def env(self) -> dict[str, str]:
        """Environment for DVC/stage children: this interpreter's bin dir first on PATH."""
        env = dict(os.environ)
        bindir = str(Path(sys.executable).parent)
        env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("DVC_NO_ANALYTICS", "1")
        env["COGALIGN_WORKSPACE"] = str(self.root)
        return env

    def git(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run(["git", *args], self.root, self.env(), check)

    def dvc(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run([sys.executable, "-m", "dvc", *args], self.root, self.env(), check)

    # ------------------------------------------------------------------ fingerprints
    def update_fingerprints(self) -> list[str]:
        """Rewrite ``code/<stage>.json`` where the installed code differs; return changed stages."""
        changed = []
        recipe = self.params.model.recipe
        for stage in STAGES:
            path = self.root / contract.fingerprint(stage)
            text = fingerprint_text(stage, recipe)
            if not path.exists() or path.read_text() != text:
                atomic_write_text(path, text)
                changed.append(stage)
        return changed

    # ------------------------------------------------------------------ git
    def commit(self, message: str, paths: list[str] | None = None) -> str | None:
        """Commit ``paths`` (default: pipeline metadata) if anything changed; return the new revision."""
        default = ["dvc.yaml", "dvc.lock", PARAMS_FILE, "prefect.yaml", contract.CODE,
                   Path(contract.CLINICIAN_LABELS).parent.as_posix(), ".gitignore", contract.DATA, ".dvc/config",
                   ".dvcignore"]
        existing = [p for p in (paths or default) if (self.root / p).exists()]
        self.git("add", "--", *existing)
        if self.git("diff", "--cached", "--quiet", check=False).returncode == 0:
            return None
        self.git("commit", "-q", "-m", message)
        return self.git("rev-parse", "HEAD").stdout.strip()

    def lock_stages(self) -> dict[str, Any]:
        """``dvc.lock``'s stage entries (empty before the first run)."""
        path = self.root / "dvc.lock"
        return (yaml.safe_load(path.read_text()) or {}).get("stages") or {} if path.exists() else {}

    def revision(self) -> str | None:
        out = self.git("rev-parse", "HEAD", check=False)
        return out.stdout.strip() if out.returncode == 0 else None


def _run(cmd: list[str], cwd: Path, env: dict[str, str], check: bool) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise WorkspaceError(f"`{' '.join(cmd[-3:] if cmd[0] == sys.executable else cmd)}` failed in {cwd} "
                             f"(exit {proc.returncode}):\n{proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def template_text(name: str) -> str:
    """Text of a packaged workspace template (dvc.yaml, prefect.yaml)."""
    return resources.files("cogalign").joinpath("templates", name).read_text()


def sample_data_path() -> Path:
    """Directory of the bundled real sample (works for editable and regular installs)."""
    return Path(str(resources.files("cogalign_core.sample_data")))


def init_workspace(path: str | os.PathLike[str], sample: bool = False, salt: str | None = None,
                   remote: str | None = None, recipe: str | None = None) -> Workspace:
    """Scaffold a workspace: git, DVC (analytics off, link-type cache, local remote), templates, params.

    Args:
        path: new or empty directory.
        sample: register the bundled sample as the first raw batch.
        salt: pseudonymisation key (default: 32 random bytes, hex).
        remote: DVC remote URL/path (default: ``<path>/.dvcstore``).
        recipe: recipe family for ``model.recipe`` (default: the params default, lite0-small).
    """
    root = Path(path).resolve()
    if root.exists() and any(root.iterdir()):
        raise WorkspaceError(f"{root} exists and is not empty: choose a new directory")
    root.mkdir(parents=True, exist_ok=True)
    ws = Workspace(root)
    try:
        ws.git("init", "-q", "-b", "main")
        # Local identity so commits work on fresh machines without a global git config.
        if ws.git("config", "user.email", check=False).returncode != 0:
            ws.git("config", "user.email", "cogalign@localhost")
            ws.git("config", "user.name", "cogalign")
        ws.dvc("init", "-q")
        ws.dvc("config", "core.analytics", "false")
        # Link from the cache instead of copying, so images are not stored twice.
        ws.dvc("config", "cache.type", "reflink,hardlink,copy")
        remote_url = remote or str(root / REMOTE_DIR)
        ws.dvc("remote", "add", "-d", "local", remote_url)
        for name in TEMPLATE_FILES:
            atomic_write_text(root / name, template_text(name))
        params = PipelineParams()
        params.privacy.salt = salt or secrets.token_hex(32)
        if recipe is not None:
            from cogalign_core.train.recipe import families

            if recipe not in families():
                raise WorkspaceError(f"unknown recipe {recipe!r}; recipes: {', '.join(families())}")
            params.model.recipe = recipe
        ws.write_params(params)
        atomic_write_text(root / contract.CLINICIAN_LABELS, CLINICIAN_CSV_HEADER)
        review.ensure_prompts_file(root)  # clinician prompts: empty until the first review import
        atomic_write_text(root / ".gitignore", GITIGNORE)
        (root / RUNS_DIR).mkdir(parents=True, exist_ok=True)
        ws.update_fingerprints()
        ws.commit("cogalign init: workspace scaffold")
        if sample:
            register(ws, sample_data_path(), layout="auto", role="train", message="register bundled sample")
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return ws


def register(ws: Workspace, source: str | os.PathLike[str], layout: str = "auto", role: str = "train",
             dataset: str | None = None, message: str | None = None,
             labels: dict[str, str | None] | None = None) -> str:
    """Add ``source`` as a new raw batch: copy, ``dvc add`` (never pushed), append to params, commit."""
    src = Path(source).resolve()
    if not src.is_dir():
        raise WorkspaceError(f"{source} is not a directory")
    if role not in ("train", "test"):
        raise WorkspaceError(f"--role must be train or test, not {role!r}")
    raw_root = ws.root / contract.RAW
    batch_id = raw_batch.next_batch_id(raw_root)
    try:
        raw_batch.register_batch(src, raw_root, batch_id, layout=layout, role=role, dataset=dataset, labels=labels)
    except ValueError as exc:
        shutil.rmtree(raw_root / batch_id, ignore_errors=True)
        raise WorkspaceError(str(exc)) from exc
    rel = contract.raw_batch(batch_id)
    params = ws.params
    track_raw_batch(ws, batch_id, params.privacy.push_raw)
    params.batches.append(batch_id)
    ws.write_params(params)
    ws.commit(message or f"register raw batch {batch_id} ({role})",
              [f"{rel}.dvc", f"{contract.RAW}/.gitignore", PARAMS_FILE])
    return batch_id


def track_raw_batch(ws: Workspace, batch_id: str, push_allowed: bool) -> None:
    """``dvc add`` a raw batch, relinked from the cache, with its push flag set (patient-data zone)."""
    rel = contract.raw_batch(batch_id)
    ws.dvc("add", "-q", rel)
    # `dvc add` leaves a copy in place; relink so the batch is stored once (cache.type links).
    ws.dvc("checkout", "-q", "--relink", f"{rel}.dvc")
    set_raw_push(ws.root / f"{rel}.dvc", push_allowed)


def set_raw_push(dvc_file: Path, allowed: bool) -> bool:
    """data/raw is the patient-data zone: its outputs carry ``push: false`` unless ``privacy.push_raw``.

    Returns True when the file changed.
    """
    doc = yaml.safe_load(dvc_file.read_text())
    changed = False
    for out in doc.get("outs", []):
        if allowed and "push" in out:
            del out["push"]
            changed = True
        elif not allowed and out.get("push") is not False:
            out["push"] = False
            changed = True
    if changed:
        atomic_write_text(dvc_file, yaml.safe_dump(doc, sort_keys=False))
    return changed


def push(ws: Workspace) -> str:
    """``dvc push`` the workspace's outputs; raw batches only when ``privacy.push_raw`` allows it."""
    allowed = ws.params.privacy.push_raw
    changed = [str(f.relative_to(ws.root)) for f in sorted((ws.root / contract.RAW).glob("*.dvc"))
               if set_raw_push(f, allowed)]
    if changed:
        ws.commit(f"raw zone push {'allowed' if allowed else 'disabled'} (privacy.push_raw)", changed)
    return ws.dvc("push").stdout.strip()
