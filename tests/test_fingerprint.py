"""Code fingerprints come from each stage's real import closure plus only the selected recipe's folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cogalign_core import fingerprint
from cogalign_core.stage import STAGES, code_fingerprint

PACKAGE_ROOT = Path(fingerprint.__file__).resolve().parent


def _sources(stage: str, recipe: str | None = "tiny") -> set[str]:
    return set(code_fingerprint(stage, recipe)["sources"])


def test_closure_covers_every_module_an_entry_loads() -> None:
    """Ground truth from the interpreter: importing each entry module loads only modules its fingerprint holds."""
    entries = sorted({spec.entry.split(":")[0] for spec in STAGES.values()},
                     key=lambda m: ("train" in m or "evaluate" in m, m))  # data stages first: they load less
    code = ("import importlib, json, sys\nout = {}\n"
            f"for m in {entries!r}:\n"
            "    before = set(sys.modules)\n    importlib.import_module(m)\n"
            "    out[m] = sorted(n for n in set(sys.modules) - before if n.startswith('cogalign_core'))\n"
            "print(json.dumps(out))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                       check=True).stdout)
    for stage, spec in STAGES.items():
        module = spec.entry.split(":")[0]
        missing = set(loaded[module]) - set(fingerprint.stage_modules(spec.entry))
        assert not missing, f"{stage}: imports {sorted(missing)} but its fingerprint leaves them out"


def test_counterfactual_fingerprint_holds_the_segmenter_modules_it_imports() -> None:
    sources = _sources("counterfactual")
    assert {"cogalign_core.segmenters.ground_truth", "cogalign_core.segmenters.quality"} <= sources
    assert "cogalign_core.train.sft" not in sources and not any(k.startswith("recipes/") for k in sources)


def test_only_the_selected_recipe_counts_and_only_for_stages_that_load_recipes() -> None:
    for stage in STAGES:
        recipes = {k for k in _sources(stage, "tiny") if k.startswith("recipes/")}
        loads = fingerprint.RECIPE_LOADER in fingerprint.stage_modules(STAGES[stage].entry)
        assert (recipes == {f"recipes/tiny/{m}.yaml" for m in ("sft", "sft_cf", "grpo", "grpo_no_cf")}) == loads
    assert "recipes/accelerate/zero2.yaml" in _sources("rl", "qwen3-vl-8b")  # named by the 8b recipes
    assert "recipes/accelerate/zero2.yaml" not in _sources("rl", "qwen3-vl-2b")
    from cogalign_core.train.recipe import RECIPES_PACKAGE

    assert fingerprint.RECIPES_PACKAGE == RECIPES_PACKAGE


def test_a_module_under_type_checking_is_not_a_dependency() -> None:
    # train/recipe.py imports config.model only for type hints; config/evaluate names the arms via arms.py.
    assert "cogalign_core.config.model" not in fingerprint.direct_imports(fingerprint.RECIPE_LOADER)
    assert fingerprint.RECIPE_LOADER not in fingerprint.import_closure("cogalign_core.config")


def test_masks_and_review_do_not_import_each_other() -> None:
    assert "cogalign_core.masks" not in fingerprint.import_closure("cogalign_core.review")


@pytest.mark.parametrize("edited", ["segmenters/quality.py", "train/infer.py", "imaging.py"])
def test_editing_a_module_changes_exactly_the_stages_that_import_it(edited: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    target = PACKAGE_ROOT / edited
    before = {s: code_fingerprint(s, "tiny") for s in STAGES}
    real = fingerprint.read_source
    monkeypatch.setattr(fingerprint, "read_source", lambda p: real(p) + (b"\n# edit\n" if p == target else b""))
    changed = {s for s in STAGES if code_fingerprint(s, "tiny") != before[s]}
    name = "cogalign_core." + edited.removesuffix(".py").replace("/", ".")
    assert changed == {s for s in STAGES if name in fingerprint.stage_modules(STAGES[s].entry)}
    assert changed  # every one of these modules is used by some stage
