"""Which part of a weight a tensor-parallel rank holds. Size 1 is the whole weight; a packed
(GGUF) weight is cut along whole rows, or along whole blocks of its inputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tessera.formats import BLOCK_LAYOUT, EXL2Tensor, FormatError, GPTQTensor, QuantizedTensor


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


def narrow_cols(t, start: int, length: int):
    """Input columns ``start:start+length``; a packed weight only at whole blocks."""
    if isinstance(t, _GROUPED):
        return _grouped_part(t, start, length, 1)
    if isinstance(t, QuantizedTensor):
        block, size = BLOCK_LAYOUT[t.scheme]
        if start % block or length % block:
            raise FormatError(
                f"a {t.scheme} weight can be split only at multiples of {block} inputs "
                f"(asked for {start}:{start + length})"
            )
        rows = t.data.reshape(t.shape[0], -1)
        cut = rows[:, start // block * size : (start + length) // block * size].contiguous()
        return QuantizedTensor(t.scheme, cut, (t.shape[0], length))
    return t.narrow(-1, start, length)


def shape_of(t) -> tuple[int, ...]:
    return tuple(t.shape)


def to_dense(t, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A float tensor in ``dtype`` on ``device`` (a packed one dequantized)."""
    if isinstance(t, (QuantizedTensor, *_GROUPED)):
        return t.to(device).dequantize(dtype)
    return t.to(device=device, dtype=dtype)
