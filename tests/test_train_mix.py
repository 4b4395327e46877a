"""The training mix: real and derived images are balanced each on their own (the sft_cf / rl data)."""

from __future__ import annotations

from collections import Counter

from cogalign_core import taxonomy
from cogalign_core.train.data import balance_groups, balance_normals


def _ex(prefix: str, n: int, kind: str) -> list[dict[str, str]]:
    diagnosis = "polyp" if kind in ("real_lesion", "control") else taxonomy.NORMAL
    return [{"sample_id": f"{prefix}{i}", "kind": kind, "diagnosis": diagnosis} for i in range(n)]


# The bundled sample's train split, by kind: many real lesions, few real normals, two lesion-free
# derived images (counterfactual normal, both) per control.
REAL = _ex("r", 181, "real_lesion") + _ex("n", 27, "real_normal")
DERIVED = _ex("c", 164, "counterfactual_normal") + _ex("k", 82, "control")


def _kinds(examples: list[dict[str, str]]) -> Counter[str]:
    return Counter(e["kind"] for e in examples)


def test_each_group_is_balanced_so_neither_a_fill_nor_rare_real_normals_predict_the_label() -> None:
    mix = balance_groups(REAL, DERIVED, 0.5, seed=0)
    k = _kinds(mix)
    assert k["real_lesion"] == k["real_normal"] == 181          # real normals cycle up to the lesions
    assert k["counterfactual_normal"] == k["control"] == 164     # controls cycle up to the lesion-free images
    assert {e["sample_id"] for e in mix} == {e["sample_id"] for e in REAL + DERIVED}  # nothing dropped
    # Pooled balancing (what sft_cf did before) leaves real normals a small minority of the normals.
    pooled = _kinds(balance_normals(REAL + DERIVED, 0.5, seed=0))
    assert pooled["real_normal"] < pooled["counterfactual_normal"] / 4


def test_cap_shares_groups_by_size_and_stays_balanced_and_deterministic() -> None:
    mix = balance_groups(REAL, DERIVED, 0.5, seed=3, max_prompts=128)
    assert len(mix) == 128 and mix == balance_groups(REAL, DERIVED, 0.5, seed=3, max_prompts=128)
    k = _kinds(mix)
    assert abs(k["real_lesion"] - k["real_normal"]) <= 1 and abs(k["counterfactual_normal"] - k["control"]) <= 1
    assert abs((k["real_lesion"] + k["real_normal"]) - 128 * 362 / (362 + 328)) <= 1
    assert balance_groups(REAL, DERIVED, 0.5, seed=4, max_prompts=128) != mix


def test_no_derived_images_is_plain_balancing() -> None:
    assert balance_groups(REAL, [], 0.5, seed=0) == balance_normals(REAL, 0.5, seed=0)
    assert balance_groups([], [], 0.5, seed=0) == []
