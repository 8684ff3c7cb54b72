"""Fetching a media URL over http(s): only from allowed hosts (redirects included), within a
timeout and a byte cap. Off unless the server lists hosts (vLLM's ``--allowed-media-domains``)."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Collection
from urllib.parse import urlsplit

from .errors import MediaError

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MAX_BYTES = 32 * 1024 * 1024
_CHUNK = 1 << 16


def check_url_host(url: str, allowed_domains: Collection[str]) -> None:
    """A MediaError unless ``url`` is http(s) and its host is one of ``allowed_domains`` (exact,
    case-insensitive; the port doesn't matter)."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https"):
        raise MediaError(f"{shorten(url)}: URL scheme {parts.scheme!r} is not allowed for media")
    host = (parts.hostname or "").lower()
    if not allowed_domains:
        raise MediaError(
            f"{shorten(url)}: fetching media from http(s) URLs is off (the server allows no media domains)"
        )
    if host not in {d.lower() for d in allowed_domains}:
        raise MediaError(f"{shorten(url)}: host {host!r} is not among the allowed media domains")


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to an allowed host, so a redirect can't reach past the allowlist."""

    def __init__(self, allowed_domains: Collection[str]):
        self.allowed_domains = allowed_domains

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        check_url_host(newurl, self.allowed_domains)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch_url(
    url: str,
    allowed_domains: Collection[str],
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> bytes:
    """The body at ``url``; a MediaError for a refused host, an HTTP error, a timeout (``timeout_s``
    for the whole transfer) or a body over ``max_bytes``."""
    check_url_host(url, allowed_domains)
    opener = urllib.request.build_opener(_CheckedRedirects(allowed_domains))
    deadline = time.monotonic() + timeout_s
    request = urllib.request.Request(url, headers={"User-Agent": "tessera-multimodal"})
    try:
        with opener.open(request, timeout=timeout_s) as response:
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > max_bytes:
                raise MediaError(
                    f"{shorten(url)}: {int(length):,} bytes exceeds the limit of {max_bytes:,} bytes"
                )
            body = bytearray()
            while chunk := response.read(_CHUNK):
                body += chunk
                if len(body) > max_bytes:
                    raise MediaError(f"{shorten(url)}: more than the limit of {max_bytes:,} bytes")
                if time.monotonic() > deadline:
                    raise MediaError(f"{shorten(url)}: not fetched within {timeout_s:g} s")
            return bytes(body)
    except urllib.error.HTTPError as e:
        raise MediaError(f"{shorten(url)}: HTTP {e.code} {e.reason}") from e
    except urllib.error.URLError as e:
        raise MediaError(f"{shorten(url)}: cannot fetch ({e.reason})") from e
    except TimeoutError as e:
        raise MediaError(f"{shorten(url)}: not fetched within {timeout_s:g} s") from e
    except OSError as e:
        raise MediaError(f"{shorten(url)}: cannot fetch ({e})") from e


def shorten(url: str, limit: int = 120) -> str:
    return url if len(url) <= limit else url[: limit - 3] + "..."
