"""Which part of a weight a tensor-parallel rank holds, and which numbers of ranks a model splits
over. Size 1 is the whole weight; a packed (GGUF) weight is cut along whole rows, or along whole
blocks of its inputs."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from tessera.formats import BLOCK_LAYOUT, EXL2Tensor, FormatError, GPTQTensor, ModelConfig, QuantizedTensor

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TPInfo:
    rank: int = 0
    size: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"tensor-parallel rank {self.rank} is not in 0..{self.size - 1}")

    def part(self, n: int, what: str) -> tuple[int, int]:
        """(start, length) of this rank's share of ``n`` (which must divide evenly)."""
        if n % self.size:
            raise FormatError(f"{what} of {n} does not split over {self.size} tensor-parallel ranks")
        k = n // self.size
        return self.rank * k, k

    def sizes(self, n: int) -> list[int]:
        """Every rank's share of ``n`` where it need not split evenly (a vocabulary): the first
        ``n % size`` ranks hold one more."""
        return [n // self.size + (r < n % self.size) for r in range(self.size)]

    def uneven_part(self, n: int) -> tuple[int, int]:
        """(start, length) of this rank's share of ``n`` as ``sizes`` splits it."""
        sizes = self.sizes(n)
        return sum(sizes[: self.rank]), sizes[self.rank]


NO_TP = TPInfo()  # one rank: every layer holds its whole weight


_GROUPED = (GPTQTensor, EXL2Tensor)


def _grouped_part(t: GPTQTensor | EXL2Tensor, start: int, length: int, dim: int):
    """A rank's part of a GPTQ/AWQ/EXL2 weight: the whole one as it is; a part, dequantized
    (float32) and cut, since act-order and EXL2's permuted groups do not split along the inputs."""
    if start == 0 and length == t.shape[dim]:
        return t
    return t.dequantize(torch.float32).narrow(dim, start, length)


def narrow_rows(t, start: int, length: int):
    """Rows ``start:start+length`` of a tensor or a packed weight (packed rows move whole)."""
    if isinstance(t, _GROUPED):
        return _grouped_part(t, start, length, 0)
    if isinstance(t, QuantizedTensor):
        rows = t.data.reshape(t.shape[0], -1)
        return QuantizedTensor(t.scheme, rows[start : start + length].contiguous(), (length, *t.shape[1:]))
    return t.narrow(0, start, length)


def narrow_cols(t, start: int, length: int, dense_fallback: bool = False):
    """Input columns ``start:start+length``; a packed weight only at whole blocks, unless
    ``dense_fallback``: then a cut inside a block is dequantized (float32, exact) and cut there."""
    if isinstance(t, _GROUPED):
        return _grouped_part(t, start, length, 1)
    if isinstance(t, QuantizedTensor):
        block, size = BLOCK_LAYOUT[t.scheme]
        if (start % block or length % block) and dense_fallback:
            _warn_dense(t.scheme, block, start, length)
            return t.dequantize(torch.float32).narrow(-1, start, length)
        if start % block or length % block:
            raise FormatError(
                f"a {t.scheme} weight can be split only at multiples of {block} inputs "
                f"(asked for {start}:{start + length})"
            )
        rows = t.data.reshape(t.shape[0], -1)
        cut = rows[:, start // block * size : (start + length) // block * size].contiguous()
        return QuantizedTensor(t.scheme, cut, (t.shape[0], length))
    return t.narrow(-1, start, length)


_warned: set = set()


def _warn_dense(scheme: str, block: int, start: int, length: int) -> None:
    if (scheme, length) not in _warned:
        _warned.add((scheme, length))
        logger.warning(
            "a %s weight's %d inputs per tensor-parallel rank do not fill whole blocks of %d: those "
            "parts are dequantized at load (exact, but held in the compute dtype, not packed)",
            scheme, length, block,
        )  # fmt: skip


def shape_of(t) -> tuple[int, ...]:
    return tuple(t.shape)


def to_dense(t, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A float tensor in ``dtype`` on ``device`` (a packed one dequantized)."""
    if isinstance(t, (QuantizedTensor, *_GROUPED)):
        return t.to(device).dequantize(dtype)
    return t.to(device=device, dtype=dtype)


# -- which numbers of ranks a model splits over -----------------------------------------------


def _refusal(config: ModelConfig, n: int) -> str | None:
    """Why ``config``'s model does not split over ``n`` ranks, or None where it does. Query
    heads split; KV heads split, or are replicated where there are fewer than ranks (each rank
    then holds the one its query heads use); MLP and expert intermediate sizes split; the
    vocabulary splits unevenly."""
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    if heads % n:
        return f"{heads} attention heads do not split over {n} tensor-parallel ranks"
    if kv >= n and kv % n:
        return f"{kv} key/value heads do not split over {n} tensor-parallel ranks"
    if kv < n and n % kv:
        return f"{n} tensor-parallel ranks do not share {kv} key/value heads evenly"
    dense = config.num_experts == 0 or bool(config.dense_layers)
    sizes = (
        ("MLP intermediate size", config.intermediate_size if dense else 0),
        ("experts' intermediate size", config.moe_intermediate_size if config.num_experts else 0),
        ("shared expert's intermediate size", config.shared_expert_intermediate_size),
    )
    for what, size in sizes:
        if size % n:
            return f"the {what} {size} does not split over {n} tensor-parallel ranks"
    if config.vocab_size < n:
        return f"a vocabulary of {config.vocab_size} does not split over {n} tensor-parallel ranks"
    return None


def tensor_parallel_sizes(config: ModelConfig, max_size: int = 8) -> list[int]:
    """The numbers of tensor-parallel ranks, up to ``max_size``, that ``config``'s model splits
    over (as far as the config tells: a packed checkpoint's weights split only at whole blocks
    of inputs, which loading checks)."""
    return [n for n in range(1, max_size + 1) if _refusal(config, n) is None]


def check_tensor_parallel(config: ModelConfig, size: int) -> None:
    """ValueError, before any weight loads, where ``config``'s model does not split over
    ``size`` tensor-parallel ranks: it names the heads and the sizes that would work."""
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"the tensor-parallel size must be a positive integer, not {size!r}")
    why = _refusal(config, size)
    if why is None:
        return
    works = [str(n) for n in tensor_parallel_sizes(config, max(8, size))]
    either = works[0] if len(works) == 1 else f"{', '.join(works[:-1])} or {works[-1]}"
    raise ValueError(
        f"{why} (the model has {config.num_attention_heads} attention heads and "
        f"{config.num_key_value_heads} key/value heads); --tensor-parallel-size {either} would work"
    )
