"""GPU slot allocation for stage processes.

Slots equal the GPUs this process may use (``CUDA_VISIBLE_DEVICES`` if set, else the devices
``nvidia-smi -L`` lists); a stage asking for N GPUs waits for N free slots and its child process
sees only those (``CUDA_VISIBLE_DEVICES`` in the child's environment alone). With no GPU every
stage runs on the CPU (an empty ``CUDA_VISIBLE_DEVICES``).

Stages declare their GPU count in ``dvc.yaml`` (``meta: {gpus: N}``). A multi-GPU training stage
runs its command through ``accelerate launch`` with the recipe's config (``recipes/accelerate/``:
ddp, fsdp, zero2, zero3) and one process per allocated GPU, e.g. for ``gpus: 4``::

    accelerate launch --config_file recipes/accelerate/fsdp.yaml --num_processes 4 \
        -m cogalign_core.stage sft

(:func:`accelerate_launch_command` builds that line). On a cluster, such a stage runs as its own
deployment on a GPU work pool (see the workspace's ``prefect.yaml``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator

SIMULATED_ENV = "COGALIGN_GPU_DEVICES"


def visible_gpus() -> list[str]:
    """Device ids available to this process, without importing torch.

    ``COGALIGN_GPU_DEVICES`` (comma list) overrides discovery, for tests and pinned hosts.
    """
    for var in (SIMULATED_ENV, "CUDA_VISIBLE_DEVICES"):
        value = os.environ.get(var)
        if value is not None:
            return [d.strip() for d in value.split(",") if d.strip() and d.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(out.stdout.splitlines()) if line.startswith("GPU ")]


class GpuAllocator:
    """Hands out disjoint sets of GPU ids; thread-safe, blocking until enough are free."""

    def __init__(self, devices: list[str] | None = None) -> None:
        self.devices = list(visible_gpus() if devices is None else devices)
        self._free = list(self.devices)
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def acquire(self, count: int) -> Iterator[str]:
        """Yield the ``CUDA_VISIBLE_DEVICES`` value for a stage needing ``count`` GPUs.

        Requests above the machine's GPU count get all of them; with no GPUs, ``""`` (CPU).
        """
        want = min(count, len(self.devices))
        if want <= 0:
            yield ""
            return
        with self._cond:
            self._cond.wait_for(lambda: len(self._free) >= want)
            taken, self._free = self._free[:want], self._free[want:]
        try:
            yield ",".join(taken)
        finally:
            with self._cond:
                self._free.extend(taken)
                self._free.sort(key=self.devices.index)
                self._cond.notify_all()


def accelerate_launch_command(config_file: str, devices: str, module: str, *args: str) -> list[str]:
    """``accelerate launch`` argv for ``python -m module args`` on the allocated ``devices``.

    One process per device id in ``devices`` (a ``CUDA_VISIBLE_DEVICES`` value); the config file's
    own ``num_processes`` is overridden, so one recipe config serves any allocation size.
    """
    count = len([d for d in devices.split(",") if d.strip()])
    if count == 0:
        raise ValueError("accelerate launch needs at least one allocated GPU (devices is empty)")
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config_file,
            "--num_processes", str(count), "-m", module, *args]
