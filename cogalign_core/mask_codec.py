"""How a lesion mask is stored: deterministic single-channel {0, 255} PNG bytes.

Shared by the mask stage (segmenter and ground-truth masks) and the review import (clinician masks),
so both write byte-identical files for identical masks.
"""

from __future__ import annotations

from io import BytesIO

import numpy as np
from PIL import Image


def encode_mask_png(mask: np.ndarray) -> bytes:
    """Deterministic PNG bytes of a ``(H, W)`` bool (or 0/1) mask as single-channel {0, 255}, pixel frame kept."""
    buf = BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()
