"""One interface for per-item fan-out work: a local process pool by default, Dask when configured.

Stages hand a pure, picklable function and a list of items to :func:`map_items`; results come
back in input order, so outputs do not depend on which worker ran what.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

from cogalign_core.settings import env_name, load_settings

T = TypeVar("T")
R = TypeVar("R")

# Parallelism is an execution setting (cogalign_core.settings): outputs never depend on it, so it is not
# a DVC param and changing it reruns nothing.
DASK_ADDRESS_ENV = env_name("dask_address")
WORKERS_ENV = env_name("workers")


def default_workers(requested: int = 0) -> int:
    """Worker count: the ``workers`` execution setting if positive, else ``requested`` if positive, else usable
    CPU cores."""
    configured = load_settings().workers
    if configured > 0:
        requested = configured
    if requested > 0:
        return requested
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def map_items(fn: Callable[[T], R], items: Sequence[T], workers: int = 0, desc: str | None = None,
              chunksize: int = 4) -> list[R]:
    """Apply ``fn`` to every item, in parallel, returning results in input order.

    Backend: a Dask cluster when the ``dask_address`` setting (``COGALIGN_DASK_ADDRESS``) is set
    (``local`` starts a local cluster of :func:`default_workers` single-threaded worker processes;
    ``tcp://host:8786`` uses a running scheduler), otherwise a process pool of :func:`default_workers`
    processes (serial when 1 worker or few items, to skip pool start-up). A progress bar is shown on
    stderr when ``desc`` is given and stderr is a terminal; items done / total go to the stage's progress
    file when ``COGALIGN_PROGRESS_FILE`` names one.
    """
    n = default_workers(workers)
    address = load_settings().dask_address
    progress = _progress(desc, len(items))
    if address:
        results = _map_dask(fn, items, address, n)
        progress(len(items))
        return results
    if n == 1 or len(items) <= 2:
        out = []
        for i, item in enumerate(items):
            out.append(fn(item))
            progress(i + 1)
        return out
    results: list[R] = []
    with ProcessPoolExecutor(max_workers=n) as pool:
        for i, r in enumerate(pool.map(fn, items, chunksize=chunksize)):
            results.append(r)
            progress(i + 1)
    return results


def _map_dask(fn: Callable[[T], R], items: Sequence[T], address: str, n: int) -> list[R]:
    from dask.distributed import Client, LocalCluster

    if address == "local":
        with LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
                Client(cluster) as client:
            return client.gather(client.map(fn, list(items), pure=False))
    with Client(address) as client:
        return client.gather(client.map(fn, list(items), pure=False))


def _progress(desc: str | None, total: int) -> Callable[[int], None]:
    """Progress of one fan-out: a bar on a terminal stderr, and the stage's progress file when the
    orchestrator asked for one (``cogalign_core.progress``)."""
    import sys

    from cogalign_core.progress import ProgressWriter

    writer = ProgressWriter.from_env("item", desc or "", total)
    if writer.enabled:
        writer.start()
    if not desc or not sys.stderr.isatty() or total == 0:
        return writer.update
    from rich.progress import Progress

    bar = Progress(transient=True)
    task = bar.add_task(desc, total=total)
    bar.start()

    def update(done: int) -> None:
        writer.update(done)
        bar.update(task, completed=done)
        if done >= total:
            bar.stop()

    return update
