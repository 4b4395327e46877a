"""Retrain: drop folder -> new batch (a corrupt file never blocks the others) -> pipeline -> decision;
nothing new -> fast no-op; a worse challenger is not promoted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from cogalign.workspace import Workspace
from tests.conftest import SAMPLE, copy_workspace


def _drop_folder(dst: Path, n: int = 4, corrupt: bool = True) -> Path:
    """A seg-layout drop of real frames (rotated: new pixels) with masks, plus (``corrupt``) one corrupt JPEG."""
    (dst / "images").mkdir(parents=True)
    (dst / "masks").mkdir()
    for img in sorted((SAMPLE / "kvasir-seg" / "images").glob("*.jpg"))[-n:]:
        with Image.open(img) as im:
            im.transpose(Image.Transpose.ROTATE_270).save(dst / "images" / img.name, quality=90)
        with Image.open(SAMPLE / "kvasir-seg" / "masks" / f"{img.stem}.png") as m:
            m.transpose(Image.Transpose.ROTATE_270).save(dst / "masks" / f"{img.stem}.png")
    if corrupt:
        good = (dst / "images" / sorted(p.name for p in (dst / "images").iterdir())[0]).read_bytes()
        (dst / "images" / "corrupt.jpg").write_bytes(good[: len(good) // 3])  # truncated mid-scan
    return dst


def _artifact(key: str) -> str | None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return arts[-1].data if arts else None


def test_new_drop_becomes_a_batch_corrupt_file_quarantined_then_noop(spine_workspace: Path, tmp_path: Path) -> None:
    from cogalign.flows.retrain import retrain
    from cogalign.retrain import read_ledger

    root = copy_workspace(spine_workspace, tmp_path / "ws")
    ws = Workspace.open(root)
    drop = _drop_folder(tmp_path / "drop")
    out = retrain(str(root), str(drop), until="annotate")
    assert not out["noop"] and out["batch"] == "b0002"
    # Images and their masks are files of the drop (4 + 4 + the corrupt one).
    assert out["drop"]["new"] == 9 and out["drop"]["already_seen"] == 0
    ingest = out["new_batch_ingest"]
    # The corrupt file is quarantined with a reason; the four good images are in.
    assert ingest["seen"] == 5 and ingest["ingested"] == 4 and ingest["quarantined"] == 1, ingest
    assert set(ingest["quarantined_by_reason"]) <= {"truncated", "undecodable"}
    assert ingest["with_mask"] == 4
    assert set(out["ran_stages"]) == {"ingest_batch@b0002", "ingest", "annotate"}
    assert out["decision"] is None and "stopped after annotate" in out["note"]
    ledger = read_ledger(ws)
    assert len(ledger) == 9 and set(ledger.values()) == {"b0002"}
    # No file names of the drop folder reach git-tracked registry files.
    assert "corrupt" not in (root / "data/registry/drop_ledger.json").read_text()
    assert ws.params.batches == ["b0001", "b0002"]
    assert ws.git("status", "--porcelain", "--", "data/registry", "params.yaml", "dvc.lock").stdout == ""
    assert "b0002" in (_artifact("retrain-outcome") or "")

    # Same files again (one under a new name): nothing new, nothing stale -> a fast no-op, no commit.
    shutil.copy(drop / "images" / "corrupt.jpg", drop / "images" / "renamed_copy.jpg")
    head = ws.revision()
    run_records = sorted((root / ".cogalign" / "runs").glob("*.json"))
    again = retrain(str(root), str(drop), until="annotate")
    assert again["noop"] and again["batch"] is None
    assert again["drop"]["already_seen"] == 10 and again["drop"]["new"] == 0
    assert ws.revision() == head and ws.params.batches == ["b0001", "b0002"]
    # A no-op does no pipeline work: no pipeline run was recorded (no flow, no stage, no commit).
    assert sorted((root / ".cogalign" / "runs").glob("*.json")) == run_records
    print(f"no-op retrain: {again['seconds']:.2f}s")


def _perfect_predictions(rows: list[dict]) -> list[dict]:
    """Stored prediction rows re-answered with their gold terms (probes keep their answers)."""
    from cogalign_core import answer_format, metrics, taxonomy

    out = []
    for r in rows:
        gold = {lv: r[f"gold_{lv}"] for lv in taxonomy.LEVELS}
        if any(v is None for v in gold.values()):
            out.append(r)
            continue
        scored = metrics.score_row({**r, "gold_boxes": None,
                                    "completion": answer_format.render_answer(gold, None, grounding=False)})
        out.append({**r, **{k: scored[k] for k in scored if k.startswith(("pred_", "correct_"))},
                    "completion": scored["completion"], "format_valid": scored["format_valid"],
                    "problems": scored["problems"], "pred_box": None, "box_given": False, "grounding": False})
    return out


@pytest.mark.slow
def test_challenger_gated_against_recorded_champion(full_workspace: Path, tmp_path: Path) -> None:
    from cogalign.retrain import CHAMPION, CHAMPION_PREDICTIONS, decide_and_record
    from cogalign_core import tables
    from cogalign_core.evaluate import PREDICTIONS

    root = copy_workspace(full_workspace, tmp_path / "ws")
    ws = Workspace.open(root)
    # No champion yet: the evaluated candidate becomes the first champion, with lineage recorded.
    first, path = decide_and_record(ws, extra={"new_batch": None})
    assert first["promote"] and "first champion" in first["reasons"][0]
    assert path == "data/registry/decisions/0001.json"
    ch = first["challenger"]
    assert ch["model"] == "rl" and ch["model_md5"] and ch["revision"]
    assert ch["metrics_all_prompts"]["accuracy_diagnosis"]["n"] > 0
    assert [s["stage"] for s in ch["lineage"]["chain"]][-1] == "rl" and ch["lineage"]["raw_batches"]
    champion = json.loads((root / CHAMPION).read_text())
    assert champion["decision"] == "0001" and champion["model"] == "rl"
    assert ws.git("status", "--porcelain", "--", "data/registry").stdout == ""

    # A champion that answered every graded prompt correctly: the same challenger is now worse.
    rows = tables.read_rows(root / CHAMPION_PREDICTIONS, "predictions")
    tables.write_rows(_perfect_predictions(rows), root / CHAMPION_PREDICTIONS, PREDICTIONS, "predictions")
    ws.commit("test: a perfect champion", ["data/registry"])
    second, _ = decide_and_record(ws)
    assert not second["promote"] and second["id"] == "0002"
    assert second["comparison"]["common_prompts"] == len(rows)
    primary = next(c for c in second["checks"] if c["role"] == "primary")
    assert primary["champion"] == 1.0 and primary["challenger"] < 1.0 and not primary["passed"]
    assert second["champion"]["metrics_common_prompts"]["accuracy_diagnosis"]["value"] == 1.0
    assert json.loads((root / CHAMPION).read_text())["decision"] == "0001"  # champion unchanged


@pytest.mark.slow
def test_retrain_on_new_real_images_makes_a_different_challenger_and_says_why(full_workspace: Path,
                                                                              tmp_path: Path) -> None:
    from cogalign.retrain import CHAMPION, decide_and_record, retrain_once

    root = copy_workspace(full_workspace, tmp_path / "ws")
    ws = Workspace.open(root)
    first, _ = decide_and_record(ws)  # today's rl model is the champion
    # The folder name says the source (kvasir-seg: polyps with masks); an unknown source would be rejected
    # as unlabelled at annotate and retrain nothing.
    out = retrain_once(root, _drop_folder(tmp_path / "kvasir-seg-new", n=12, corrupt=False))
    assert out.batch == "b0002" and out.new_batch_ingest and out.new_batch_ingest["ingested"] == 12
    assert {"base_model", "sft", "rl", "evaluate"} <= set(out.ran_stages)
    d = out.decision
    assert d is not None and d["id"] == "0002" and d["new_batch"] == "b0002"
    # A new model (new weights), judged on the prompts both models answered: its metrics differ.
    assert d["challenger"]["model_md5"] != first["challenger"]["model_md5"]
    assert d["comparison"]["common_prompts"] >= 10
    ch, cp = d["challenger"]["metrics_common_prompts"], d["champion"]["metrics_common_prompts"]
    assert any(ch[m]["value"] != cp[m]["value"] for m in ch if ch[m]["value"] is not None)
    # The record says why, with the gate's numbers; the champion moves only on promotion.
    primary = next(c for c in d["checks"] if c["role"] == "primary")
    assert primary["metric"] == ws.params.registry.promotion.primary_metric
    assert primary["champion"] == cp[primary["metric"]]["value"]
    assert primary["challenger"] == ch[primary["metric"]]["value"]
    assert d["reasons"] and all(isinstance(r, str) and r for r in d["reasons"])
    assert primary["metric"] in d["reasons"][0] or any("guarded" in r for r in d["reasons"])
    champion = json.loads((root / CHAMPION).read_text())
    assert champion["decision"] == ("0002" if d["promote"] else "0001")
    assert ws.git("status", "--porcelain", "--", "data/registry").stdout == ""
