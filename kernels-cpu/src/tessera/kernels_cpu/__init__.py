"""Numba CPU kernels, registered for device "cpu" through the tessera.kernels entry point."""

from tessera.kernels import register

from .attention import paged_attention
from .cache_write import reshape_and_cache

_registered = False


def register_all() -> None:
    global _registered
    if _registered:
        return
    register("paged_attention", "cpu")(paged_attention)
    register("reshape_and_cache", "cpu")(reshape_and_cache)
    _registered = True


__all__ = ["paged_attention", "register_all", "reshape_and_cache"]
