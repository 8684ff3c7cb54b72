"""Loading images under a media policy: what is read, what is refused, and that every refusal is
a MediaError naming the problem (a bomb refused from its header, before any pixel is decoded)."""

from __future__ import annotations

import base64
import http.server
import io
import struct
import threading
import time
import zlib

import pytest
from PIL import Image

from tessera.multimodal import MediaError, check_url_host, load_image


def png_bytes(width: int = 40, height: int = 30, mode: str = "RGB") -> bytes:
    image = Image.new(mode, (width, height), (10, 200, 30) if mode == "RGB" else 128)
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR claiming ``width`` x ``height``, then a few bytes of pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def test_a_png_data_url_decodes_to_its_pixels():
    image = load_image(data_url(png_bytes(40, 30)))
    assert image.size == (40, 30) and image.getpixel((5, 5)) == (10, 200, 30)


def test_a_data_url_with_line_breaks_in_its_base64_still_decodes():
    encoded = base64.encodebytes(png_bytes(64, 64)).decode()  # 76-column lines
    assert "\n" in encoded
    assert load_image(f"data:image/png;base64,{encoded}").size == (64, 64)


def test_raw_bytes_and_an_in_memory_pil_image_are_accepted():
    assert load_image(png_bytes(7, 9)).size == (7, 9)
    image = Image.new("RGB", (3, 4))
    assert load_image(image) is image


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("data:image/png;base64,!!!notbase64", "does not decode"),
        ("data:image/png;base64,iVBORw0KGgo", "does not decode"),  # bad padding
        ("data:image/png,rawpayload", "only base64"),
        (data_url(b"hello", "text/plain"), r"expected an image/\* type"),
        ("data:image/png;base64", "needs a comma"),
        (data_url(b"just some text, no image"), "not an image in a supported format"),
        ("ftp://example.com/cat.png", "scheme 'ftp' is not allowed"),
        ("javascript:alert(1)", "scheme 'javascript' is not allowed"),
    ],
)
def test_a_malformed_source_is_a_media_error_naming_the_problem(source, message):
    with pytest.raises(MediaError, match=message):
        load_image(source)


def test_a_truncated_png_is_refused_as_truncated():
    data = Image.effect_noise((64, 48), 40).convert("RGB")
    out = io.BytesIO()
    data.save(out, "PNG")
    with pytest.raises(MediaError, match="truncated or corrupt PNG"):
        load_image(data_url(out.getvalue()[: len(out.getvalue()) // 2]))


def test_a_zero_by_zero_image_is_refused_as_empty():
    with pytest.raises(MediaError, match=r"empty image \(0x0\)"):
        load_image(data_url(png_header_only(0, 0)))
    with pytest.raises(MediaError, match=r"empty image \(0x0\)"):
        load_image(Image.new("RGB", (0, 0)))


@pytest.mark.parametrize("side", [7_000, 30_000])
def test_a_decompression_bomb_is_refused_from_its_header_before_decoding(side):
    # 7,000^2 is over our 40M cap and under PIL's own; 30,000^2 trips PIL's cap inside open()
    start = time.perf_counter()
    with pytest.raises(MediaError, match="refused before decoding") as err:
        load_image(data_url(png_header_only(side, side)))
    assert f"{side * side:,} pixels" in str(err.value)
    assert time.perf_counter() - start < 1.0  # decoding 30,000^2 RGB pixels would take 2.7 GB


def test_the_pixel_cap_is_the_callers_and_applies_to_in_memory_images():
    with pytest.raises(MediaError, match=r"exceeds the limit of 1,000 \("):
        load_image(Image.new("RGB", (40, 30)), max_pixels=1_000)
    assert load_image(png_bytes(40, 30), max_pixels=1_200).size == (40, 30)


def test_an_unsupported_format_is_refused_with_the_supported_list():
    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, "PPM")
    with pytest.raises(MediaError, match=r"supported format \(PNG, JPEG, WEBP, GIF, BMP\)"):
        load_image(out.getvalue())


def test_jpeg_gif_webp_and_bmp_decode(tmp_path):
    for fmt in ("JPEG", "GIF", "WEBP", "BMP"):
        out = io.BytesIO()
        Image.new("RGB", (12, 10), (255, 0, 0)).save(out, fmt)
        assert load_image(out.getvalue()).size == (12, 10), fmt


# -- local files --------------------------------------------------------------------------------


def test_local_files_are_refused_unless_a_media_path_is_allowed(tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes())
    with pytest.raises(MediaError, match="local media files are not allowed"):
        load_image(str(tmp_path / "a.png"))
    with pytest.raises(MediaError, match="local media files are not allowed"):
        load_image(f"file://{tmp_path}/a.png")


def test_a_local_file_under_the_allowed_path_is_read_as_a_path_or_file_url(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.png").write_bytes(png_bytes(5, 6))
    assert load_image(str(tmp_path / "sub" / "a.png"), allowed_local_media_path=tmp_path).size == (5, 6)
    assert load_image(tmp_path / "sub" / "a.png", allowed_local_media_path=tmp_path).size == (5, 6)
    assert load_image(f"file://{tmp_path}/sub/a.png", allowed_local_media_path=tmp_path).size == (5, 6)


def test_dot_dot_and_symlinks_cannot_escape_the_allowed_path(tmp_path):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    (outside / "secret.png").write_bytes(png_bytes())
    (allowed / "link.png").symlink_to(outside / "secret.png")
    for path in (f"{allowed}/../outside/secret.png", str(allowed / "link.png"), "/etc/passwd"):
        with pytest.raises(MediaError, match="outside the allowed local media path"):
            load_image(path, allowed_local_media_path=allowed)


def test_a_missing_or_oversized_local_file_is_a_media_error(tmp_path):
    with pytest.raises(MediaError, match="cannot read"):
        load_image(str(tmp_path / "nope.png"), allowed_local_media_path=tmp_path)
    (tmp_path / "big.png").write_bytes(png_bytes(64, 64))
    with pytest.raises(MediaError, match="exceeds the limit of 10 bytes"):
        load_image(str(tmp_path / "big.png"), allowed_local_media_path=tmp_path, max_bytes=10)
    with pytest.raises(MediaError, match="not a regular file"):
        load_image(str(tmp_path), allowed_local_media_path=tmp_path)


# -- http(s) ------------------------------------------------------------------------------------


def test_http_urls_are_refused_when_no_domain_is_allowed():
    with pytest.raises(MediaError, match="fetching media from http"):
        load_image("https://example.com/cat.png")


def test_http_urls_are_refused_for_a_host_not_in_the_allowed_domains():
    with pytest.raises(MediaError, match="host 'evil.example.com' is not among the allowed"):
        load_image("http://evil.example.com/cat.png", allowed_media_domains=["example.com"])
    check_url_host("http://EXAMPLE.com:8080/cat.png", ["example.com"])  # case and port don't matter


@pytest.fixture
def media_server(monkeypatch):
    """An http server on 127.0.0.1 serving /cat.png, /big.png, /missing and /redirect (to a
    host that is not allowed)."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    bodies = {"/cat.png": png_bytes(21, 13), "/big.png": png_bytes(300, 300, "L") + b"\0" * 5000}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "http://localhost.invalid/cat.png")
                self.end_headers()
            elif self.path in bodies:
                self.send_response(200)
                self.send_header("Content-Length", str(len(bodies[self.path])))
                self.end_headers()
                self.wfile.write(bodies[self.path])
            else:
                self.send_error(404)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_an_allowed_host_is_fetched_within_the_byte_cap(media_server):
    allowed = ["127.0.0.1"]
    assert load_image(f"{media_server}/cat.png", allowed_media_domains=allowed).size == (21, 13)
    with pytest.raises(MediaError, match="exceeds the limit of 1,000 bytes"):
        load_image(f"{media_server}/big.png", allowed_media_domains=allowed, max_bytes=1_000)
    with pytest.raises(MediaError, match="HTTP 404"):
        load_image(f"{media_server}/missing", allowed_media_domains=allowed)


def test_a_redirect_to_a_host_not_allowed_is_refused(media_server):
    with pytest.raises(MediaError, match="host 'localhost.invalid' is not among the allowed"):
        load_image(f"{media_server}/redirect", allowed_media_domains=["127.0.0.1"])
