"""Multi-GPU training stages (issue 12, item 3): the launch decision, the allocator handing a 2-GPU
stage two devices, and a real 2-process DDP SFT run on the CPU (gloo) with simulated devices.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cogalign.tasks.gpu import SIMULATED_ENV, GpuAllocator
from cogalign_core.arms import ARM_METHODS
from cogalign_core.config import PipelineParams
from cogalign_core.train import launch
from cogalign_core.train.recipe import Recipe, stage_recipe
from tests.conftest import TINY, copy_stage_tables


def _recipe(stage: str = "sft", family: str = TINY) -> Recipe:
    params = PipelineParams.model_validate({"model": {"recipe": family}})
    return stage_recipe(family, ARM_METHODS[stage], params.model)


def _parsed(argv: list[str]):  # type: ignore[no-untyped-def]
    from accelerate.commands.launch import launch_command_parser

    assert argv[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    return launch_command_parser().parse_args(argv[3:])


def test_one_device_or_none_runs_in_process_two_or_more_relaunch() -> None:
    recipe = _recipe()
    assert launch.relaunch_command("sft", recipe, {}) is None  # nothing allocated
    assert launch.relaunch_command("sft", recipe, {SIMULATED_ENV: ""}) is None  # the CPU
    assert launch.relaunch_command("sft", recipe, {SIMULATED_ENV: "3"}) is None  # one GPU: as before
    assert launch.relaunch_command("base_model", recipe, {SIMULATED_ENV: "0,1"}) is None  # not a training stage
    assert launch.relaunch_command("sft", recipe, {SIMULATED_ENV: "0,1", "LOCAL_RANK": "0"}) is None  # launched
    assert not launch.started_as_stage_command()  # in-process callers (this test) never relaunch
    args = _parsed(launch.relaunch_command("rl", _recipe("rl"), {"CUDA_VISIBLE_DEVICES": "2,3"}))  # a scheduler's
    assert args.num_processes == 2 and args.module and args.training_script == "cogalign_core.stage"
    assert args.training_script_args == ["rl"] and args.mixed_precision == "no"  # the tiny recipe is float32
    assert Path(args.config_file) == launch.accelerate_config_path("ddp") and Path(args.config_file).is_file()
    assert args.main_process_port > 0  # its own rendezvous port: two such stages may run at once


def test_the_recipe_names_config_and_precision() -> None:
    args = _parsed(launch.relaunch_command("sft", _recipe("sft", "qwen3-vl-8b"), {SIMULATED_ENV: "0,1,2,3,4,5,6,7"}))
    assert args.num_processes == 8 and args.mixed_precision == "bf16"
    assert Path(args.config_file).name == "zero2.yaml"
    assert yaml.safe_load(Path(args.config_file).read_text())["distributed_type"] == "DEEPSPEED"
    for sharded in ("fsdp", "zero3"):  # the final save reads process 0's full copy: refused, not corrupted
        with pytest.raises(ValueError, match="shards the parameters"):
            launch.check_final_save_supported(sharded)
    for whole in ("ddp", "zero2"):
        launch.check_final_save_supported(whole)


def test_allocator_hands_a_two_gpu_stage_two_devices_and_the_stage_launches_on_them(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from cogalign.workspace import template_text

    monkeypatch.setenv(SIMULATED_ENV, "0,1,2,3")
    dvc = yaml.safe_load(template_text("dvc.yaml"))
    assert dvc["stages"]["sft"]["meta"]["gpus"] >= 1  # the count a stage asks for lives in dvc.yaml
    alloc = GpuAllocator()
    with alloc.acquire(2) as first, alloc.acquire(2) as second:
        assert (first, second) == ("0,1", "2,3")
        # What the flow's task sets for its child (tasks/dvc_stage.py), as the stage process sees it:
        for devices in (first, second):
            env = {"CUDA_VISIBLE_DEVICES": devices, SIMULATED_ENV: devices}
            assert launch.allocated_devices(env) == devices.split(",")
            assert _parsed(launch.relaunch_command("sft", _recipe(), env)).num_processes == 2


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_process_ddp_sft_on_cpu_saves_a_model_that_reloads(stage_tables: Path, tmp_path: Path) -> None:
    from cogalign_core.config import load_params
    from cogalign_core.train import base_model, checkpoints, infer, modeling

    ws = copy_stage_tables(stage_tables, tmp_path / "ws")
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["model"].update(recipe=TINY, sft_max_steps=6)
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    base_model.run_stage(ws, load_params(ws), None)

    env = dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="0,1", **{SIMULATED_ENV: "0,1"})
    done = subprocess.run([sys.executable, "-m", "cogalign_core.stage", "sft"], cwd=ws, env=env,
                          capture_output=True, text=True, timeout=800)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "sft: 2 processes on devices 0,1" in done.stderr
    summary = json.loads((ws / "data/sft/summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 6  # DDP: 2 x 8 examples per step
    assert json.loads((ws / "data/sft/provenance.json").read_text())["steps"] == 6
    # Only process 0 wrote: one model, no temporary leftovers, and the checkpoints are gone.
    assert sorted(p.name for p in (ws / "data/sft").iterdir()) == ["log.csv", "model", "provenance.json",
                                                                   "summary.json"]
    assert not (ws / checkpoints.CHECKPOINTS_DIR / "sft").exists()
    model, processor = modeling.load_model_and_processor(ws / "data/sft/model")
    from PIL import Image

    answers = infer.generate_answers(model, processor, [Image.new("RGB", (224, 224), (120, 60, 60))], True,
                                     max_new_tokens=16)
    assert len(answers) == 1 and isinstance(answers[0], str)
