"""The OpenAI-compatible HTTP server."""

from .app import build_app, serve
from .limits import ServerLimits

__all__ = ["ServerLimits", "build_app", "serve"]
