"""Integer groups: the one form GPTQ, AWQ and EXL2 weights share, and its GGUF-block containers.

A ``GroupQuant`` is a matrix ``W [out, in]`` stored with its input columns in some order
(``perm``: stored column j is input ``perm[j]``; act-order GPTQ and EXL2 put the columns that
matter most first) and cut along that stored order into groups; every weight of a group is
``scale * (q - zero)`` with its output row's scale and zero for that group and ``q`` an
unsigned integer of the group's bit width. GPTQ has one bit width and equal groups; EXL2 mixes
bit widths along the inputs of one matrix.

``blocks()`` re-expresses it, exactly up to fp16 rounding of the scales, as GGUF blocks of 32
stored inputs that every kernel backend already multiplies packed: runs of groups of at most
4 bits as Q4_1 (``d = scale``, ``m = -scale * zero``), 5 bits as Q5_1, and 6-8 bits as Q8_0
holding ``q - zero`` as int8. A 2- or 3-bit group takes a 4-bit container (more bytes than its
own bits: the price of multiplying it with the int8 kernels of the GGUF path).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import torch

from .gguf_quants import BLOCK_LAYOUT
from .quantized import QuantizedTensor

BLOCK_ROWS = 2048  # rows GroupQuant.blocks makes at a time

CONTAINER_BITS = {"Q4_1": 4, "Q5_1": 5, "Q8_0": 8}


def container(bits: int) -> str:
    """The GGUF scheme that holds ``bits``-bit groups."""
    return "Q4_1" if bits <= 4 else "Q5_1" if bits == 5 else "Q8_0"


@dataclass(frozen=True)
class GroupQuant:
    """``W[:, perm[j]] = scale[:, g] * (q[:, j] - zero[:, g])`` for stored column j in group g."""

    shape: tuple[int, int]  # (out, in)
    q: torch.Tensor  # uint8 [out, in] in stored order; values below 2**bits of their group
    scale: torch.Tensor  # float32 [out, groups]
    zero: torch.Tensor  # float32 [out, groups], integers
    group_starts: tuple[int, ...]  # groups + 1 boundaries in stored order: 0, ..., in
    group_bits: tuple[int, ...]  # the bit width of each group
    perm: torch.Tensor | None = None  # int64 [in]; None: stored order is input order

    def __post_init__(self) -> None:
        n_out, n_in = self.shape
        g = len(self.group_bits)
        if len(self.group_starts) != g + 1 or self.group_starts[0] != 0 or self.group_starts[-1] != n_in:
            raise ValueError(f"group boundaries {self.group_starts[:4]}... do not cut {n_in} inputs in {g}")
        if any(b <= a for a, b in pairwise(self.group_starts)):
            raise ValueError("group boundaries must increase")
        if any(not 1 <= b <= 8 for b in self.group_bits):
            raise ValueError(f"group bit widths {sorted(set(self.group_bits))} outside 1..8")
        if tuple(self.q.shape) != (n_out, n_in) or self.q.dtype != torch.uint8:
            raise ValueError(f"q must be uint8 {[n_out, n_in]}, not {self.q.dtype} {list(self.q.shape)}")
        for name in ("scale", "zero"):
            t = getattr(self, name)
            if tuple(t.shape) != (n_out, g):
                raise ValueError(f"{name} must be [{n_out}, {g}], not {list(t.shape)}")
        if self.perm is not None and tuple(self.perm.shape) != (n_in,):
            raise ValueError(f"perm must have {n_in} entries, not {list(self.perm.shape)}")

    @property
    def groups(self) -> int:
        return len(self.group_bits)

    @property
    def bits_per_weight(self) -> float:
        """Stored integer bits per weight (scales, zeros and perm not counted)."""
        sizes = [b - a for a, b in pairwise(self.group_starts)]
        return sum(s * b for s, b in zip(sizes, self.group_bits, strict=True)) / self.shape[1]

    def column_groups(self) -> torch.Tensor:
        """The group of each stored column, int64 ``[in]``."""
        sizes = torch.tensor([b - a for a, b in pairwise(self.group_starts)])
        return torch.repeat_interleave(torch.arange(self.groups), sizes).to(self.q.device)

    def dequantize_stored(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``[out, in]`` with the columns in stored order."""
        g = self.column_groups()
        w = (self.q.float() - self.zero.float()[:, g]) * self.scale.float()[:, g]
        return w.to(dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``[out, in]`` with the columns in input order."""
        w = self.dequantize_stored(torch.float32)
        if self.perm is not None:
            w = torch.empty_like(w).index_copy_(1, self.perm.to(w.device), w)
        return w.to(dtype)

    def runs(self) -> list[tuple[int, int, str]]:
        """Stored-order ranges ``(k0, k1, scheme)`` of consecutive groups with one container."""
        out: list[tuple[int, int, str]] = []
        for i, bits in enumerate(self.group_bits):
            a, b, scheme = self.group_starts[i], self.group_starts[i + 1], container(bits)
            if out and out[-1][2] == scheme:
                out[-1] = (out[-1][0], b, scheme)
            else:
                out.append((a, b, scheme))
        return out

    def blocks(self) -> list[tuple[int, int, QuantizedTensor]] | None:
        """The matrix as GGUF blocks, one ``(k0, k1, QuantizedTensor [out, k1 - k0])`` per run
        of ``runs()``, in stored order; None where it does not map exactly: a group boundary
        off a multiple of 32, a scale or ``scale * zero`` beyond fp16, or an 8-bit group whose
        ``q - zero`` leaves int8. Made ``BLOCK_ROWS`` rows at a time, so that the temporaries
        stay small beside the result (an LM head of 49,152 rows at load)."""
        if any(s % 32 for s in self.group_starts):
            return None
        g = self.column_groups()
        n_out = self.shape[0]
        parts = []
        for k0, k1, scheme in self.runs():
            nb = (k1 - k0) // 32
            first = g[k0:k1:32]  # the group of each 32-block (groups are whole blocks)
            data = torch.empty(n_out, nb * BLOCK_LAYOUT[scheme][1], dtype=torch.uint8, device=self.q.device)
            for r0 in range(0, n_out, BLOCK_ROWS):
                r1 = min(r0 + BLOCK_ROWS, n_out)
                rows = _block_rows(
                    self.q[r0:r1, k0:k1], self.scale[r0:r1, first], self.zero[r0:r1, first], scheme
                )
                if rows is None:
                    return None
                data[r0:r1] = rows
            parts.append((k0, k1, QuantizedTensor(scheme, data, (n_out, k1 - k0))))
        return parts

    def to(self, device: torch.device | str) -> GroupQuant:
        perm = None if self.perm is None else self.perm.to(device)
        return GroupQuant(
            self.shape, self.q.to(device), self.scale.to(device), self.zero.to(device),
            self.group_starts, self.group_bits, perm,
        )  # fmt: skip


def _block_rows(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: str) -> torch.Tensor | None:
    """Rows ``q [r, 32 nb]`` (one scale and zero per 32-block: ``[r, nb]``) as ``scheme`` blocks
    ``[r, nb * block bytes]``; None where they do not map exactly (see ``GroupQuant.blocks``)."""
    r, nb = scale.shape
    q = q.reshape(r, nb, 32)
    d = scale.float()
    z = zero.float()
    d16 = d.to(torch.float16)
    if not d16.isfinite().all():
        return None
    if scheme == "Q8_0":
        v = q.to(torch.int16) - z.to(torch.int16)[..., None]
        if v.min() < -128 or v.max() > 127:
            return None
        body = [v.to(torch.int8).view(torch.uint8)]
        heads = [d16]
    else:
        m16 = (-d * z).to(torch.float16)
        if not m16.isfinite().all():
            return None
        heads = [d16, m16]
        lo = q[..., :16] & 0x0F
        hi = q[..., 16:] & 0x0F
        body = []
        if scheme == "Q5_1":
            bit4 = ((q >> 4) & 1).to(torch.int64)
            qh = (bit4 << torch.arange(32, device=q.device)).sum(-1).to(torch.int32)
            body.append(qh.contiguous().view(torch.uint8).reshape(r, nb, 4))
        body.append((lo | (hi << 4)).to(torch.uint8))
    halves = [t.contiguous().view(torch.uint8).reshape(r, nb, 2) for t in heads]
    return torch.cat([*halves, *body], dim=-1).reshape(r, -1)
