"""Op signatures, the dispatch registry, and the pure-torch reference of every op."""

from . import moe, ops, reference
from .registry import implementations, lookup, register, unregister
from .weights import RowStack

__all__ = ["RowStack", "implementations", "lookup", "moe", "ops", "reference", "register", "unregister"]
