"""Bytes to a PIL image, refusing what would be costly or unsafe before any pixel is decoded.

PIL's ``Image.open`` reads only the header, so the size is checked against a pixel cap before
``load()`` decodes the pixels: a 30,000 x 30,000 PNG of a few kilobytes is refused from its header.
Only common raster formats are opened (no EPS, which PIL hands to Ghostscript, nor the rarer
plugins).
"""

from __future__ import annotations

import io
import re
import struct
import zlib

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import MediaError

SUPPORTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
# an 8000 x 5000 photo; its RGB pixels take 120 MB once decoded
DEFAULT_MAX_PIXELS = 40_000_000

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_image_size(width: int, height: int, what: str, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise MediaError(f"{what}: empty image ({width}x{height})")
    if width * height > max_pixels:
        raise MediaError(
            f"{what}: {width}x{height} = {width * height:,} pixels exceeds the limit of {max_pixels:,} "
            "(refused before decoding: a decompression bomb?)"
        )


def check_image(image: Image.Image, what: str = "image", *, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """A MediaError if an in-memory image is empty or larger than ``max_pixels``."""
    check_image_size(image.width, image.height, what, max_pixels)


def decode_image(data: bytes, what: str, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The decoded image in ``data`` (``what`` names its source in errors), turned upright by its
    EXIF orientation as transformers' ``load_image`` does; a MediaError for an empty, truncated,
    oversized or unsupported image."""
    try:
        image = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except Image.DecompressionBombError as e:  # PIL's own cap (2x MAX_IMAGE_PIXELS), from the header
        pixels = re.search(r"\((\d+) pixels\)", str(e))
        count = f"{int(pixels.group(1)):,} pixels" if pixels else "its size"
        raise MediaError(
            f"{what}: {count} exceeds the limit of {max_pixels:,} "
            "(refused before decoding: a decompression bomb?)"
        ) from e
    except UnidentifiedImageError as e:
        size = _png_header_size(data)
        if size is not None and 0 in size:  # PIL refuses to identify a PNG of zero width or height
            raise MediaError(f"{what}: empty image ({size[0]}x{size[1]})") from e
        raise MediaError(
            f"{what}: not an image in a supported format ({', '.join(SUPPORTED_FORMATS)})"
        ) from e
    except (OSError, SyntaxError, ValueError) as e:
        raise MediaError(f"{what}: unreadable image header ({e})") from e
    check_image_size(image.width, image.height, what, max_pixels)
    try:
        image.load()  # decode now, so a truncated file fails here and not inside a processor
    except (OSError, SyntaxError, ValueError, EOFError, zlib.error) as e:
        raise MediaError(f"{what}: truncated or corrupt {image.format} data ({e})") from e
    ImageOps.exif_transpose(image, in_place=True)
    return image


def _png_header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR chunk, or None if ``data`` doesn't start like a PNG."""
    if len(data) < 24 or not data.startswith(_PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", data[16:24])
