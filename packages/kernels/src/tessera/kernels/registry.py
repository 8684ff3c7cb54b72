"""Op dispatch: a backend registers an implementation per (op, device type); the torch
reference runs wherever none did.

Backends are found through the entry-point group ``tessera.kernels``: each entry point names a
module (or a callable) that registers its ops when imported (or called). ``TESSERA_KERNELS=reference``
loads none of them, so every op runs its torch reference (the baseline the GPU benchmarks compare
against).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from importlib.metadata import entry_points

logger = logging.getLogger(__name__)

_IMPLS: dict[tuple[str, str], Callable] = {}
_NOTES: dict[tuple[str, str], str] = {}
_REFERENCE: dict[str, Callable] = {}
# device type -> (backend name, a callable giving its capabilities once asked)
_BACKENDS: dict[str, tuple[str, Callable[[], dict]]] = {}
_backends_loaded = False


def reference(op: str):
    """Declare the torch reference of ``op`` (used by tessera.kernels itself)."""

    def wrap(fn: Callable) -> Callable:
        _REFERENCE[op] = fn
        return fn

    return wrap


def register(op: str, device_type: str, note: str = ""):
    """Decorator for a backend: ``@register("rms_norm", "cpu")``; ``note`` says when the
    implementation runs fused or falls back (``tessera info`` shows it)."""

    def wrap(fn: Callable) -> Callable:
        if op not in _REFERENCE:
            raise KeyError(f"cannot register {op!r}: no such op (known: {', '.join(sorted(_REFERENCE))})")
        # installed backends load first, so that an explicit registration is never overridden
        # by one of them loading later
        load_backends()
        _IMPLS[(op, device_type)] = fn
        _NOTES[(op, device_type)] = note
        return fn

    return wrap


def unregister(op: str, device_type: str) -> None:
    _IMPLS.pop((op, device_type), None)
    _NOTES.pop((op, device_type), None)


def declare_backend(device_type: str, name: str, capabilities: Callable[[], dict]) -> None:
    """A backend says what it is for ``device_type``. ``capabilities()`` is called when someone
    asks (it may build or probe things) and returns at least ``preferred_dtype``, the compute
    dtype its kernels run fastest in, and may add facts worth showing (``tessera info``)."""
    _BACKENDS[device_type] = (name, capabilities)


def backend(device_type: str) -> tuple[str, dict] | None:
    """(name, capabilities) of the backend declared for ``device_type``, or None."""
    load_backends()
    if device_type not in _BACKENDS:
        return None
    name, caps = _BACKENDS[device_type]
    return name, caps()


def explain(device_type: str) -> list[tuple[str, str, str]]:
    """For every op: (op, what runs it on ``device_type``, the backend's note or why the
    reference runs)."""
    load_backends()
    rows = []
    for op, ref in sorted(_REFERENCE.items()):
        fn = _IMPLS.get((op, device_type))
        if fn is None:
            rows.append((op, f"{ref.__module__}.{ref.__name__}", "reference: no backend registered it"))
        else:
            rows.append((op, f"{fn.__module__}.{fn.__name__}", _NOTES.get((op, device_type), "")))
    return rows


def load_backends() -> None:
    """Import every installed backend once."""
    global _backends_loaded
    if _backends_loaded:
        return
    _backends_loaded = True
    if os.environ.get("TESSERA_KERNELS", "").strip().lower() == "reference":
        logger.info("TESSERA_KERNELS=reference: no kernel backend loaded, the torch reference runs every op")
        return
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
