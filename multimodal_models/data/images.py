"""One safe way to turn an image reference into RGB pixels: training, evaluation and serving all use it.

`load_image` accepts a path, encoded bytes, a binary file object or a PIL image and returns a
fully decoded RGB `PIL.Image.Image` with no metadata attached. On the way it

- refuses anything but PNG, JPEG, WebP, BMP and GIF (first frame of an animation);
- checks width x height against `max_pixels` from the header, before a single pixel is
  decoded, so a small file claiming 100000 x 100000 px cannot exhaust memory. The check is
  ours and does not depend on Pillow's process-global `Image.MAX_IMAGE_PIXELS`;
- applies the EXIF orientation, so a phone photo comes out the right way up;
- converts every pixel mode to RGB faithfully: transparency is composited on white,
  16-bit and float images are scaled (not clipped) to 8 bits, CMYK/1-bit/grey are expanded.

Every failure (missing file, empty data, not an image, truncated, too large, unsupported
format) is an `ImageLoadError` naming the source and what is wrong.

`strip_metadata` and `encode_png` give copies without EXIF/GPS/XMP/ICC/text chunks, for
anything the project stores or a server returns.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from multimodal_models.errors import ImageLoadError

# 64 megapixels: a 48-50 MP phone photo passes; decoded as RGB it is at most ~190 MB.
DEFAULT_MAX_PIXELS = 64_000_000

# Pillow's names of the formats we decode. (Pillow's JPEG opener also returns camera
# JPEGs that carry a second preview/stereo picture, labelled "MPO"; the first is a plain JPEG.)
SUPPORTED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")

ImageInput = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO, Image.Image]

# Exceptions Pillow raises from inside its decoders on bad data.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, IndexError, TypeError)

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")

# Metadata that changes what the pixels mean; everything else in `Image.info` is dropped.
_PIXEL_INFO_KEYS = ("transparency",)

# Pixel modes a PNG file can hold; anything else is converted to RGB before encoding.
_PNG_MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16")


def load_image(source: ImageInput, *, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None) -> Image.Image:
    """Decode `source` into a new RGB image, safely.

    Args:
        source: a path (`str` or `os.PathLike`), the encoded bytes, a binary file object
            (read to its end, not closed), or a `PIL.Image.Image` (converted, not modified).
        max_pixels: the largest width*height accepted; checked from the header before decoding.
        name: how errors refer to the source (default: the path, or a description).

    Returns:
        A fully loaded `PIL.Image.Image` in mode "RGB", EXIF orientation applied, with an
        empty `info` (no EXIF, GPS, ICC profile or text chunks).

    Raises:
        ImageLoadError: the source is missing, empty, not an image, in an unsupported format,
            truncated or corrupt, or has more than `max_pixels` pixels.
    """
    label = name or _describe_source(source)
    if isinstance(source, Image.Image):
        _check_pixel_count(source.size, max_pixels, label)
        _decode(source, label)  # a lazily opened file may still be undecoded
        return _finish(source, label, owned=False)
    data = _read_source(source, label)
    with _open_checked(data, label, max_pixels) as image:
        _decode(image, label)
        if image.format == "PNG":
            _verify_png_chunks(data, label)
        return _finish(image, label, owned=True)


def read_image_size(source: ImageInput, *, name: str | None = None) -> tuple[int, int]:
    """Return (width, height) as stored in the file header, without decoding the pixels.

    The size is the stored one, before any EXIF rotation (COCO's `width`/`height` are
    stored sizes too). Raises `ImageLoadError` like `load_image` for missing, empty,
    unreadable or unsupported files.
    """
    label = name or _describe_source(source)
    if isinstance(source, Image.Image):
        return source.size
    data = _read_source(source, label)
    with _open_checked(data, label, max_pixels=None) as image:
        return image.size


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow pixel mode to RGB (returns `image` itself when it is already plain RGB).

    - alpha (RGBA, LA, PA, premultiplied modes) and palette/grey/RGB images with a
      `transparency` entry are composited on a white background;
    - 16-bit modes ("I;16*") are scaled 0..65535 -> 0..255; "I" (32-bit int) likewise when
      its values fit 0..65535, else stretched from its min..max;
    - "F" (float) is scaled by 255 when its values lie in 0..1, kept when in 0..255, else
      stretched from its min..max (NaN counts as 0);
    - CMYK, YCbCr, 1-bit, greyscale and palette images go through Pillow's own conversion.
    """
    return _to_rgb(image, "<PIL image>")


def strip_metadata(image: Image.Image) -> Image.Image:
    """Return a copy of `image` with its pixels (and palette/transparency) but no metadata.

    EXIF (including GPS position and camera serials), XMP, ICC profiles, PNG text chunks,
    comments and everything else in `Image.info` are left behind.
    """
    clean = image.copy()
    clean.info = {key: image.info[key] for key in _PIXEL_INFO_KEYS if key in image.info}
    return clean


def encode_png(image: Image.Image) -> bytes:
    """Encode `image` as PNG bytes carrying no metadata (see `strip_metadata`)."""
    clean = strip_metadata(image)
    if clean.mode not in _PNG_MODES:
        clean = _to_rgb(clean, "<PIL image>")
    buffer = io.BytesIO()
    clean.save(buffer, format="PNG")
    return buffer.getvalue()


# --- reading the source ------------------------------------------------------------------


def _describe_source(source: object) -> str:
    """A short human-readable name for error messages."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes of image data>"
    if isinstance(source, Image.Image):
        return f"<PIL image {source.mode} {source.width}x{source.height}>"
    file_name = getattr(source, "name", None)
    if isinstance(file_name, str):
        return file_name
    return f"<{type(source).__name__} object>"


def _read_source(source: object, label: str) -> bytes:
    """Return the encoded bytes of a path, bytes-like or binary file object."""
    if isinstance(source, (str, os.PathLike)):
        return _read_file(Path(source), label)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif hasattr(source, "read"):
        data = source.read()
        if isinstance(data, str):
            raise ImageLoadError(label, "the file object was opened in text mode; open it with 'rb'")
        if not isinstance(data, (bytes, bytearray)):
            raise ImageLoadError(label, f"the file object's read() returned {type(data).__name__}, not bytes")
        data = bytes(data)
    else:
        raise ImageLoadError(
            label,
            f"cannot load an image from a {type(source).__name__}; "
            "expected a path, bytes, a binary file object or a PIL image",
        )
    if not data:
        raise ImageLoadError(label, "empty image data (0 bytes)")
    return data


def _read_file(path: Path, label: str) -> bytes:
    """Read a whole image file, turning OS errors into `ImageLoadError`."""
    if not path.exists():
        raise ImageLoadError(label, "no such file")
    if path.is_dir():
        raise ImageLoadError(label, "is a directory, not an image file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageLoadError(label, f"cannot read the file: {exc.strerror or exc}") from None
    if not data:
        raise ImageLoadError(label, "empty file (0 bytes)")
    return data


# --- header checks -----------------------------------------------------------------------


def _open_checked(data: bytes, label: str, max_pixels: int | None) -> Image.Image:
    """Open `data` (header only), check its format and pixel count; the caller closes it."""
    try:
        image = Image.open(io.BytesIO(data), formats=list(SUPPORTED_FORMATS))
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(label, _pillow_bomb_message(exc, max_pixels)) from None
    except UnidentifiedImageError:
        raise ImageLoadError(label, _unrecognised_message(data)) from None
    except _DECODE_ERRORS as exc:
        raise ImageLoadError(label, f"corrupt image header: {exc}") from None
    if max_pixels is not None:
        try:
            _check_pixel_count(image.size, max_pixels, label)
        except ImageLoadError:
            image.close()
            raise
    return image


# File signatures of the supported formats, to tell "broken PNG" from "not an image".
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
)


def _signature_format(data: bytes) -> str | None:
    """The supported format whose magic bytes `data` starts with, if any."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for signature, format_name in _SIGNATURES:
        if data.startswith(signature):
            return format_name
    return None


def _pillow_bomb_message(exc: Exception, max_pixels: int | None) -> str:
    """Explain a refusal by Pillow's own (process-global) decompression-bomb check.

    Pillow refuses, while reading the header, images above 2 * Image.MAX_IMAGE_PIXELS.
    When our limit is lower anyway, the image is simply over our limit.
    """
    pillow_limit = Image.MAX_IMAGE_PIXELS
    if max_pixels is not None and pillow_limit is not None and max_pixels < 2 * pillow_limit:
        return f"the image has more pixels than the limit max_pixels={max_pixels:,} (Pillow: {exc})"
    return (
        f"refused by Pillow's process-wide limit PIL.Image.MAX_IMAGE_PIXELS={pillow_limit:,} ({exc}); "
        "raise that limit too to load this image"
    )


def _unrecognised_message(data: bytes) -> str:
    """Explain why `data` is not a supported image, naming its format when it can be told."""
    supported = "PNG, JPEG, WebP, BMP, GIF"
    claimed = _signature_format(data)
    if claimed is not None:
        return f"truncated or corrupt {claimed} file: its header cannot be read ({len(data)} bytes in all)"
    other_format = _identify_any_format(data)
    if other_format is not None:
        return f"unsupported image format {other_format} (supported: {supported})"
    return f"not an image in a supported format (supported: {supported}); the data starts with {data[:16]!r}"


def _identify_any_format(data: bytes) -> str | None:
    """Name the format of `data` if any Pillow plugin recognises its header, else None."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.format
    except Exception:  # noqa: BLE001 - only used to improve an error message
        return None


def _check_pixel_count(size: tuple[int, int], max_pixels: int, label: str) -> None:
    """Raise if the image has no pixels or more than `max_pixels`."""
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageLoadError(label, f"the image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageLoadError(
            label,
            f"the image is {width}x{height} = {width * height:,} pixels, more than the limit "
            f"max_pixels={max_pixels:,}; pass a larger max_pixels only for files you trust",
        )


def _decode(image: Image.Image, label: str) -> None:
    """Decode the pixels (first frame), turning decoder failures into `ImageLoadError`."""
    try:
        image.load()
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(label, f"refused by Pillow's decompression-bomb limit: {exc}") from None
    except _DECODE_ERRORS as exc:
        raise ImageLoadError(
            label, f"cannot decode the {image.format} data (truncated or corrupt file): {exc}"
        ) from None


def _verify_png_chunks(data: bytes, label: str) -> None:
    """Check a PNG's chunk structure and checksums up to IEND (catches a cut-off tail that
    the decoder tolerates once it has all the pixels)."""
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
            image.verify()
    except _DECODE_ERRORS as exc:
        raise ImageLoadError(label, f"truncated or corrupt PNG file: {exc}") from None


# --- orientation and pixel modes ---------------------------------------------------------


def _finish(image: Image.Image, label: str, *, owned: bool) -> Image.Image:
    """Apply EXIF orientation, convert to RGB and return a new image with an empty `info`.

    `owned` says the image was opened here and may be rotated in place; a caller's PIL
    image is never modified.
    """
    upright = _apply_orientation(image if owned else image.copy())
    rgb = _to_rgb(upright, label)
    if rgb is upright and owned:  # already RGB: copy the pixels out of the image object the caller's `with` closes
        rgb = rgb.copy()
    rgb.info = {}
    return rgb


def _apply_orientation(image: Image.Image) -> Image.Image:
    """Rotate/flip `image` in place according to its EXIF Orientation tag and return it.

    A malformed EXIF block is treated as having no orientation: the pixels are intact and
    refusing the whole picture over a broken camera tag would lose data for nothing.
    """
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except Exception:  # noqa: BLE001 - broken EXIF must not make a valid picture unreadable
        pass
    return image


def _has_transparency(image: Image.Image) -> bool:
    """True when some pixels of `image` may be (partly) transparent."""
    bands = image.getbands()
    return "A" in bands or "a" in bands or image.info.get("transparency") is not None


def _to_rgb(image: Image.Image, label: str) -> Image.Image:
    """Convert any pixel mode to RGB; see `to_rgb` for the rules."""
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "I":
        return _grey_to_rgb(_integer_to_uint8(np.asarray(image)))
    if image.mode == "F":
        return _grey_to_rgb(_float_to_uint8(np.asarray(image, dtype=np.float64)))
    if _has_transparency(image):
        return _composite_on_white(image)
    if image.mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageLoadError(label, f"cannot convert pixel mode {image.mode} to RGB: {exc}") from None


def _composite_on_white(image: Image.Image) -> Image.Image:
    """Blend an image with transparency over an opaque white background."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _integer_to_uint8(values: np.ndarray) -> np.ndarray:
    """Scale 16-bit samples (or 32-bit ones holding 16-bit data) to 0..255 with rounding."""
    values = values.astype(np.int64)
    low, high = int(values.min()), int(values.max())
    if low >= 0 and high <= 65535:
        return ((values * 255 + 32767) // 65535).astype(np.uint8)
    return _stretch(values.astype(np.float64), low, high)


def _float_to_uint8(values: np.ndarray) -> np.ndarray:
    """Map float samples to 0..255: 0..1 scaled, 0..255 kept, anything else stretched."""
    values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(values.min()), float(values.max())
    if low >= 0.0 and high <= 1.0:
        return np.rint(values * 255.0).astype(np.uint8)
    if low >= 0.0 and high <= 255.0:
        return np.rint(values).astype(np.uint8)
    return _stretch(values, low, high)


def _stretch(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Linearly map [low, high] to [0, 255] (a constant image becomes black)."""
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.rint((values - low) * (255.0 / (high - low))).astype(np.uint8)


def _grey_to_rgb(grey: np.ndarray) -> Image.Image:
    """Make an RGB image from a (H, W) uint8 array."""
    return Image.fromarray(np.ascontiguousarray(grey)).convert("RGB")
