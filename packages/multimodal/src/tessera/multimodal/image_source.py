"""Where an image comes from: a ``data:`` URL, a local file under the allowed directory, an
http(s) URL from an allowed host, raw bytes, or a PIL image already in memory."""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Collection
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import url2pathname

from PIL import Image

from .errors import MediaError
from .image_decode import DEFAULT_MAX_PIXELS, check_image, decode_image
from .media_fetch import DEFAULT_MAX_BYTES, DEFAULT_TIMEOUT_S, fetch_url, shorten

ImageSource = str | os.PathLike | bytes | Image.Image


def load_image(
    source: ImageSource,
    *,
    allowed_local_media_path: str | os.PathLike | None = None,
    allowed_media_domains: Collection[str] = (),
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> Image.Image:
    """The image at ``source``, decoded (pixels loaded), or a MediaError that names the source and
    the problem. A string is a ``data:image/...;base64,`` URL, an ``http(s)://`` URL (only when its
    host is in ``allowed_media_domains``), a ``file://`` URL or a path (only when it resolves under
    ``allowed_local_media_path``). A PIL image is checked for size and returned as is."""
    if isinstance(source, Image.Image):
        check_image(source, "image", max_pixels=max_pixels)
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        return decode_image(bytes(source), "image bytes", max_pixels=max_pixels)
    if not isinstance(source, (str, os.PathLike)):
        raise MediaError(
            f"an image source must be a URL, a path, bytes or a PIL image, not {type(source).__name__}"
        )
    data, what = media_bytes(
        source, "image", allowed_local_media_path=allowed_local_media_path,
        allowed_media_domains=allowed_media_domains, max_bytes=max_bytes, timeout_s=timeout_s,
    )  # fmt: skip
    return decode_image(data, what, max_pixels=max_pixels)


def media_bytes(
    source: str | os.PathLike,
    kind: str,
    *,
    allowed_local_media_path: str | os.PathLike | None = None,
    allowed_media_domains: Collection[str] = (),
    max_bytes: int = DEFAULT_MAX_BYTES,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> tuple[bytes, str]:
    """(the bytes of a URL or path under the media policy, a short name of it for messages);
    ``kind`` ("image" or "video") is the media type a data URL must declare."""
    if isinstance(source, os.PathLike):
        path = os.fspath(source)
        return read_local_media(path, allowed_local_media_path, max_bytes=max_bytes), path
    scheme = urlsplit(source).scheme.lower() if ":" in source else ""
    if scheme == "data":
        data, mime = decode_data_url(source, max_bytes=max_bytes, kind=kind)
        return data, f"data URL ({mime}, {len(data):,} bytes)"
    if scheme in ("http", "https"):
        return fetch_url(source, allowed_media_domains, timeout_s=timeout_s, max_bytes=max_bytes), shorten(
            source
        )
    if scheme == "file":
        path = url2pathname(urlsplit(source).path)
    elif len(scheme) > 1:  # one letter is a Windows drive, not a scheme
        raise MediaError(f"{shorten(source)}: URL scheme {scheme!r} is not allowed for media")
    else:
        path = source
    return read_local_media(path, allowed_local_media_path, max_bytes=max_bytes), path


def decode_data_url(
    url: str, *, max_bytes: int = DEFAULT_MAX_BYTES, kind: str = "image"
) -> tuple[bytes, str]:
    """The bytes and media type of a ``data:<type>;base64,<payload>`` URL (type ``<kind>/*`` or
    left out)."""
    header, comma, payload = url.partition(",")
    if not comma:
        raise MediaError(f"{shorten(url, 60)}: a data URL needs a comma before its payload")
    mime, *params = (p.strip().lower() for p in header[len("data:") :].split(";"))
    if "base64" not in params:
        raise MediaError(f"data URL ({mime or 'no type'}): only base64 payloads are read")
    if mime and not mime.startswith(kind + "/"):
        raise MediaError(
            f"data URL of type {mime!r}: expected {'an' if kind == 'image' else 'a'} {kind}/* type"
        )
    payload = "".join(payload.split())  # line breaks some clients insert
    if (size := len(payload) // 4 * 3) > max_bytes:
        raise MediaError(f"data URL ({mime}): about {size:,} bytes exceeds the limit of {max_bytes:,} bytes")
    try:
        return base64.b64decode(payload, validate=True), mime or "no type"
    except (binascii.Error, ValueError) as e:
        raise MediaError(f"data URL ({mime or 'no type'}): the base64 payload does not decode ({e})") from e


def read_local_media(
    path: str, allowed_local_media_path: str | os.PathLike | None, *, max_bytes: int = DEFAULT_MAX_BYTES
) -> bytes:
    """The bytes of the file at ``path`` if it resolves (symlinks and ``..`` followed) to a file
    under ``allowed_local_media_path``; a MediaError otherwise, and always when that is None."""
    if allowed_local_media_path is None:
        raise MediaError(f"{path}: local media files are not allowed (the server allows no local media path)")
    root = Path(allowed_local_media_path).resolve()
    try:
        real = Path(path).resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise MediaError(f"{path}: cannot resolve the path ({e})") from e
    # containment before existence, so a refused path says nothing about what lies outside
    if not real.is_relative_to(root):
        raise MediaError(f"{path}: outside the allowed local media path {root}")
    try:
        size = real.stat().st_size
        if not real.is_file():
            raise MediaError(f"{path}: not a regular file")
        if size > max_bytes:
            raise MediaError(f"{path}: {size:,} bytes exceeds the limit of {max_bytes:,} bytes")
        return real.read_bytes()
    except OSError as e:
        raise MediaError(f"{path}: cannot read ({e.strerror or e})") from e
