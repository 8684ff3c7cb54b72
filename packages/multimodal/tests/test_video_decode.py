"""Video files into frames (PyAV, the ``video`` extra): sampled to the frame budget, the frame
size checked from the header before decoding, bad files refused with what is wrong."""

import io
import sys

import numpy as np
import pytest

from tessera.multimodal import MediaError, decode_video, load_video

av = pytest.importorskip("av", reason="PyAV (tessera-multimodal[video]) is not installed")


def mp4(frames: int = 10, width: int = 64, height: int = 48) -> bytes:
    """An MPEG-4 video whose frame i is flat grey level 20 * i."""
    out = io.BytesIO()
    with av.open(out, mode="w", format="mp4") as c:
        s = c.add_stream("mpeg4", rate=10)
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            img = np.full((height, width, 3), 20 * i, dtype=np.uint8)
            for packet in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    return out.getvalue()


def level(img) -> float:
    return float(np.asarray(img).mean())


def test_frames_are_sampled_evenly_and_come_back_as_rgb_images():
    frames = decode_video(mp4(10), "clip", max_frames=4)
    assert len(frames) == 4 and all(f.mode == "RGB" and f.size == (64, 48) for f in frames)
    # indices 0, 2, 5, 7 of 10 (sample_frame_indices): grey levels 0, 40, 100, 140 (lossy codec)
    assert [round(level(f) / 20) for f in frames] == [0, 2, 5, 7]


def test_an_odd_budget_keeps_an_even_count_for_two_frame_patches():
    assert len(decode_video(mp4(9), "clip", max_frames=5)) == 4


def test_a_data_url_is_read_as_a_video_and_an_image_type_is_refused():
    import base64

    data = mp4(4)
    url = "data:video/mp4;base64," + base64.b64encode(data).decode()
    assert len(load_video(url, max_frames=8)) == 4
    with pytest.raises(MediaError, match="expected a video/"):
        load_video("data:image/png;base64," + base64.b64encode(data).decode(), max_frames=8)


def test_frames_over_the_pixel_cap_are_refused_from_the_header():
    with pytest.raises(MediaError, match="refused before decoding"):
        decode_video(mp4(4), "clip", max_frames=4, max_pixels=1000)


def test_a_truncated_or_foreign_file_is_a_media_error():
    with pytest.raises(MediaError, match="clip"):
        decode_video(mp4(6)[:300], "clip", max_frames=4)
    with pytest.raises(MediaError, match="not a video"):
        decode_video(b"plain text, no video at all" * 10, "clip", max_frames=4)


def test_without_pyav_the_error_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(MediaError, match=r"needs PyAV .*list of frames"):
        decode_video(b"...", "clip", max_frames=4)


def test_a_local_video_needs_the_allowed_path(tmp_path):
    path = tmp_path / "clip.mp4"
    path.write_bytes(mp4(4))
    with pytest.raises(MediaError, match="not allowed"):
        load_video(str(path), max_frames=4)
    assert len(load_video(str(path), max_frames=4, allowed_local_media_path=tmp_path)) == 4
