"""GPU pinning with a simulated device list (COGALIGN_GPU_DEVICES): N GPUs, disjoint allocations,
concurrent acquisition from threads, and real stage processes that see only their own devices.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from cogalign.dag import pipeline_stages
from cogalign.tasks.dvc_stage import run_stage_process
from cogalign.tasks.gpu import SIMULATED_ENV, GpuAllocator, accelerate_launch_command, visible_gpus


def test_simulated_device_list_is_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SIMULATED_ENV, "0,1,2,3")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")  # the simulated list wins
    assert visible_gpus() == ["0", "1", "2", "3"]
    monkeypatch.setenv(SIMULATED_ENV, "")
    assert visible_gpus() == []
    monkeypatch.delenv(SIMULATED_ENV)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert visible_gpus() == []


def _whole_machine(alloc: GpuAllocator) -> str | None:
    """What a request for every device gets within 10 s (None: some device was never given back)."""
    got: list[str] = []

    def take() -> None:
        with alloc.acquire(len(alloc.devices)) as devices:
            got.append(devices)

    t = threading.Thread(target=take, daemon=True)
    t.start()
    t.join(timeout=10)
    return got[0] if got else None


def test_allocations_are_disjoint_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SIMULATED_ENV, "0,1,2,3")
    alloc = GpuAllocator()
    with alloc.acquire(2) as a, alloc.acquire(1) as b, alloc.acquire(0) as cpu:
        assert (a, b, cpu) == ("0,1", "2", "")
    with alloc.acquire(9) as everything:  # more than the machine has: all of it, not a deadlock
        assert everything == "0,1,2,3"
    with GpuAllocator(devices=[]).acquire(2) as none:
        assert none == ""
    assert _whole_machine(alloc) == "0,1,2,3"  # all returned, in device order


def test_concurrent_acquisition_from_threads_never_shares_a_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SIMULATED_ENV, "0,1,2,3")
    alloc = GpuAllocator()
    in_use: set[str] = set()
    guard = threading.Lock()
    errors: list[str] = []
    peak = [0]
    granted: list[tuple[int, str]] = []

    def worker(i: int) -> None:
        want = (1, 2, 3, 4)[i % 4]
        with alloc.acquire(want) as devices:
            ids = devices.split(",")
            with guard:
                if len(ids) != want or in_use & set(ids):
                    errors.append(f"thread {i} got {devices} while {sorted(in_use)} in use")
                in_use.update(ids)
                peak[0] = max(peak[0], len(in_use))
                granted.append((want, devices))
            time.sleep(0.01)
            with guard:
                in_use.difference_update(ids)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "allocator deadlocked"
    assert errors == []
    assert len(granted) == 24 and peak[0] <= 4
    assert _whole_machine(alloc) == "0,1,2,3"


STAGE_DVC_YAML = {
    "stages": {
        "train": {
            "cmd": f"{sys.executable} -c \"import os; open('devices.txt', 'w').write("
                   f"os.environ['CUDA_VISIBLE_DEVICES'] + '|' + os.environ['{SIMULATED_ENV}'])\"",
            "outs": ["devices.txt"],
            "meta": {"gpus": 2},
        }
    }
}


def _mini_repo(root: Path) -> Path:
    root.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    (root / "dvc.yaml").write_text(yaml.safe_dump(STAGE_DVC_YAML))
    return root


def test_each_stage_process_sees_only_its_devices(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Two 2-GPU stages at once on a simulated 4-GPU machine: each child sees its own pair only."""
    monkeypatch.setenv(SIMULATED_ENV, "0,1,2,3")
    repos = [_mini_repo(tmp_path / f"ws{i}") for i in range(2)]
    (node,) = pipeline_stages(repos[0])
    assert node.gpus == 2  # read from dvc.yaml meta, as the flow does
    alloc = GpuAllocator()
    both_hold = threading.Barrier(2, timeout=30)
    failures: list[BaseException] = []

    def run(repo: Path) -> None:
        try:
            with alloc.acquire(node.gpus) as devices:
                both_hold.wait()  # both allocations are live at the same time
                env = dict(os.environ, DVC_NO_ANALYTICS="1")
                run_stage_process(repo, "train", devices, repo / "train.log", env)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(r,)) for r in repos]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not failures, failures
    seen = [(r / "devices.txt").read_text().split("|") for r in repos]
    cuda = [set(s[0].split(",")) for s in seen]
    assert all(len(c) == 2 for c in cuda) and not (cuda[0] & cuda[1])
    assert cuda[0] | cuda[1] == {"0", "1", "2", "3"}
    assert all(s[0] == s[1] for s in seen)  # the child's own allocator would see the same pair


def test_accelerate_launch_uses_one_process_per_allocated_gpu() -> None:
    from accelerate.commands.launch import launch_command_parser

    argv = accelerate_launch_command("recipes/accelerate/fsdp.yaml", "2,3", "cogalign_core.stage", "sft")
    assert argv[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    args = launch_command_parser().parse_args(argv[3:])
    assert args.num_processes == 2 and args.config_file == "recipes/accelerate/fsdp.yaml"
    assert args.module and args.training_script == "cogalign_core.stage" and args.training_script_args == ["sft"]
    with pytest.raises(ValueError, match="at least one"):
        accelerate_launch_command("recipes/accelerate/ddp.yaml", "", "cogalign_core.stage", "sft")
