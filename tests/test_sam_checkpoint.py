"""SAM checkpoints load under the project's control: tensors only (``weights_only=True`` or
safetensors), every key of the architecture, never segment_anything's own unguarded ``torch.load``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("segment_anything")

from cogalign_core.segmenters import sam  # noqa: E402


class _RunsCode:
    """Unpickling this runs a shell command: what a tampered checkpoint could carry."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch pwned",))


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_state_dict_and_safetensors_checkpoints_load_exactly(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    trained = sam.tiny_random_sam(seed=0)
    torch.save(trained.state_dict(), tmp_path / "sam.pth")
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(tmp_path / "sam.safetensors"))
    for name in ("sam.pth", "sam.safetensors"):
        fresh = sam.tiny_random_sam(seed=1)
        assert not _same(fresh, trained)
        sam.load_sam_weights(fresh, tmp_path / name)
        assert _same(fresh, trained)


def test_checkpoint_with_pickled_code_or_wrong_keys_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    monkeypatch.chdir(tmp_path)
    torch.save({"image_encoder.pos_embed": _RunsCode()}, tmp_path / "tampered.pth")
    with pytest.raises(sam.SamCheckpointError, match="pickled objects besides tensors"):
        sam.load_sam_weights(sam.tiny_random_sam(), tmp_path / "tampered.pth")
    assert not (tmp_path / "pwned").exists()
    torch.save({"not_a_sam_key": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(sam.SamCheckpointError, match="does not fit the SAM architecture"):
        sam.load_sam_weights(sam.tiny_random_sam(), tmp_path / "other.pth")


def test_load_sam_builds_the_architecture_without_letting_segment_anything_load_the_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import segment_anything

    built: list[object] = []

    def builder(checkpoint: object = None) -> torch.nn.Module:
        built.append(checkpoint)
        return sam.tiny_random_sam(seed=3)

    monkeypatch.setitem(segment_anything.sam_model_registry, "vit_b", builder)
    trained = sam.tiny_random_sam(seed=0)
    torch.save(trained.state_dict(), tmp_path / "sam_vit_b.pth")
    model = sam.load_sam("vit_b", "sam_vit_b.pth", workspace=tmp_path, device="cpu")
    assert built == [None] and _same(model, trained)
