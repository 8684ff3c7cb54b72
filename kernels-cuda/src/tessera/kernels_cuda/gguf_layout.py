"""GGUF blocks repacked, once at load, into the planes the Triton quantized matmuls read.

Every scheme becomes ``weight = d * (q - ZERO) + m`` with q unsigned, ``d`` fp16 per sub-block of
``GROUP`` inputs (32; 16 for Q6_K) and ``m`` fp16 per 32 inputs where the scheme stores a minimum
(Q4_1, Q5_1, Q4_K, Q5_K; else m = 0 and ZERO carries the offset: Q4_0 8, Q5_0 16, Q8_0 128,
Q6_K 32). q is split into bit planes of int32 words, each plane row-major by output row:

- ``lo`` ``[N, K/8]``: the low 4 bits, word w holding inputs 8w..8w+7 (input 8w + i in bits 4i..4i+3);
- ``hi`` ``[N, K*HI_BITS/32]``: the bits above 4 (1 for Q5_*, 2 for Q6_K, 4 for Q8_0), word w
  holding ``32/HI_BITS`` consecutive inputs, HI_BITS bits each, lowest input in the lowest bits.

So a tile of rows x 128 inputs is, per row, 64 consecutive bytes of ``lo`` (plus 16, 32 or 64
of ``hi``): whole 32-byte sectors, 16-byte (cp.async) loads, no byte shuffles. A 5-bit weight costs 5 bits
(not the 8 of a byte form), Q6_K 6.

The files' values are kept exactly: Q4_0..Q8_0's d and m are the blocks' own fp16 numbers, and
``d * (q - ZERO) + m`` in fp32 rounds like ggml's dequantizers (the product is exact). The
K-quants' two-level scales are folded, as the CPU backend does, into one fp16 pair per sub-block:
``d = fp16(d_super * scale)``, ``m = fp16(-dmin * min)`` (Q6_K: ``d = fp16(d_super * scale)``).
That is the one rounding (relative 2^-11, far below a 4-6 bit step); a sub-block whose folded
scale overflows fp16 makes :func:`repack` return None and the caller keeps the exact weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Form:
    """How one GGUF scheme reads in the repacked planes."""

    block: int  # inputs per GGUF block
    block_bytes: int
    hi_bits: int  # bits of q above the low 4 (0, 1, 2 or 4)
    group: int  # inputs per d
    zero: int  # the offset subtracted from q
    has_m: bool  # m stored per 32 inputs


FORMS: dict[str, Form] = {
    "Q4_0": Form(32, 18, 0, 32, 8, False),
    "Q4_1": Form(32, 20, 0, 32, 0, True),
    "Q5_0": Form(32, 22, 1, 32, 16, False),
    "Q5_1": Form(32, 24, 1, 32, 0, True),
    "Q8_0": Form(32, 34, 4, 32, 128, False),
    "Q4_K": Form(256, 144, 0, 32, 0, True),
    "Q5_K": Form(256, 176, 1, 32, 0, True),
    "Q6_K": Form(256, 210, 2, 16, 32, False),
}

# rows decoded at a time: bounds the intermediate uint8/int64 tensors of a big matrix
_CHUNK_VALUES = 1 << 24


def _f16(b: torch.Tensor, off: int) -> torch.Tensor:
    """The fp16 at byte ``off`` of every block: ``[n_blocks]``."""
    return b[:, off : off + 2].contiguous().view(torch.float16).reshape(-1)


def _nibbles32(qs: torch.Tensor) -> torch.Tensor:
    """A 32-block's 16 bytes as 32 quants: low nibbles are inputs 0..15, high ones 16..31."""
    return torch.cat([qs & 15, qs >> 4], dim=-1)


def _bits32(qh: torch.Tensor) -> torch.Tensor:
    """4 bytes ``[n, 4]`` little-endian -> bit i of the 32-bit word at position i ``[n, 32]``."""
    shifts = torch.arange(8, dtype=torch.uint8, device=qh.device)
    return ((qh.unsqueeze(-1) >> shifts) & 1).reshape(qh.shape[0], 32)


def _scale_min_k4(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's get_scale_min_k4 for all 8 sub-blocks: 12 bytes ``[n, 12]`` -> 6-bit scales, mins."""
    s = s.to(torch.int32)
    sc_lo, mn_lo = s[:, 0:4] & 63, s[:, 4:8] & 63
    sc_hi = (s[:, 8:12] & 15) | ((s[:, 0:4] >> 6) << 4)
    mn_hi = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return torch.cat([sc_lo, sc_hi], dim=1), torch.cat([mn_lo, mn_hi], dim=1)


def _decode(scheme: str, b: torch.Tensor):
    """Blocks ``[n, block_bytes]`` -> (q uint8 ``[n, block]``, d fp16 ``[n, block/group]``,
    m fp16 ``[n, block/32]`` or None)."""
    n = b.shape[0]
    if scheme == "Q4_0":
        return _nibbles32(b[:, 2:18]), _f16(b, 0)[:, None], None
    if scheme == "Q4_1":
        return _nibbles32(b[:, 4:20]), _f16(b, 0)[:, None], _f16(b, 2)[:, None]
    if scheme in ("Q5_0", "Q5_1"):
        off = 4 if scheme == "Q5_1" else 2
        q = _nibbles32(b[:, off + 4 : off + 20]) | (_bits32(b[:, off : off + 4]) << 4)
        return q, _f16(b, 0)[:, None], (_f16(b, 2)[:, None] if scheme == "Q5_1" else None)
    if scheme == "Q8_0":
        return b[:, 2:34] ^ 0x80, _f16(b, 0)[:, None], None  # int8 + 128 as a byte
    if scheme in ("Q4_K", "Q5_K"):
        qs = b[:, 16:144] if scheme == "Q4_K" else b[:, 48:176]
        qs = qs.reshape(n, 4, 1, 32)
        # 32-byte runs: low nibbles are sub-block 2j, high ones 2j + 1
        q = torch.cat([qs & 15, qs >> 4], dim=2).reshape(n, 256)
        if scheme == "Q5_K":
            shifts = torch.arange(8, dtype=torch.uint8, device=b.device)[None, :, None]
            q = q | ((((b[:, None, 16:48] >> shifts) & 1) << 4).reshape(n, 256))
        sc, mn = _scale_min_k4(b[:, 4:16])
        d = _f16(b, 0).float()[:, None] * sc.float()
        m = -_f16(b, 2).float()[:, None] * mn.float()
        return q, d.half(), m.half()
    if scheme == "Q6_K":
        ql = b[:, 0:128].reshape(n, 2, 1, 64)
        qh = b[:, 128:192].reshape(n, 2, 1, 32)
        # per half of 128: planes k = 0..3 of 32 inputs; ql low nibbles then high, qh 2 bits each
        lo = torch.cat([ql[..., :32] & 15, ql[..., 32:] & 15, ql[..., :32] >> 4, ql[..., 32:] >> 4], dim=2)
        shifts = (2 * torch.arange(4, dtype=torch.uint8, device=b.device))[None, None, :, None]
        q = (lo | (((qh >> shifts) & 3) << 4)).reshape(n, 256)
        sc = b[:, 192:208].contiguous().view(torch.int8).float()
        return q, (_f16(b, 208).float()[:, None] * sc).half(), None
    raise ValueError(f"no GPU layout for {scheme}")


def _pack(q: torch.Tensor, bits: int, shift: int) -> torch.Tensor:
    """Bits ``shift .. shift + bits - 1`` of every q ``[R, K]`` packed 32/bits to an int32 word."""
    per = 32 // bits
    r, k = q.shape
    v = ((q >> shift) & ((1 << bits) - 1)).to(torch.int64).reshape(r, k // per, per)
    v = (v << (bits * torch.arange(per, device=q.device))).sum(-1)
    return torch.where(v >= 1 << 31, v - (1 << 32), v).to(torch.int32)


@dataclass
class Planes:
    lo: torch.Tensor  # int32 [N, K/8]
    hi: torch.Tensor | None  # int32 [N, K*hi_bits/32]
    d: torch.Tensor  # fp16 [N, K/group]
    m: torch.Tensor | None  # fp16 [N, K/32]


def repack(scheme: str, rows: torch.Tensor, k: int) -> Planes | None:
    """GGUF rows ``[N, bytes_per_row]`` (uint8, any device) of ``k`` inputs -> the planes, on the
    same device; None where a K-quant's folded scale does not fit fp16."""
    f = FORMS[scheme]
    n = rows.shape[0]
    dev = rows.device
    lo = torch.empty(n, k // 8, dtype=torch.int32, device=dev)
    hi = torch.empty(n, k * f.hi_bits // 32, dtype=torch.int32, device=dev) if f.hi_bits else None
    d = torch.empty(n, k // f.group, dtype=torch.float16, device=dev)
    m = torch.empty(n, k // 32, dtype=torch.float16, device=dev) if f.has_m else None
    step = max(1, _CHUNK_VALUES // k)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        blocks = rows[r0:r1].reshape(-1, f.block_bytes)
        q, dd, mm = _decode(scheme, blocks)
        if not torch.isfinite(dd).all() or (mm is not None and not torch.isfinite(mm).all()):
            return None
        q = q.reshape(r1 - r0, k)
        lo[r0:r1] = _pack(q, 4, 0)
        if hi is not None:
            hi[r0:r1] = _pack(q, f.hi_bits, 4)
        d[r0:r1] = dd.reshape(r1 - r0, -1)
        if m is not None:
            m[r0:r1] = mm.reshape(r1 - r0, -1)
    return Planes(lo, hi, d, m)
