"""Counterfactual coverage and before/after examples: pure functions over counterfactual table rows.

Shared by the ``counterfactual`` stage (its ``summary.json``) and ``evaluate`` (the report), which must
not import the synthesis code (OpenCV, inpainting) to describe its output.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any


def coverage(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-parent coverage: parents, usable (a counterfactual and, when asked, its control), the usable
    share, parents excluded by reason and usable parents whose fill was clipped to the lens image."""
    parents = {r["parent_sample_id"]: r for r in rows if r["kind"] == "counterfactual_normal"}
    usable = [r for r in parents.values() if not r["excluded"]]
    return {"parents": len(parents), "usable": len(usable),
            "usable_fraction": round(len(usable) / len(parents), 4) if parents else None,
            "excluded_by_reason": dict(sorted(Counter(r["exclusion_reason"] for r in parents.values()
                                                      if r["excluded"]).items())),
            "usable_border_clipped": sum(1 for r in usable if r.get("fill_clipped"))}


def gallery_examples(rows: Sequence[Mapping[str, Any]], annotations: Mapping[str, Mapping[str, Any]], n: int = 6
                     ) -> list[dict[str, Any]]:
    """Before/after examples for a report: up to ``n`` usable parents (half of them border-clipped fills
    when there are such), each ``{parent_sample_id, clipped, original, <kind>...}`` (one key per row kind:
    ``counterfactual_normal``, ``control``, ``both``) with workspace-relative image paths (``None`` where absent)."""
    by_parent: dict[str, dict[str, Mapping[str, Any]]] = {}
    for r in rows:
        by_parent.setdefault(r["parent_sample_id"], {})[r["kind"]] = r
    kinds = sorted({r["kind"] for r in rows})
    usable = sorted(p for p, k in by_parent.items() if not k["counterfactual_normal"]["excluded"])
    clipped = [p for p in usable if by_parent[p]["counterfactual_normal"].get("fill_clipped")]
    chosen = clipped[:n // 2]
    chosen += [p for p in usable if p not in chosen][:n - len(chosen)]
    return [{"parent_sample_id": p, "clipped": bool(by_parent[p]["counterfactual_normal"].get("fill_clipped")),
             "original": annotations[p]["image_path"] if p in annotations else None,
             **{kind: (by_parent[p].get(kind) or {}).get("image_path") for kind in kinds}}
            for p in sorted(chosen)]
