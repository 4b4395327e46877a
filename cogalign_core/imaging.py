"""Safe image and mask decoding for ingest: bomb guard, full decode, 8-bit RGB, metadata stripping.

Every function here works on one file and either returns a decoded result or raises
:class:`Rejected` with a machine-readable reason from ``tables.QUARANTINE_REASONS``; nothing else
escapes (unexpected decoder errors are mapped to ``undecodable``), so one bad file can never take
a batch down.

Pixel frame: stored pixels are the image *as displayed* (origin top-left). An EXIF Orientation
tag (2-8: a rotation and/or mirroring, as phones and some capture stations write it) is applied to
the pixels before anything else (``ImageOps.exif_transpose``), to images and masks alike, and then
dropped with the rest of the EXIF block; masks and boxes are expected in the displayed frame (what
an annotator sees). A mask that only fits the image's unrotated raster is rejected with a reason
that names the orientation.

Stored form (content-addressed by SHA-256 of the stored bytes):

- a baseline/progressive JPEG that decodes to 8-bit RGB, carries no ICC profile and needs no
  orientation applied is stored as
  its own entropy-coded data with every APPn (except a minimal JFIF header and the Adobe colour
  transform marker), COM segment and trailing byte after EOI removed. Nothing that affects decoding
  is touched, so the stored file decodes to exactly the pixels that were hashed: lossless and as fast
  as a copy;
- an 8-bit RGB (or, for masks, 8-bit grey) PNG without ICC profile is stored with only its critical
  chunks (IHDR, PLTE, IDAT, IEND);
- anything else (16-bit, CMYK, palette, alpha, grey, ICC-tagged, TIFF, ...) is converted and encoded
  as PNG with ``compress_level=1`` (fast; files are ~1.3-1.6x the size of level 9 on photos).

Over 400 lines on purpose: the one place that turns raw bytes into stored pixels (decode, validate, strip metadata,
store losslessly, hash); keeping every stored form's rules together is what keeps them consistent.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageCms, ImageFile, ImageOps, UnidentifiedImageError

from cogalign_core.io import PNG_COMPRESS_LEVEL

# Truncated files must fail loudly, never be padded with grey (PIL's opt-in behaviour).
ImageFile.LOAD_TRUNCATED_IMAGES = False

# Keys PIL puts in ``Image.info`` that describe the encoding, not the patient or the device.
STRUCTURAL_INFO_KEYS = frozenset({
    "jfif", "jfif_version", "jfif_unit", "jfif_density", "dpi", "progressive", "progression",
    "adobe", "adobe_transform", "interlace", "transparency", "gamma", "aspect", "compression",
    "background", "duration", "loop", "version", "srgb", "chromaticity", "resolution", "unit",
    "jpeg_subsampling_type", "bbox", "default_image",
})

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_IMAGE_SIGNATURES: tuple[bytes, ...] = (
    b"\xff\xd8\xff", _PNG_SIGNATURE, b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*", b"RIFF",
    b"\x00\x00\x00\x0cjP  ", b"\xff\x4f\xff\x51",
)
_PNG_CRITICAL = frozenset({b"IHDR", b"PLTE", b"IDAT", b"IEND"})

# EXIF Orientation values: what the stored raster needs to be displayed upright.
ORIENTATIONS: dict[int, str] = {
    1: "upright", 2: "mirrored left-right", 3: "rotated 180°", 4: "mirrored top-bottom",
    5: "transposed (mirrored and rotated 90°)", 6: "rotated 90° clockwise",
    7: "transversed (mirrored and rotated 270°)", 8: "rotated 90° counter-clockwise",
}
_SWAPS_AXES = frozenset({5, 6, 7, 8})


class Rejected(Exception):
    """A file that cannot be ingested; ``reason`` is one of ``tables.QUARANTINE_REASONS``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class DecodedImage:
    """A fully decoded image ready to store.

    Attributes:
        image: PIL image, mode ``RGB``, 8 bits per channel, ``size`` = (width, height).
        sample_id: ``"s"`` + first 16 hex of SHA-256 over the RGB bytes (row-major HxWx3 uint8)
            followed by ``b"|H,W,3"``.
        stored: bytes to store (metadata-free JPEG or PNG, see module docstring).
        stored_suffix: ``".jpg"`` or ``".png"``.
        source_format / source_mode: what PIL reported for the original file.
        had_metadata: the source carried EXIF/ICC/XMP/text/comment data that was dropped.
        orientation: the EXIF Orientation value applied to the pixels (1: none; see ``ORIENTATIONS``).
    """

    image: Image.Image
    sample_id: str
    stored: bytes
    stored_suffix: str
    source_format: str
    source_mode: str
    had_metadata: bool
    orientation: int = 1

    @property
    def width(self) -> int:
        return self.image.size[0]

    @property
    def height(self) -> int:
        return self.image.size[1]


@dataclass(frozen=True)
class DecodedMask:
    """A validated binary mask.

    Attributes:
        mask: uint8 array (H, W), values in {0, 255}; 255 = lesion.
        stored: PNG bytes, single channel, {0, 255}.
        threshold: the ``value > threshold`` cut used to binarise, or ``None`` when the source was
            already two-level (0 and one other value).
        area_fraction: fraction of pixels that are lesion, in [0, 1].
    """

    mask: np.ndarray
    stored: bytes
    threshold: int | None
    area_fraction: float


def rgb_sample_id(image: Image.Image) -> str:
    """Content id of an 8-bit RGB image: ``"s"`` + 16 hex of SHA-256(RGB bytes + ``b"|H,W,3"``)."""
    if image.mode != "RGB":
        raise ValueError(f"sample ids are defined on RGB images, got mode {image.mode}")
    w, h = image.size
    digest = hashlib.sha256(image.tobytes())
    digest.update(f"|{h},{w},3".encode())
    return "s" + digest.hexdigest()[:16]


PHASH_SIZE = 8
PHASH_IMAGE_SIZE = 32  # imagehash.phash defaults: hash_size=8, highfreq_factor=4


def _dct_rows(n: int, k: int) -> np.ndarray:
    """First ``k`` rows of the unnormalised DCT-II matrix of size ``n`` (scipy.fftpack.dct type 2)."""
    i = np.arange(n)
    return 2.0 * np.cos(np.pi * np.arange(k)[:, None] * (2 * i[None, :] + 1) / (2 * n))


_DCT8x32 = _dct_rows(PHASH_IMAGE_SIZE, PHASH_SIZE)


def phash_hex(image: Image.Image) -> str:
    """64-bit perceptual hash as 16 hex characters, bit-identical to ``str(imagehash.phash(image))``.

    Same algorithm as imagehash (grey, Lanczos resize to 32x32, 2-D DCT-II, top-left 8x8 > median,
    bits row-major, MSB first) but only the 8x8 low-frequency block is computed, by two small
    matrix products instead of two full FFT-based DCTs (tests check equality with imagehash).
    """
    grey = image.convert("L").resize((PHASH_IMAGE_SIZE, PHASH_IMAGE_SIZE), Image.Resampling.LANCZOS)
    low = _DCT8x32 @ np.asarray(grey, dtype=np.float64) @ _DCT8x32.T
    flat = np.sort(low.ravel())
    median = (flat[31] + flat[32]) / 2.0  # what np.median computes for 64 values, without its overhead
    bits = np.packbits(low.ravel() > median)  # row-major, MSB first: imagehash's bit order
    return bits.tobytes().hex()


def phash_reference(image: Image.Image) -> str:
    """``str(imagehash.phash(image))``: the reference :func:`phash_hex` is checked against."""
    import imagehash

    return str(imagehash.phash(image))


def phash_distance(a: str, b: str) -> int:
    """Hamming distance between two 16-hex-character perceptual hashes."""
    return (int(a, 16) ^ int(b, 16)).bit_count()


def _read(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise Rejected("unreadable", f"{type(exc).__name__}: {exc.strerror or exc}") from exc
    if not data:
        raise Rejected("empty_file", "0 bytes")
    return data


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Open (header only) with the pixel-count guard applied before any pixel is decoded."""
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            # PIL warns between 1x and 2x MAX_IMAGE_PIXELS; our explicit check below decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise Rejected("too_many_pixels", str(exc)) from exc
    except UnidentifiedImageError as exc:
        if data.startswith(_IMAGE_SIGNATURES):
            raise Rejected("undecodable", "image signature present but the header cannot be parsed") from exc
        raise Rejected("not_an_image", "no known image signature") from exc
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError) as exc:
        # Recognised signature but a header PIL cannot parse.
        raise Rejected("undecodable", f"header: {type(exc).__name__}: {exc}") from exc
    w, h = im.size
    if w * h > max_pixels:
        raise Rejected("too_many_pixels", f"{w}x{h} = {w * h} pixels > limit {max_pixels}")
    if w <= 0 or h <= 0:
        raise Rejected("undecodable", f"declared size {w}x{h}")
    return im


def _load(im: Image.Image) -> None:
    """Decode every pixel; map decoder failures to truncated / undecodable."""
    try:
        im.load()
    except Image.DecompressionBombError as exc:
        raise Rejected("too_many_pixels", str(exc)) from exc
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError, MemoryError) as exc:
        text = str(exc)
        reason = "truncated" if "truncated" in text.lower() or isinstance(exc, EOFError) else "undecodable"
        raise Rejected(reason, f"{type(exc).__name__}: {text}") from exc


def _scale_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale an integer/float raster to uint8 by its nominal range (never clip a 16-bit range)."""
    if arr.dtype == np.uint8:
        return arr
    if np.issubdtype(arr.dtype, np.integer):
        lo, hi = int(arr.min(initial=0)), int(arr.max(initial=0))
        if lo >= 0 and hi <= 65535:
            # 16-bit data (PIL mode I;16* or I holding 16-bit values): full 0..65535 range -> 0..255.
            return ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    # Float or out-of-16-bit-range integers have no nominal range: stretch min..max.
    f = arr.astype(np.float64)
    lo, hi = float(np.nanmin(f)), float(np.nanmax(f))
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise Rejected("unsupported_mode", "non-finite pixel values")
    if hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    return np.round((f - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def to_rgb8(im: Image.Image) -> Image.Image:
    """Convert a loaded image of any PIL mode to 8-bit RGB.

    Alpha is discarded (not composited: the colour samples are the measurement); palette and
    grey are expanded; CMYK/YCbCr/LAB use PIL's conversions; 16/32-bit grey is scaled by its
    nominal range (never clipped). An embedded ICC profile is applied (source profile -> sRGB)
    when PIL can parse it.
    """
    icc = im.info.get("icc_profile")
    if icc and im.mode in ("RGB", "RGBA", "CMYK", "L"):
        base = im.convert("RGB") if im.mode == "RGBA" else im
        try:
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            converted = ImageCms.profileToProfile(base, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
            if converted is not None:
                return converted
        except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
            pass  # unusable profile: fall back to the plain conversion below
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("RGBA", "RGBX", "RGBa", "P", "PA", "L", "LA", "La", "1", "CMYK", "YCbCr", "LAB", "HSV"):
        if mode in ("P", "PA"):
            im = im.convert("RGBA")
        return im.convert("RGB")
    if mode.startswith("I") or mode.startswith("F"):
        grey = _scale_to_uint8(np.asarray(im))
        if grey.ndim != 2:
            raise Rejected("unsupported_mode", f"mode {mode} with shape {grey.shape}")
        return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2), "RGB")
    raise Rejected("unsupported_mode", f"PIL mode {mode}")


def exif_orientation(im: Image.Image) -> int:
    """The EXIF Orientation of ``im`` (1-8); 1 when absent, invalid or the EXIF block is unreadable."""
    try:
        value = im.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # a malformed EXIF block: nothing to apply (it is dropped anyway)
        return 1
    return value if isinstance(value, int) and value in ORIENTATIONS else 1


def upright(im: Image.Image) -> tuple[Image.Image, int]:
    """``im`` with its EXIF orientation applied to the pixels, and the orientation value (1: unchanged)."""
    orientation = exif_orientation(im)
    if orientation == 1:
        return im, 1
    try:
        return ImageOps.exif_transpose(im), orientation
    except (OSError, ValueError) as exc:
        raise Rejected("undecodable", f"applying EXIF orientation {orientation}: {exc}") from exc


def had_metadata(im: Image.Image) -> bool:
    """True when ``im.info`` holds anything beyond encoding parameters (EXIF, ICC, XMP, text...)."""
    return any(k not in STRUCTURAL_INFO_KEYS for k in im.info)


def strip_jpeg_metadata(data: bytes) -> bytes | None:
    """Rebuild a JPEG without APP1-APP13/APP15, COM, JFIF thumbnails or bytes after EOI.

    Kept: SOI, a minimal JFIF APP0 (thumbnail removed), Adobe APP14 (it selects the colour
    transform), all tables, frame and scan headers and entropy-coded data, EOI. Returns ``None``
    when the marker structure is not clean (then the caller re-encodes instead).
    """
    n = len(data)
    if n < 4 or data[:2] != b"\xff\xd8":
        return None
    out = [b"\xff\xd8"]
    pos = 2
    while pos < n:
        if data[pos] != 0xFF:
            return None
        while pos < n and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= n:
            return None
        marker = data[pos]
        pos += 1
        if marker == 0xD9:
            out.append(b"\xff\xd9")
            return b"".join(out)
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            out.append(bytes((0xFF, marker)))
            continue
        if pos + 2 > n:
            return None
        length = int.from_bytes(data[pos:pos + 2], "big")
        if length < 2 or pos + length > n:
            return None
        payload = data[pos + 2:pos + length]
        pos += length
        if marker == 0xE0:
            if payload[:5] == b"JFIF\x00" and len(payload) >= 14:
                minimal = payload[:12] + b"\x00\x00"  # version, units, densities; no thumbnail
                out.append(b"\xff\xe0" + (len(minimal) + 2).to_bytes(2, "big") + minimal)
            continue
        if marker == 0xEE:
            if payload[:5] == b"Adobe":
                out.append(b"\xff\xee" + length.to_bytes(2, "big") + payload)
            continue
        if 0xE1 <= marker <= 0xEF or marker == 0xFE:
            continue  # EXIF, XMP, ICC, MPF, IPTC/Photoshop, comments: dropped
        out.append(bytes((0xFF, marker)) + length.to_bytes(2, "big") + payload)
        if marker == 0xDA:
            # Entropy-coded data runs to the next marker that is not a stuffed 0xFF00 or an RSTn.
            scan_end = pos
            while True:
                scan_end = data.find(b"\xff", scan_end)
                if scan_end < 0 or scan_end + 1 >= n:
                    return None
                nxt = data[scan_end + 1]
                if nxt == 0x00 or 0xD0 <= nxt <= 0xD7 or nxt == 0xFF:
                    scan_end += 1 if nxt == 0xFF else 2
                    continue
                break
            out.append(data[pos:scan_end])
            pos = scan_end
    return None


def strip_png_metadata(data: bytes, color_type: int) -> bytes | None:
    """Keep only critical chunks of an 8-bit PNG of ``color_type`` (2 = RGB, 0 = grey).

    Returns ``None`` for other bit depths/colour types or a malformed chunk stream.
    """
    if data[:8] != _PNG_SIGNATURE or len(data) < 33:
        return None
    if data[12:16] != b"IHDR" or data[24] != 8 or data[25] != color_type:
        return None
    out = [_PNG_SIGNATURE]
    pos = 8
    n = len(data)
    while pos + 12 <= n:
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind = data[pos + 4:pos + 8]
        end = pos + 12 + length
        if end > n:
            return None
        if kind in _PNG_CRITICAL:
            out.append(data[pos:end])
        pos = end
        if kind == b"IEND":
            return b"".join(out)
    return None


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes of ``image`` (built from pixels only: no info dict, so no metadata is written)."""
    buf = io.BytesIO()
    clean = Image.frombytes(image.mode, image.size, image.tobytes())
    clean.save(buf, "PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def decode_image(path: str | os.PathLike[str], max_pixels: int, min_side: int) -> DecodedImage:
    """Fully decode ``path`` into 8-bit RGB and prepare metadata-free stored bytes.

    Raises:
        Rejected: empty_file, not_an_image, too_many_pixels (checked from the header, before any
            pixel is decoded), too_small, truncated, undecodable, unsupported_mode, unreadable.
    """
    data = _read(Path(path))
    im = _open(data, max_pixels)
    w, h = im.size
    if min(w, h) < min_side:
        raise Rejected("too_small", f"{w}x{h}: a side is below min_side={min_side}")
    fmt, mode = im.format or "unknown", im.mode
    _load(im)
    meta = had_metadata(im)
    im, orientation = upright(im)
    try:
        rgb = to_rgb8(im)
    except Rejected:
        raise
    except (OSError, ValueError, TypeError) as exc:
        raise Rejected("unsupported_mode", f"converting {mode}: {exc}") from exc
    stored: bytes | None = None
    suffix = ".png"
    # The source bytes are reused only when they decode to exactly these pixels (no rotation applied).
    if rgb is im and orientation == 1 and "icc_profile" not in im.info:
        if fmt == "JPEG":
            stored = strip_jpeg_metadata(data)
            suffix = ".jpg"
        elif fmt == "PNG":
            stored = strip_png_metadata(data, color_type=2)
    if stored is None:
        stored, suffix = encode_png(rgb), ".png"
    return DecodedImage(image=rgb, sample_id=rgb_sample_id(rgb), stored=stored, stored_suffix=suffix,
                        source_format=fmt, source_mode=mode, had_metadata=meta, orientation=orientation)


def decode_mask(path: str | os.PathLike[str], size: tuple[int, int], threshold: int,
                max_pixels: int, image_orientation: int = 1) -> DecodedMask:
    """Decode and validate a lesion mask for an image of ``size`` = (width, height) as displayed.

    The mask's own EXIF orientation, if any, is applied first. ``image_orientation`` (the
    orientation that was applied to the image) only explains a size mismatch: a mask that fits
    the image's unrotated raster is rejected with a detail naming the orientation.

    Colour masks are reduced by the per-pixel channel maximum (so a coloured label on black
    counts as lesion); 16-bit masks are scaled to 8 bits. A mask with at most two levels (0 and
    one other value, e.g. {0,1} or {0,255}) is binary as is; otherwise it is binarised as
    ``value > threshold`` and the threshold is returned.

    Raises:
        Rejected: mask_corrupt (unreadable, empty, not an image, truncated, too many pixels) or
            mask_size_mismatch.
    """
    try:
        data = _read(Path(path))
        im = _open(data, max_pixels)
        _load(im)
        im, mask_orientation = upright(im)
    except Rejected as exc:
        raise Rejected("mask_corrupt", f"{exc.reason}: {exc.detail}") from exc
    if im.size != tuple(size):
        detail = f"mask {im.size[0]}x{im.size[1]} vs image {size[0]}x{size[1]}"
        if image_orientation in _SWAPS_AXES and im.size == (size[1], size[0]):
            detail += (f"; the image carries EXIF orientation {image_orientation} "
                       f"({ORIENTATIONS[image_orientation]}), applied on ingest: this mask fits the unrotated raster, "
                       "draw masks on the image as displayed")
        raise Rejected("mask_size_mismatch", detail)
    mode = im.mode
    try:
        if mode in ("1", "L"):
            grey = im if mode == "L" else im.convert("L")
        elif mode.startswith("I") or mode.startswith("F"):
            grey = Image.fromarray(_scale_to_uint8(np.asarray(im)), "L")
        else:
            grey = Image.fromarray(np.asarray(im.convert("RGB")).max(axis=2), "L")
    except (OSError, ValueError, TypeError, Rejected) as exc:
        raise Rejected("mask_corrupt", f"converting mode {mode}: {exc}") from exc
    hist = grey.histogram()  # 256 bins, computed in C
    nonzero_levels = [v for v in range(1, 256) if hist[v]]
    total = grey.size[0] * grey.size[1]
    used: int | None
    if len(nonzero_levels) <= 1:
        used, cut = None, 0
    else:
        used = cut = threshold
    lesion = sum(hist[cut + 1:])
    stored = None
    if used is None and mode == "L" and nonzero_levels in ([], [255]) and im.format == "PNG" \
            and mask_orientation == 1:
        stored = strip_png_metadata(data, color_type=0)  # already {0,255}: keep the encoded pixels
        out_image = grey
    else:
        lut = [0] * (cut + 1) + [255] * (255 - cut)
        out_image = grey.point(lut)
    if stored is None:
        stored = encode_png(out_image)
    out = np.asarray(out_image, dtype=np.uint8)
    return DecodedMask(mask=out, stored=stored, threshold=used, area_fraction=lesion / total)
