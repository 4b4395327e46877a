"""GPU slot allocation for stage processes.

Slots equal the GPUs this process may use (``CUDA_VISIBLE_DEVICES`` if set, else the devices
``nvidia-smi -L`` lists); a stage asking for N GPUs waits for N free slots and its child process
sees only those (``CUDA_VISIBLE_DEVICES`` in the child's environment alone). With no GPU every
stage runs on the CPU (an empty ``CUDA_VISIBLE_DEVICES``).

Stages declare their GPU count in ``dvc.yaml`` (``meta: {gpus: N}``). A multi-GPU training stage
runs its command through ``accelerate launch`` with the recipe's config (``recipes/accelerate/``:
ddp or zero2; fsdp and zero3 are refused until the final save gathers sharded weights) and one
process per allocated GPU, e.g. for ``gpus: 4``::

    accelerate launch --config_file recipes/accelerate/zero2.yaml --num_processes 4 \
        -m cogalign_core.stage sft

(:func:`accelerate_launch_command` builds that line). The stage process itself makes that call
(:mod:`cogalign_core.train.launch`), so DVC still runs one command per stage: this allocator only
decides which devices it gets, through ``CUDA_VISIBLE_DEVICES`` and ``COGALIGN_GPU_DEVICES``. On a
cluster, such a stage runs as its own deployment on a GPU work pool (see the workspace's ``prefect.yaml``).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import threading
from collections.abc import Iterator

from cogalign_core.train.launch import ALLOCATION_ENV, accelerate_launch_command, allocated_devices

SIMULATED_ENV = ALLOCATION_ENV
__all__ = ["SIMULATED_ENV", "GpuAllocator", "accelerate_launch_command", "visible_gpus"]


def visible_gpus() -> list[str]:
    """Device ids available to this process, without importing torch.

    ``COGALIGN_GPU_DEVICES`` (comma list) overrides discovery, for tests and pinned hosts.
    """
    allocated = allocated_devices()
    if allocated is not None:
        return allocated
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
