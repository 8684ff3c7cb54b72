"""Reference dequantizers for GGUF block formats, in plain torch.

Each function takes the packed bytes of whole blocks as a uint8 tensor ``[n_blocks, type_size]``
and returns float32 values ``[n_blocks, block_size]``. The arithmetic follows ggml's own
``dequantize_row_*`` (float32 products in the same order), so results match bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

QK_K = 256

# scheme -> (values per block, bytes per block)
BLOCK_LAYOUT: dict[str, tuple[int, int]] = {
    "F32": (1, 4),
    "F16": (1, 2),
    "BF16": (1, 2),
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q5_0": (32, 22),
    "Q5_1": (32, 24),
    "Q8_0": (32, 34),
    "Q2_K": (256, 84),
    "Q3_K": (256, 110),
    "Q4_K": (256, 144),
    "Q5_K": (256, 176),
    "Q6_K": (256, 210),
}


def _f16(b: torch.Tensor, off: int) -> torch.Tensor:
    """The float16 at byte ``off`` of every block, as float32 ``[n, 1]``."""
    return b[:, off : off + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """Low nibbles of all bytes, then high nibbles: ggml's order for 32-value blocks."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _bits(b: torch.Tensor) -> torch.Tensor:
    """Unpack bytes little-endian into bits: ``[n, k] -> [n, 8k]``, bit i of the stream first."""
    shifts = torch.arange(8, dtype=torch.uint8, device=b.device)
    return ((b.unsqueeze(-1) >> shifts) & 1).reshape(b.shape[0], -1)


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b, 0)
    q = _nibbles(b[:, 2:18]).to(torch.int16) - 8
    return d * q.float()


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b, 0), _f16(b, 2)
    return d * _nibbles(b[:, 4:20]).float() + m


def _q5(b: torch.Tensor, qh_off: int) -> torch.Tensor:
    high = _bits(b[:, qh_off : qh_off + 4]) << 4
    return (_nibbles(b[:, qh_off + 4 : qh_off + 20]) | high).to(torch.int16)


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    return _f16(b, 0) * (_q5(b, 2) - 16).float()


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    return _f16(b, 0) * _q5(b, 4).float() + _f16(b, 2)


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    return _f16(b, 0) * b[:, 2:34].contiguous().view(torch.int8).float()


def _two_bit_planes(qs: torch.Tensor) -> torch.Tensor:
    """Q2_K/Q3_K low bits: each 32-byte half holds four 2-bit planes of 32 values -> ``[n, 256]``."""
    n = qs.shape[0]
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=qs.device)
    planes = (qs.reshape(n, 2, 1, 32) >> shifts.reshape(1, 1, 4, 1)) & 3
    return planes.reshape(n, QK_K)


def _q2_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales = b[:, 0:16]
    q = _two_bit_planes(b[:, 16:80]).float().reshape(n, 16, 16)
    d, dmin = _f16(b, 80), _f16(b, 82)
    dl = (d * (scales & 0x0F).float()).unsqueeze(-1)
    ml = (dmin * (scales >> 4).float()).unsqueeze(-1)
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k_scales(s: torch.Tensor) -> torch.Tensor:
    """Sixteen 6-bit signed scales packed in 12 bytes: low nibbles in bytes 0-7, top 2 bits in 8-11."""
    i = torch.arange(16, device=s.device)
    low = torch.where(i < 8, s[:, i % 8] & 0x0F, s[:, i % 8] >> 4)
    high = (s[:, 8 + i % 4] >> (2 * (i // 4)).to(torch.uint8)) & 3
    return (low | (high << 4)).to(torch.int16) - 32


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    hmask, qs = b[:, 0:32], b[:, 32:96]
    scales = _q3_k_scales(b[:, 96:108]).float()
    d = _f16(b, 108)
    low = _two_bit_planes(qs).to(torch.int16).reshape(n, 2, 4, 32)
    # the high bit of value (half h, plane j, lane l) is bit 4h+j of hmask[l]; a clear bit means -4
    shifts = torch.arange(8, dtype=torch.uint8, device=b.device).reshape(1, 2, 4, 1)
    hbit = ((hmask.reshape(n, 1, 1, 32) >> shifts) & 1).to(torch.int16)
    q = (low - 4 * (1 - hbit)).float().reshape(n, 16, 16)
    dl = (d * scales).unsqueeze(-1)
    return (dl * q).reshape(n, QK_K)


def _k4_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eight 6-bit scales and mins packed in 12 bytes (ggml's get_scale_min_k4)."""
    j = torch.arange(4, device=s.device)
    sc_lo, m_lo = s[:, j] & 63, s[:, j + 4] & 63
    sc_hi = (s[:, j + 8] & 0x0F) | ((s[:, j] >> 6) << 4)
    m_hi = (s[:, j + 8] >> 4) | ((s[:, j + 4] >> 6) << 4)
    return torch.cat([sc_lo, sc_hi], 1).float(), torch.cat([m_lo, m_hi], 1).float()


def _k4_values(qs: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K low bits: each 32-byte chunk gives 32 low nibbles, then 32 high nibbles."""
    n = qs.shape[0]
    chunks = qs.reshape(n, 4, 32)
    return torch.stack([chunks & 0x0F, chunks >> 4], dim=2).reshape(n, 8, 32)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, m = _k4_scale_min(b[:, 4:16])
    q = _k4_values(b[:, 16:144]).float()
    return ((d * sc).unsqueeze(-1) * q - (dmin * m).unsqueeze(-1)).reshape(n, QK_K)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, m = _k4_scale_min(b[:, 4:16])
    qh = b[:, 16:48]
    shifts = torch.arange(8, dtype=torch.uint8, device=b.device).reshape(1, 8, 1)
    high = ((qh.reshape(n, 1, 32) >> shifts) & 1) << 4
    q = (_k4_values(b[:, 48:176]) | high).float()
    return ((d * sc).unsqueeze(-1) * q - (dmin * m).unsqueeze(-1)).reshape(n, QK_K)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql = b[:, 0:128].reshape(n, 2, 2, 32)  # half, which 32-byte run, lane
    qh = b[:, 128:192].reshape(n, 2, 1, 32)
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    d = _f16(b, 208)
    low = torch.cat([ql & 0x0F, ql >> 4], dim=2)  # [n, 2, 4, 32]: plane k uses run k%2
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).reshape(1, 1, 4, 1)
    high = ((qh >> shifts) & 3) << 4
    q = ((low | high).to(torch.int16) - 32).float().reshape(n, 16, 16)
    return ((d * scales).unsqueeze(-1) * q).reshape(n, QK_K)


def _f32(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float32)


def _f16_plain(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).float()


def _bf16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.bfloat16).float()


DEQUANTIZERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "F32": _f32,
    "F16": _f16_plain,
    "BF16": _bf16,
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q5_0": _q5_0,
    "Q5_1": _q5_1,
    "Q8_0": _q8_0,
    "Q2_K": _q2_k,
    "Q3_K": _q3_k,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
}


def dequantize_blocks(scheme: str, data: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Packed bytes of a ``scheme`` tensor -> float32 tensor of ``shape``."""
    block_size, type_size = BLOCK_LAYOUT[scheme]
    blocks = data.reshape(-1, type_size)
    return DEQUANTIZERS[scheme](blocks).reshape(shape)
