"""`cogalign study` on the tiny workspace: one seed x (standard + one cross-source condition) as DVC
experiments, one of them left by an interrupted study, read back and pooled into one table. Structure
only, never values (the tiny model is blind); pooling over seeds is checked on known answers in
``test_study_table.py``.

Training is shortened through the study's own overrides (`--set`), so the two experiments stay cheap.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cogalign.workspace import Workspace
from cogalign_core.study import STUDY_METRICS
from tests.conftest import copy_workspace

pytestmark = pytest.mark.slow
ARMS = ["sft", "sft_cf", "rl_no_cf", "rl"]
SHORT = ["model.sft_max_steps=2", "model.rl_max_steps=1", "evaluate.max_samples_per_condition=4",
         "evaluate.bootstrap_resamples=20"]


def test_study_resumes_records_every_arm_and_a_cross_source_condition(full_workspace: Path, tmp_path: Path) -> None:
    from cogalign.study import conditions, planned, run_study

    root = copy_workspace(full_workspace, tmp_path / "ws")
    # An interrupted study: its first experiment already ran. The study resumes and reuses it.
    _, _, first, first_overrides = planned("t", conditions(["kvasir-seg"]), [0], SHORT)[0]
    Workspace.open(root).dvc("exp", "run", "--temp", "-n", first, *[a for o in first_overrides for a in ("-S", o)])
    out = run_study(root, seeds=1, name="t", cross_sources=["kvasir-seg"], n_resamples=20, overrides=SHORT)
    assert out == root / "studies" / "t"
    table = json.loads((out / "study.json").read_text())
    assert table["overrides"] == SHORT and table["wall_seconds"] > 0 and table["reused_experiments"] == [first]
    assert set(table["experiment_seconds"]) == set(table["experiments"]) - {first}
    # Every (condition, seed) is a recorded experiment with its own commit.
    assert set(table["experiments"]) == {"t-standard-s0", "t-cross-kvasir-seg-s0"}
    assert len(set(table["experiments"].values())) == 2
    # Every arm of every experiment reloads from the DVC cache with the stock Auto classes.
    assert set(table["reloaded"]) == set(table["experiments"])
    assert all(set(r) == set(ARMS) and all("ForConditionalGeneration/" in v for v in r.values())
               for r in table["reloaded"].values())
    assert set(table["conditions"]) == {"standard", "cross-kvasir-seg"}
    assert table["conditions"]["cross-kvasir-seg"]["held_out"] == ["kvasir-seg"]
    assert table["conditions"]["standard"]["held_out"] == []
    for cond in table["conditions"].values():
        assert cond["seeds"] == [0] and set(cond["arms"]) == set(ARMS)
        for scopes in cond["arms"].values():
            assert {"all", "kvasir-seg", "cvc-clinicdb", "kvasir-v2"} <= set(scopes)
            summary = scopes["all"]
            assert set(summary) <= set(STUDY_METRICS)
            for name in ("lesion_sensitivity", "real_normal_specificity", "balanced_accuracy",
                         "counterfactual_specificity", "probe_agreement_blank"):
                cell = summary[name]
                assert set(cell) == {"pooled", "seeds", "n"} and len(cell["n"]) == 1 and min(cell["n"]) > 0
                assert set(cell["seeds"]["values"]) == {"0"}
                p = cell["pooled"]
                assert p["ci_low"] <= p["value"] <= p["ci_high"]
                assert cell["seeds"]["min"] <= cell["seeds"]["mean"] <= cell["seeds"]["max"]
    # The experiments trained with the seed and the held-out source they were queued with.
    ws = Workspace.open(root)
    for name, held_out in (("t-cross-kvasir-seg-s0", ["kvasir-seg"]), ("t-standard-s0", [])):
        model = yaml.safe_load(ws.git("show", f"{table['experiments'][name]}:params.yaml").stdout)["model"]
        assert (model["seed"], model["train_exclude_datasets"], model["sft_max_steps"]) == (0, held_out, 2), name
    md = (out / "study.md").read_text()
    assert "## Condition `cross-kvasir-seg` (held out of training: kvasir-seg)" in md
    assert "### source kvasir-seg (held out)" in md and md.count("| rl_no_cf |") == 2 * 4
    rows = [line.split(" |")[0].removeprefix("| ") for line in md.splitlines()
            if line.startswith("| ") and not line.startswith("| ---")]
    assert rows[:5] == ["arm", *ARMS]  # the arms in evaluate.models order
    # The study is committed in the workspace; its progress table was written along the way.
    assert ws.git("status", "--porcelain", "--", "studies").stdout == ""
    assert "2 of 2 experiments" in (root / ".cogalign" / "studies" / "t" / "study.md").read_text()
