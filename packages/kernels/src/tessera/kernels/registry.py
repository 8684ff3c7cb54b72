"""Op dispatch: a backend registers an implementation per (op, device type); the torch
reference runs wherever none did.

Backends are found through the entry-point group ``tessera.kernels``: each entry point names a
module (or a callable) that registers its ops when imported (or called).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from importlib.metadata import entry_points

logger = logging.getLogger(__name__)

_IMPLS: dict[tuple[str, str], Callable] = {}
_REFERENCE: dict[str, Callable] = {}
_backends_loaded = False


def reference(op: str):
    """Declare the torch reference of ``op`` (used by tessera.kernels itself)."""

    def wrap(fn: Callable) -> Callable:
        _REFERENCE[op] = fn
        return fn

    return wrap


def register(op: str, device_type: str):
    """Decorator for a backend: ``@register("rms_norm", "cpu")``."""

    def wrap(fn: Callable) -> Callable:
        if op not in _REFERENCE:
            raise KeyError(f"cannot register {op!r}: no such op (known: {', '.join(sorted(_REFERENCE))})")
        # installed backends load first, so that an explicit registration is never overridden
        # by one of them loading later
        load_backends()
        _IMPLS[(op, device_type)] = fn
        return fn

    return wrap


def unregister(op: str, device_type: str) -> None:
    _IMPLS.pop((op, device_type), None)


def load_backends() -> None:
    """Import every installed backend once."""
    global _backends_loaded
    if _backends_loaded:
        return
    _backends_loaded = True
    for ep in entry_points(group="tessera.kernels"):
        try:
            loaded = ep.load()
            if callable(loaded):
                loaded()
        except Exception as e:  # a broken optional backend must not stop the reference path
            logger.warning("kernel backend %s failed to load: %s", ep.name, e)


def lookup(op: str, device_type: str) -> Callable:
    """The implementation of ``op`` for ``device_type``: a backend's, else the reference."""
    load_backends()
    return _IMPLS.get((op, device_type)) or _REFERENCE[op]


def implementations(op: str) -> dict[str, Callable]:
    """Backend implementations of ``op`` by device type (the reference not included)."""
    load_backends()
    return {dev: fn for (name, dev), fn in _IMPLS.items() if name == op}
