"""Live progress of a run's stages on the operator's screen (no Prefect import).

Stage tasks read each running stage's progress file (``cogalign_core.progress``) and report to the
process-wide :data:`BOARD`; ``cogalign run`` attaches a display to it: a rich live panel with one bar
per running stage on a terminal, or plain lines every ``COGALIGN_PROGRESS_INTERVAL`` seconds (default
10) when the output is a pipe or a CI log. The tasks send the same plain lines to the Prefect logs.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Protocol

from cogalign_core.progress import ProgressRecord, format_progress, format_seconds, read_progress

INTERVAL_ENV = "COGALIGN_PROGRESS_INTERVAL"


def progress_interval() -> float:
    """Seconds between plain progress lines (and Prefect log lines) of one stage."""
    value = os.environ.get(INTERVAL_ENV, "").strip()
    try:
        return max(0.1, float(value)) if value else 10.0
    except ValueError:
        raise ValueError(f"{INTERVAL_ENV} must be a number of seconds, got {value!r}") from None


def stage_line(stage: str, record: ProgressRecord) -> str:
    """``sft: 120/300 steps (40%)  loss 1.234  ETA 1m05s``."""
    return f"{stage}: {format_progress(record, stage)}"


class Display(Protocol):
    def started(self, stage: str, devices: str) -> None: ...
    def progress(self, stage: str, record: ProgressRecord) -> None: ...
    def finished(self, stage: str, status: str, seconds: float) -> None: ...


class ProgressBoard:
    """Fans stage events out to the attached displays (none: events are dropped). Thread-safe."""

    def __init__(self) -> None:
        self._displays: list[Display] = []
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def attached(self, display: Display) -> Iterator[Display]:
        with self._lock:
            self._displays.append(display)
        try:
            yield display
        finally:
            with self._lock:
                self._displays.remove(display)

    def _each(self) -> list[Display]:
        with self._lock:
            return list(self._displays)

    def started(self, stage: str, devices: str) -> None:
        for d in self._each():
            d.started(stage, devices)

    def progress(self, stage: str, record: ProgressRecord) -> None:
        for d in self._each():
            d.progress(stage, record)

    def finished(self, stage: str, status: str, seconds: float) -> None:
        for d in self._each():
            d.finished(stage, status, seconds)


BOARD = ProgressBoard()


class StageProgressFeed:
    """Polls one stage's progress file; reports changes to the board and, every ``interval`` seconds,
    one plain line to ``log`` (the Prefect task logger)."""

    def __init__(self, stage: str, path: Path, log: object = None, interval: float | None = None,
                 board: ProgressBoard = BOARD) -> None:
        self.stage, self.path, self.log, self.board = stage, path, log, board
        self.interval = progress_interval() if interval is None else interval
        self._last: ProgressRecord | None = None
        self._logged_at = time.monotonic()

    def poll(self) -> None:
        record = read_progress(self.path)
        if record is None or record == self._last:
            return
        self._last = record
        self.board.progress(self.stage, record)
        if callable(self.log) and time.monotonic() - self._logged_at >= self.interval:
            self._logged_at = time.monotonic()
            self.log(stage_line(self.stage, record))

    def final(self) -> None:
        """Read the file once more and log the last line (the stage's final count)."""
        self.poll()
        if callable(self.log) and self._last is not None:
            self.log(stage_line(self.stage, self._last))


class PlainDisplay:
    """Plain lines for pipes and CI logs: start and end of each stage immediately, progress of each
    running stage at most every ``interval`` seconds, and a stage's last count before its end line."""

    def __init__(self, stream: IO[str], interval: float | None = None) -> None:
        self.stream = stream
        self.interval = progress_interval() if interval is None else interval
        self._printed: dict[str, float] = {}
        self._unprinted: dict[str, ProgressRecord] = {}
        self._lock = threading.Lock()

    def _print(self, line: str) -> None:
        with self._lock:
            self.stream.write(f"{time.strftime('%H:%M:%S')} {line}\n")
            self.stream.flush()

    def started(self, stage: str, devices: str) -> None:
        self._printed[stage] = time.monotonic()
        self._print(f"{stage}: started on {devices}")

    def progress(self, stage: str, record: ProgressRecord) -> None:
        now = time.monotonic()
        if now - self._printed.get(stage, 0.0) >= self.interval:
            self._printed[stage] = now
            self._unprinted.pop(stage, None)
            self._print(stage_line(stage, record))
        else:
            self._unprinted[stage] = record

    def finished(self, stage: str, status: str, seconds: float) -> None:
        self._printed.pop(stage, None)
        last = self._unprinted.pop(stage, None)
        if last is not None:
            self._print(stage_line(stage, last))
        self._print(f"{stage}: {status} in {format_seconds(seconds)}")


class RichDisplay:
    """A live panel on a terminal: one bar per running stage (count, metrics, ETA); a line per finished stage."""

    def __init__(self, console: object) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bars = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[unit]}"), TextColumn("{task.fields[detail]}"),
                                 TimeElapsedColumn(), console=console, transient=True)  # type: ignore[arg-type]
        self._tasks: dict[str, object] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> RichDisplay:
        self.bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bars.stop()

    def started(self, stage: str, devices: str) -> None:
        with self._lock:
            if stage not in self._tasks:
                self._tasks[stage] = self.bars.add_task(stage, total=None, unit="", detail=f"on {devices}")

    def progress(self, stage: str, record: ProgressRecord) -> None:
        with self._lock:
            task = self._tasks.get(stage)
            if task is None:
                return
            detail = "  ".join([*(f"{k} {v:.4g}" for k, v in sorted(record.metrics.items()))]
                               + ([f"ETA {format_seconds(eta)}"] if (eta := record.eta_seconds()) is not None
                                  else []))
            phase = f" ({record.desc})" if record.desc and record.desc != stage else ""
            self.bars.update(task, total=record.total, completed=record.done,  # type: ignore[arg-type]
                                 description=stage + phase, unit=record.unit + "s", detail=detail)

    def finished(self, stage: str, status: str, seconds: float) -> None:
        with self._lock:
            task = self._tasks.pop(stage, None)
            if task is not None:
                self.bars.remove_task(task)  # type: ignore[arg-type]
        mark = {"ran": "[green]✓[/]", "up to date": "[dim]=[/]", "failed": "[red]✗[/]"}.get(status, "-")
        self.bars.console.print(f"{mark} {stage}: {status} in {format_seconds(seconds)}")
