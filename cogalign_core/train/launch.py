"""Multi-process training: when a training stage re-executes itself under ``accelerate launch``.

DVC runs one command per stage (``python -m cogalign_core.stage sft``). A training stage, first thing
in that process (:func:`relaunch_if_allocated`; never when a stage function is called in-process),
reads its device allocation — ``COGALIGN_GPU_DEVICES`` (set by the flow's GPU allocator, which may
simulate devices), else ``CUDA_VISIBLE_DEVICES`` (e.g. a cluster scheduler's) — and, given two or
more devices, replaces itself (same pid, same process group, so a killed run still ends it) with::

    python -m accelerate.commands.launch --config_file recipes/accelerate/<config>.yaml \
        --num_processes <devices> --main_process_port <free port> --mixed_precision <recipe> \
        -m cogalign_core.stage <stage>

one process per allocated device, ``CUDA_VISIBLE_DEVICES`` = exactly the allocation, the recipe's
``accelerate_config`` (``ddp`` when it names none) and the recipe's precision. One device or none:
the stage runs in this process, as before. Launched processes (``LOCAL_RANK`` set) never relaunch,
and only process 0 writes the stage's outputs. Without CUDA the processes train on the CPU
(``ACCELERATE_USE_CPU``, gloo backend): how the 2-process DDP path is tested.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Mapping
from pathlib import Path

import yaml

from cogalign_core.arms import ARM_METHODS
from cogalign_core.train.recipe import Recipe, accelerate_config_text, recipes_root

ALLOCATION_ENV = "COGALIGN_GPU_DEVICES"
DEFAULT_ACCELERATE_CONFIG = "ddp"
STAGE_MODULE = "cogalign_core.stage"


def parse_devices(value: str) -> list[str]:
    """Device ids of a ``CUDA_VISIBLE_DEVICES``-style comma list (``-1`` and blanks mean none)."""
    return [d.strip() for d in value.split(",") if d.strip() and d.strip() != "-1"]


def allocated_devices(environ: Mapping[str, str] | None = None) -> list[str] | None:
    """This process's device allocation from the environment, or None when nothing sets one."""
    env = os.environ if environ is None else environ
    for var in (ALLOCATION_ENV, "CUDA_VISIBLE_DEVICES"):
        value = env.get(var)
        if value is not None:
            return parse_devices(value)
    return None


def world_size() -> int:
    """Number of training processes of this run (``WORLD_SIZE`` under a launcher, else 1)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """True in the process that writes outputs: process 0, or the only one."""
    return int(os.environ.get("RANK", "0")) == 0


def accelerate_config_path(name: str) -> Path:
    """``recipes/accelerate/<name>.yaml`` of the installed package."""
    accelerate_config_text(name)  # a clear error for an unknown name
    return Path(str(recipes_root() / "accelerate" / f"{name}.yaml"))


def _free_port() -> int:
    # Two multi-device stages may run at once: each needs its own rendezvous port.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def accelerate_launch_command(config_file: str | os.PathLike[str], devices: str, module: str, *args: str,
                              mixed_precision: str | None = None, port: int | None = None) -> list[str]:
    """``accelerate launch`` argv for ``python -m module args`` on the allocated ``devices``.

    One process per device id in ``devices`` (a ``CUDA_VISIBLE_DEVICES`` value); the config file's
    own ``num_processes`` is overridden, so one recipe config serves any allocation size.
    """
    count = len(parse_devices(devices))
    if count == 0:
        raise ValueError("accelerate launch needs at least one allocated GPU (devices is empty)")
    options = ["--config_file", str(config_file), "--num_processes", str(count)]
    if mixed_precision is not None:
        options += ["--mixed_precision", mixed_precision]
    if port is not None:
        options += ["--main_process_port", str(port)]
    return [sys.executable, "-m", "accelerate.commands.launch", *options, "-m", module, *args]


def check_final_save_supported(config_name: str) -> None:
    """Refuse configs that shard parameters (FSDP, ZeRO-3): the stages save the final model from
    process 0's own copy, which holds every weight under DDP and ZeRO-2 only."""
    config = yaml.safe_load(accelerate_config_text(config_name)) or {}
    kind = config.get("distributed_type")
    stage3 = (config.get("deepspeed_config") or {}).get("zero_stage") == 3
    if kind == "FSDP" or (kind == "DEEPSPEED" and stage3):
        raise ValueError(f"accelerate config {config_name!r} shards the parameters ({kind}"
                         f"{', ZeRO-3' if stage3 else ''}); the training stages save the final model from "
                         "process 0's full copy, so use ddp or zero2 (recipes/accelerate/)")


def relaunch_command(stage: str, recipe: Recipe, environ: Mapping[str, str] | None = None) -> list[str] | None:
    """The ``accelerate launch`` argv for a training stage given 2+ devices, or None (run in this process)."""
    env = os.environ if environ is None else environ
    if stage not in ARM_METHODS or "LOCAL_RANK" in env:
        return None
    devices = allocated_devices(env) or []
    if len(devices) < 2:
        return None
    config = recipe.accelerate_config or DEFAULT_ACCELERATE_CONFIG
    check_final_save_supported(config)
    return accelerate_launch_command(accelerate_config_path(config), ",".join(devices), STAGE_MODULE, stage,
                                     mixed_precision="bf16" if recipe.train.bf16 else "no", port=_free_port())


def started_as_stage_command() -> bool:
    """True in a process started as ``python -m cogalign_core.stage`` (what DVC runs), not in a caller
    that runs a stage function in-process (tests, ``cogalign_core.sample_workspace``)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec is not None and spec.name == STAGE_MODULE


def relaunch_if_allocated(stage: str, recipe: Recipe) -> None:
    """Replace this stage command with ``accelerate launch`` when :func:`relaunch_command` says so; else return.

    Called first thing by the training stages, so DVC's one command becomes one process per device.
    """
    argv = relaunch_command(stage, recipe) if started_as_stage_command() else None
    if argv is None:
        return
    devices = ",".join(allocated_devices() or [])
    print(f"{stage}: {len(parse_devices(devices))} processes on devices {devices}: {' '.join(argv[1:])}",
          file=sys.stderr, flush=True)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": devices}
    import torch  # lazily: the flow process imports this module (tasks/gpu.py) and must not load torch

    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "true"  # the processes train on the CPU with gloo (Trainer reads this)
    os.execve(sys.executable, argv, env)
