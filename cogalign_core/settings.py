"""Execution settings: how a machine runs the stages, never what they compute.

Parallelism, batch sizes, devices and threads change speed and memory, not outputs, so they are not
DVC params: changing them reruns nothing. They come, highest first, from ``COGALIGN_<NAME>``
environment variables, the workspace's untracked ``.cogalign/settings.yaml`` (git-ignored, outside
DVC), then the defaults below. Stage processes find the workspace through ``COGALIGN_WORKSPACE``
(set by ``cogalign run``) or their working directory (DVC runs them in the workspace).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, YamlConfigSettingsSource

from cogalign_core import contract

ENV_PREFIX = "COGALIGN_"
WORKSPACE_ENV = "COGALIGN_WORKSPACE"


class ExecutionSettings(BaseSettings):
    """Per-machine execution settings (environment ``COGALIGN_<NAME>`` or ``.cogalign/settings.yaml``)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")
    workers: int = Field(
        0, ge=0, description="Worker processes for per-image work (ingest decoding, masks, counterfactuals); "
        "0 = one per usable CPU core.")
    dask_address: str | None = Field(
        None, description="Run per-image work on a Dask cluster: `tcp://scheduler:8786`, or `local` for a local "
        "cluster of `workers` processes. Unset: a local process pool.")
    torch_threads: int = Field(
        1, ge=0, description="CPU threads torch may use in a training or evaluation stage (restored afterwards); "
        "0 = torch's default. Small models run fastest single-threaded, and on a shared CPU extra threads mostly "
        "spin-wait. Ignored on a GPU.")
    sam_device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Torch device for the SAM segmenter; `auto` picks cuda when available.")
    sam_batch_size: int = Field(
        8, ge=1, description="Images encoded together in one forward pass of the SAM image encoder.")
    cpu_stage_slots: int = Field(
        0, ge=0, description="Stages `cogalign run` runs at once on the CPU (GPU stages wait for free devices "
        "instead); 0 = one per usable CPU core. Training stages use `torch_threads` each and data stages fan out "
        "over `workers`, so one stage per core keeps the cores busy without thrashing.")
    generate_batch_size: int = Field(32, ge=1, description="Evaluation prompts per generate() call.")
    drop_warning_fraction: float = Field(
        0.75, ge=0, le=1, description="`cogalign run` warns when a stage drops more than this share of its input "
        "(and fails with --strict). The counterfactual stage drops about half of the bundled sample's lesions by "
        "design (on the border, too large, no room for a control), so the default sits above that.")

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        file = _settings_file(init_settings.init_kwargs.pop("_workspace", None))  # type: ignore[attr-defined]
        return init_settings, env_settings, YamlConfigSettingsSource(settings_cls, yaml_file=file)


def env_name(field: str) -> str:
    """The environment variable of a setting (``workers`` -> ``COGALIGN_WORKERS``)."""
    return ENV_PREFIX + field.upper()


def _settings_file(workspace: str | os.PathLike[str] | None) -> Path:
    root = workspace or os.environ.get(WORKSPACE_ENV) or Path.cwd()
    return Path(root) / contract.SETTINGS


def load_settings(workspace: str | os.PathLike[str] | None = None) -> ExecutionSettings:
    """The execution settings for ``workspace`` (default: ``$COGALIGN_WORKSPACE``, else the working directory).

    Raises:
        ValueError: a setting is invalid; the message names its environment variable and the file.
    """
    try:
        return ExecutionSettings(_workspace=workspace)  # type: ignore[call-arg]
    except ValidationError as exc:
        where = ", ".join(sorted({env_name(str(e["loc"][0])) for e in exc.errors() if e["loc"]}))
        raise ValueError(f"invalid execution settings ({where} in the environment or "
                         f"{_settings_file(workspace)}): {exc}") from None
