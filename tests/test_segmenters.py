"""Segmenters and mask quality figures on known masks and real sample images."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cogalign_core.config.masks import MaskParams
from cogalign_core.segmenters import Prompt, PromptNeedsBox, build_segmenter
from cogalign_core.segmenters import quality as q
from cogalign_core.segmenters.box_ellipse import ellipse_in_box
from cogalign_core.segmenters.ground_truth import MaskProblem, load_mask
from tests.mask_workspace import SAMPLE

KVASIR = sorted((SAMPLE / "kvasir-seg" / "images").glob("*.jpg"))[0]


def _image_and_gt() -> tuple[np.ndarray, np.ndarray]:
    image = np.asarray(Image.open(KVASIR).convert("RGB"))
    gt = load_mask(SAMPLE / "kvasir-seg" / "masks" / (KVASIR.stem + ".png"), image.shape[:2])
    return image, gt


def test_dice_iou_on_known_masks() -> None:
    a = np.zeros((10, 10), bool)
    b = np.zeros((10, 10), bool)
    a[0:4, 0:5] = True   # 20 px
    b[2:6, 0:5] = True   # 20 px, overlap 10
    assert q.dice(a, b) == pytest.approx(2 * 10 / 40)
    assert q.iou(a, b) == pytest.approx(10 / 30)
    assert q.dice(a, a) == 1.0 and q.iou(a, ~a) == 0.0
    assert q.dice(np.zeros_like(a), np.zeros_like(a)) == 1.0
    assert q.component_count(a | np.pad(np.ones((1, 1), bool), ((9, 0), (9, 0)))) == 2
    assert q.box_of(a) == (0, 0, 4, 3) and q.touches_border(a)
    with pytest.raises(ValueError, match="shapes differ"):
        q.dice(a, np.zeros((5, 5), bool))


def test_ellipse_inscribed_in_box() -> None:
    m = ellipse_in_box((50, 60), (10, 5, 29, 44))
    assert q.box_of(m) == (10, 5, 29, 44)
    assert q.area_fraction(m) * 50 * 60 == pytest.approx(np.pi * 10 * 20, rel=0.05)


def test_box_ellipse_and_grabcut_on_real_image_are_deterministic() -> None:
    image, gt = _image_and_gt()
    prompts = [Prompt(b) for b in q.component_boxes(gt)]
    params = MaskParams()
    ell = build_segmenter("box_ellipse", params).segment(image, prompts).mask
    assert ell.shape == gt.shape and ell.dtype == bool
    assert q.dice(ell, gt) > 0.7  # the ellipse is a strong baseline on a real polyp
    gc = build_segmenter("grabcut", params)
    first, second = gc.segment(image, prompts).mask, gc.segment(image, prompts).mask
    assert np.array_equal(first, second)  # cv2.setRNGSeed makes reruns identical
    with pytest.raises(PromptNeedsBox):
        build_segmenter("box_ellipse", params).segment(image, [Prompt(None, ((5, 5, 1),))])


def test_load_mask_reasons(tmp_path) -> None:
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "empty.png")
    Image.fromarray(np.full((4, 4), 255, np.uint8)).save(tmp_path / "small.png")
    (tmp_path / "junk.png").write_bytes(b"not a png")
    for name, reason in [("empty.png", "gt_mask_empty"), ("small.png", "gt_mask_size_mismatch"),
                         ("junk.png", "gt_mask_unreadable")]:
        with pytest.raises(MaskProblem) as e:
            load_mask(tmp_path / name, (8, 8))
        assert e.value.reason == reason


def test_sam_without_checkpoint_names_the_params_key() -> None:
    from cogalign_core.segmenters.sam import SamCheckpointError

    with pytest.raises(SamCheckpointError, match=r"masks\.sam\.checkpoint"):
        build_segmenter("sam", MaskParams(segmenter="sam"))
    with pytest.raises(SamCheckpointError, match="no such file"):
        build_segmenter("sam", MaskParams.model_validate({"sam": {"checkpoint": "/nonexistent/sam.pth"}}))


def test_sam_end_to_end_with_tiny_random_model() -> None:
    """Prompts, batching across images, best-of-multimask selection and output shapes."""
    import torch

    from cogalign_core.segmenters.sam import SamSegmenter, tiny_random_sam

    image, gt = _image_and_gt()
    other = np.asarray(Image.open(sorted((SAMPLE / "cvc-clinicdb" / "images").glob("*.jpg"))[0]).convert("RGB"))
    seg = SamSegmenter(tiny_random_sam(img_size=64), image_batch_size=2, multimask=True)
    boxes = [Prompt(b) for b in q.component_boxes(gt)]
    prompts = [[*boxes, Prompt((5, 5, 60, 60))], [], [Prompt((30, 40, 120, 140), ((70, 90, 1), (35, 45, 0)))]]
    results = seg.segment_batch([image, other, image], prompts)
    assert [r.mask.shape for r in results] == [image.shape[:2], other.shape[:2], image.shape[:2]]
    assert all(r.mask.dtype == bool for r in results)
    assert results[1].score is None and not results[1].mask.any()  # no prompt: nothing decoded
    assert len(results[0].per_prompt_scores) == len(prompts[0]) and len(results[2].per_prompt_scores) == 1
    # Best-of-multimask: the kept score is the max of SAM's three candidates for that prompt.
    p = seg.predictor
    p.set_image(image)
    box = p.transform.apply_boxes_torch(torch.tensor([[5.0, 5.0, 61.0, 61.0]]), image.shape[:2])
    _, ious, _ = p.predict_torch(None, None, boxes=box, multimask_output=True)
    assert results[0].per_prompt_scores[-1] == pytest.approx(float(ious.max()), abs=1e-4)
    # Batched encoding equals one-image-at-a-time encoding.
    single = seg.segment(image, prompts[0])
    assert np.array_equal(single.mask, results[0].mask)
