"""`tessera serve` as a subprocess on a free loopback port, for the tests that talk HTTP to it."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest


class RunningServer(str):
    """The server's base URL; ``proc`` is its process, ``log`` its output once stopped."""

    proc: subprocess.Popen
    log: str = ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(*args: str, timeout: float = 120) -> RunningServer:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tessera.engine.cli", "serve", "--port", str(port), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    url = RunningServer(f"http://127.0.0.1:{port}")
    url.proc = proc
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return url
        except httpx.HTTPError:
            time.sleep(0.3)
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stdout.read()}")
    proc.kill()
    raise RuntimeError("server did not become healthy")


def stop_server(url: RunningServer) -> str:
    url.proc.terminate()
    try:
        url.log, _ = url.proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        url.proc.kill()
        url.log, _ = url.proc.communicate()
    return url.log


@pytest.fixture(scope="session")
def start_default_model_server(default_model_path):
    """``start_default_model_server(*serve_args)``: a server the test stops itself (``url.proc``)."""
    return start_server


@pytest.fixture(scope="session")
def serve_default_model(default_model_path):
    """``with serve_default_model(*serve_args) as url:`` runs the default model's server."""

    @contextlib.contextmanager
    def run(*args: str):
        url = start_server(*args)
        try:
            yield url
        finally:
            stop_server(url)

    return run
