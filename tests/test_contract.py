"""dvc.yaml spells exactly the deps, outs and params the contract module declares, for every stage."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from cogalign_core import contract, stage

REPO = Path(__file__).resolve().parents[1]
DVC_YAML = REPO / "cogalign" / "templates" / "dvc.yaml"


def _stages() -> dict[str, dict]:
    doc = yaml.safe_load(DVC_YAML.read_text())
    return {name: (spec["do"] if "foreach" in spec else spec) | {"foreach": spec.get("foreach")}
            for name, spec in doc["stages"].items()}


def test_dvc_yaml_stages_are_the_contract_and_the_registry() -> None:
    assert set(_stages()) == set(contract.STAGES) == set(stage.STAGES)


@pytest.mark.parametrize("name", sorted(contract.STAGES))
def test_dvc_yaml_deps_outs_params_match_the_contract(name: str) -> None:
    spec, io = _stages()[name], contract.STAGES[name]
    fingerprint = contract.fingerprint(name)
    assert spec["deps"][0] == fingerprint  # the code fingerprint comes first, then the data
    assert sorted(spec["deps"][1:]) == sorted(io.deps), name
    outs = [next(iter(o)) if isinstance(o, dict) else o for o in spec["outs"]]
    persist = [next(iter(o)) for o in spec["outs"] if isinstance(o, dict) and next(iter(o.values())).get("persist")]
    assert sorted(outs) == sorted(io.outs), name
    assert sorted(persist) == sorted(io.persist), name
    assert sorted(spec.get("params", [])) == sorted(io.params), name
    assert spec["foreach"] == (f"${{{io.foreach}}}" if io.foreach else None), name
    assert spec["cmd"].split()[3] == name


def test_metrics_and_plots_are_inside_stage_outputs() -> None:
    doc = yaml.safe_load(DVC_YAML.read_text())
    outs = [o for io in contract.STAGES.values() for o in io.outs]
    files = list(doc["metrics"]) + [next(iter(p)) for p in doc["plots"]]
    assert files and all(any(contract.is_under(f, o) for o in outs) for f in files)


def test_no_path_literals_outside_the_contract() -> None:
    """Workspace data paths are spelled in the contract only (docstrings and comments may name them)."""
    offenders = []
    for folder in ("cogalign_core", "cogalign", "flows", "tasks"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if path.name == "contract.py":
                continue
            tree = ast.parse(path.read_text())
            docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                          if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
                          and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                    text = node.value
                    if text.startswith(("data/", "clinician/", "code/")) or text in ("data", "raw"):
                        offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: {text!r}")
    assert offenders == []


def test_consumed_splits_follow_the_deps() -> None:
    assert contract.consumed_splits("base_model") == ("train",)
    assert set(contract.consumed_splits("sft_cf")) == {"train", "val"}
    assert contract.consumed_splits("evaluate") == contract.EVALUATED_SPLITS
    assert contract.consumed_splits("masks") == ()
    assert contract.uses_counterfactuals("rl") and not contract.uses_counterfactuals("rl_no_cf")
