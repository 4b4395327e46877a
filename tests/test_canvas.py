"""Canvas: fixed square output, identical masking for every source, box mapping to the 0-1000 frame."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cogalign_core import canvas

SAMPLE = Path(str(resources.files("cogalign_core.sample_data")))
SPEC = canvas.CanvasSpec(size=224)


def first(folder: str) -> Path:
    return sorted((SAMPLE / folder).iterdir())[0]


@pytest.mark.parametrize("folder", ["kvasir-seg/images", "cvc-clinicdb/images", "kvasir-v2-normal-cecum/normal-cecum"])
def test_every_source_becomes_the_same_square(folder: str) -> None:
    out = canvas.load_canvas(first(folder), SPEC)
    assert out.size == (224, 224) and out.mode == "RGB"
    arr = np.asarray(out)
    # The lower-left overlay region and the corners are black whatever the source.
    assert arr[-1, 0].sum() == 0 and arr[0, 0].sum() == 0 and arr[0, -1].sum() == 0
    with Image.open(first(folder)) as im:
        lb = canvas.letterbox(im.width, im.height, 224)
    keep = canvas.content_mask(lb, SPEC)
    assert not arr[~keep].any()
    assert arr[keep].mean() > 10  # real endoscopy content survives


def test_masking_is_identical_for_same_shape_sources() -> None:
    a = canvas.content_mask(canvas.letterbox(384, 288, 224), SPEC)
    b = canvas.content_mask(canvas.letterbox(768, 576, 224), SPEC)
    assert np.array_equal(a, b)


def test_box_mapping_matches_the_letterbox() -> None:
    # A 400x200 image: scaled by 224/400, centred vertically with 56 px bands top and bottom.
    assert canvas.box_to_canvas((0, 0, 399, 199), 400, 200, SPEC) == (0, 250, 1000, 750)
    x1, y1, x2, y2 = canvas.box_to_canvas((100, 50, 199, 99), 400, 200, SPEC)
    assert (x1, y1, x2, y2) == (250, 375, 500, 500)
    tiny = canvas.box_to_canvas((10, 10, 10, 10), 4000, 4000, SPEC)
    assert tiny[2] > tiny[0] and tiny[3] > tiny[1]


def test_box_lands_on_the_lesion_pixels() -> None:
    image = np.zeros((300, 500, 3), np.uint8)
    image[100:150, 300:380] = 255
    out = np.asarray(canvas.to_canvas(image, canvas.CanvasSpec(size=224, border_frac=0, corner_frac=0,
                                                               overlay_frac=0)))
    x1, y1, x2, y2 = (v * 224 / 1000 for v in canvas.box_to_canvas((300, 100, 379, 149), 500, 300, SPEC))
    inside = out[int(y1) + 1:int(y2) - 1, int(x1) + 1:int(x2) - 1]
    assert inside.min() > 200


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="max < min"):
        canvas.box_to_canvas((10, 10, 5, 20), 100, 100, SPEC)
    with pytest.raises(ValueError, match="positive"):
        canvas.letterbox(0, 10, 224)
    with pytest.raises(ValueError):
        canvas.CanvasSpec(size=8)
    assert canvas.union_box([]) is None
    assert canvas.union_box([(1, 2, 3, 4), (0, 5, 2, 9)]) == (0, 2, 3, 9)
