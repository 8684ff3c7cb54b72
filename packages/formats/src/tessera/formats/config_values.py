"""Values read out of a model's config (HF config.json, GGUF metadata), refused by name when a
model can't use them: counts that are not positive integers, heads that don't divide, sizes that
disagree with the tensors the file holds.

Every reader checks here before it builds anything, so a hostile file (``block_count = 2**40``,
``num_attention_heads: 0``, ``num_hidden_layers: 1e9``) is one FormatError, not a traceback or
a process that grows without limit.
"""

from __future__ import annotations

import math

from .errors import FormatError

# Beyond int32 no real model has a dimension, a head count or a context length; kernels index
# with int32, and a number this size is a damaged or hostile file.
MAX_SIZE = 2**31 - 1


def shown(value, limit: int = 40) -> str:
    """``value`` as a message quotes it: at most a short prefix of a huge string, list or number."""
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, int):
        if value.bit_length() > 128:  # str() of a huge int is slow, and refused past 4300 digits
            return f"an integer of {value.bit_length()} bits"
        return str(value)
    if isinstance(value, str):
        return repr(value) if len(value) <= limit else repr(value[:limit]) + f"... ({len(value)} characters)"
    if isinstance(value, (list, tuple)):
        head = ", ".join(shown(v, limit // 4) for v in value[:4])
        return f"[{head}]" if len(value) <= 4 else f"[{head}, ...] ({len(value)} items)"
    if isinstance(value, dict):
        return f"an object with {len(value)} keys" if value else "{}"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def short_name(name: str, limit: int = 80) -> str:
    """A key or tensor name from a file as a message quotes it: unquoted, cut if it is huge."""
    return name if len(name) <= limit else f"{name[:limit]}... ({len(name)} characters)"


def read_int(value, key: str, source, *, minimum: int = 1, maximum: int = MAX_SIZE) -> int:
    """``value`` if it is an integer (not a float, string or bool) in [minimum, maximum]."""
    if value is None:
        raise FormatError(f"{source}: {key} is missing")
    if isinstance(value, bool) or not isinstance(value, int):
        raise FormatError(f"{source}: {key} is {shown(value)}, not an integer")
    if value < minimum:
        raise FormatError(f"{source}: {key} is {shown(value)}, must be at least {minimum}")
    if value > maximum:
        raise FormatError(f"{source}: {key} is {shown(value)}, more than the largest allowed ({maximum})")
    return value


def read_optional_int(value, key: str, source, *, minimum: int = 0, maximum: int = MAX_SIZE) -> int | None:
    return None if value is None else read_int(value, key, source, minimum=minimum, maximum=maximum)


def read_float(value, key: str, source) -> float:
    """A finite number above zero (an int is fine: JSON writes 10000.0 as 10000)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FormatError(f"{source}: {key} is {shown(value)}, not a number")
    if isinstance(value, int) and value.bit_length() > 1000:
        raise FormatError(f"{source}: {key} is {shown(value)}, too large")
    v = float(value)
    if not math.isfinite(v) or v <= 0:
        raise FormatError(f"{source}: {key} is {shown(value)}, must be a finite number above zero")
    return v


def read_bool(value, key: str, source, default: bool = False) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise FormatError(f"{source}: {key} is {shown(value)}, not true or false")
    return value


def read_token_ids(value, key: str, source) -> tuple[int, ...]:
    """An id or a list of ids (HF ``eos_token_id``), or None."""
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    if len(values) > 1024:
        raise FormatError(f"{source}: {key} is {shown(value)}, more token ids than any model has")
    return tuple(read_int(v, key, source, minimum=0) for v in values)


def head_dim_for(
    hidden: int, heads: int, kv_heads: int, head_dim: int | None, keys: tuple[str, str, str, str], source
) -> int:
    """The per-head size, checking that the head counts divide as attention needs.

    ``keys`` names hidden size, heads, kv heads and head dim as the file spells them.
    """
    hidden_key, heads_key, kv_key, head_dim_key = keys
    if kv_heads > heads or heads % kv_heads:
        raise FormatError(
            f"{source}: {heads_key} {heads} is not a multiple of {kv_key} {kv_heads} "
            "(each key/value head serves a whole group of query heads)"
        )
    if head_dim is None:
        if hidden % heads:
            raise FormatError(f"{source}: {hidden_key} {hidden} is not a multiple of {heads_key} {heads}")
        head_dim = hidden // heads
        shown_key = f"{hidden_key} / {heads_key}"
    else:
        shown_key = head_dim_key
    if head_dim % 2:
        raise FormatError(
            f"{source}: {shown_key} is {head_dim}, must be even (rotary embeddings rotate pairs)"
        )
    return head_dim


def check_layer_count(n_layers: int, key: str, source, indices: set[int], holder: str, unit: str) -> None:
    """The config's layer count must be exactly the layers whose tensors ``holder`` holds."""
    if len(indices) == n_layers and max(indices, default=-1) == n_layers - 1:
        return
    if not indices:
        held = f"no {unit} tensors"
    else:
        plural = "" if len(indices) == 1 else "s"
        held = f"tensors of {len(indices)} {unit}{plural} (numbered up to {max(indices)})"
    raise FormatError(f"{source}: {key} is {n_layers} but {holder} holds {held}")


def check_embedding(
    vocab: int, hidden: int, keys: tuple[str, str], source, tensor: str, shape: tuple[int, ...]
) -> None:
    """The embedding tensor (``shape`` as [vocab, hidden]) must agree with the config."""
    vocab_key, hidden_key = keys
    if len(shape) != 2:
        raise FormatError(f"{source}: tensor {tensor} has shape {list(shape)}, expected [{vocab}, {hidden}]")
    if shape[0] != vocab:
        raise FormatError(f"{source}: {vocab_key} is {vocab} but tensor {tensor} has {shape[0]} rows")
    if shape[1] != hidden:
        raise FormatError(f"{source}: {hidden_key} is {hidden} but tensor {tensor} has {shape[1]} columns")
