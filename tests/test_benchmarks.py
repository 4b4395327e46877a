"""Benchmarks build their own synthetic tables: run the cheap one at small sizes so a table schema
change cannot silently break it (bench_scale once wrote SAMPLES rows without a new column)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO

BENCH_SCALE = str(REPO / "benchmarks" / "bench_scale.py")


def test_bench_scale_merges_and_annotates_every_synthetic_row() -> None:
    child = subprocess.run([sys.executable, BENCH_SCALE, "--child", "3000", "--batches", "3"],
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    one = json.loads(child.stdout.strip().splitlines()[-1])
    assert one["n"] == one["annotated"] == 3000 and 0 < one["clusters"] < 3000  # ~5 % near-duplicates
    table = subprocess.run([sys.executable, BENCH_SCALE, "--sizes", "2000", "4000", "--batches", "2"],
                           capture_output=True, text=True, timeout=300)
    assert table.returncode == 0, table.stderr[-3000:]
    assert "goals at 4000: total" in table.stdout
