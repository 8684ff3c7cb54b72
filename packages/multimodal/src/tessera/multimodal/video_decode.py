"""Video files (mp4, webm, ...) decoded into the frames a processor takes, with PyAV (the
``video`` extra: ``pip install tessera-multimodal[video]``); without it a video is a list of
frames (video_frames.py).

Only what the frame budget samples is kept: with a known frame count the sampled indices are
chosen before decoding and the other frames are dropped as they decode; the frame size is
checked against the pixel cap from the stream's header, before any frame is decoded, and the
number of frames decoded is bounded.
"""

from __future__ import annotations

import io
import os
from collections.abc import Collection

from PIL import Image

from .errors import MediaError
from .image_decode import DEFAULT_MAX_PIXELS
from .image_source import media_bytes
from .media_fetch import DEFAULT_MAX_BYTES, DEFAULT_TIMEOUT_S
from .video_frames import sample_frame_indices

MAX_DECODED_FRAMES = 3600  # a stream that does not say its length is decoded this far at most


def decode_video(
    data: bytes, what: str, *, max_frames: int, multiple: int = 2, max_pixels: int = DEFAULT_MAX_PIXELS
) -> list[Image.Image]:
    """The frames of a video file sampled to ``max_frames`` (a multiple of ``multiple``), as RGB
    images; a MediaError that names ``what`` and the problem."""
    try:
        import av
    except ImportError:
        raise MediaError(
            f"{what}: decoding video files needs PyAV (pip install 'tessera-multimodal[video]'); "
            "pass the video as a list of frames instead"
        ) from None
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            stream = next((s for s in container.streams if s.type == "video"), None)
            if stream is None:
                raise MediaError(f"{what}: holds no video stream")
            w, h = stream.codec_context.width, stream.codec_context.height
            if w * h == 0:
                raise MediaError(f"{what}: empty video frames ({w}x{h})")
            if w * h > max_pixels:
                raise MediaError(
                    f"{what}: frames of {w}x{h} = {w * h:,} pixels exceed the limit of {max_pixels:,}: "
                    "refused before decoding"
                )
            total = stream.frames
            wanted = set(sample_frame_indices(total, max_frames, multiple)) if total > 0 else None
            kept: list[Image.Image] = []
            for i, frame in enumerate(container.decode(stream)):
                if i >= MAX_DECODED_FRAMES:
                    raise MediaError(f"{what}: more than {MAX_DECODED_FRAMES:,} frames")
                if wanted is None or i in wanted:
                    kept.append(frame.to_image().convert("RGB"))
    except MediaError:
        raise
    except (av.error.FFmpegError, ValueError, OSError) as e:
        raise MediaError(f"{what}: not a video in a format PyAV reads ({e})") from e
    if not kept:
        raise MediaError(f"{what}: no frames decoded")
    if wanted is None or len(kept) != len(wanted):  # the header's count was missing or wrong
        kept = [kept[i] for i in sample_frame_indices(len(kept), max_frames, multiple)]
    return kept


def load_video(
    source: str | os.PathLike | bytes,
    *,
    max_frames: int,
    multiple: int = 2,
    allowed_local_media_path: str | os.PathLike | None = None,
    allowed_media_domains: Collection[str] = (),
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> list[Image.Image]:
    """The sampled frames of the video file at ``source`` (a ``data:video/...`` URL, an http(s)
    URL from an allowed host, a path or ``file://`` URL under the allowed path, or bytes)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, what = bytes(source), "video bytes"
    elif isinstance(source, (str, os.PathLike)):
        data, what = media_bytes(
            source, "video", allowed_local_media_path=allowed_local_media_path,
            allowed_media_domains=allowed_media_domains, max_bytes=max_bytes, timeout_s=timeout_s,
        )  # fmt: skip
    else:
        raise MediaError(
            f"a video source must be a URL, a path, bytes or a list of frames, not {type(source).__name__}"
        )
    return decode_video(data, what, max_frames=max_frames, multiple=multiple, max_pixels=max_pixels)
