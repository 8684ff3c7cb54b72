"""exllamav2's EXL2 load and ``reconstruct`` ported line by line to numpy, for tests (its CUDA
kernels can't run here). Follows exllamav2 0.3.2 (turboderp-org/exllamav2 @ da07fac), as built
(``exllamav2_ext/config.h``: QMODE_2BIT..QMODE_6BIT = 1, QMODE_8BIT = 0):

- ``module.py`` ``ExLlamaV2Module.load_weight`` (lines 118-121): reads ``q_weight``, ``q_invperm``,
  ``q_scale``, ``q_scale_max``, ``q_groups`` (and ``bias``); a stored ``q_perm`` is overwritten by
  ``q_perm = argsort(q_invperm).to(int)``.
- ``linear.py`` ``ExLlamaV2Linear.load`` (lines 147-166): ``unmap`` drops q_perm/q_invperm and
  returns the perm; ``output_map`` runs ``tensor_remap(q_weight)`` / ``tensor_remap_4bit(q_scale)``
  (``ext_stloader.cpp`` lines 160-219) over the outputs. ``get_weight_tensor_dq`` (lines 486-494)
  is ``reconstruct`` into ``[in_features, out_features]``.
- ``mlp.py`` ``ExLlamaV2MLP.load`` (lines 161-163): ``down_map = down_proj.load(unmap=True)``, then
  gate_proj and up_proj load with ``output_map=down_map``. So exllamav2 holds gate/up with their
  outputs permuted by down_proj's act-order perm and down_proj without a perm: the product is the
  same, but ``get_weight_tensor_dq`` of these three is a permutation of the checkpoint's weight.
- ``ext.py`` ``make_q_matrix`` (lines 334-341): ``q_scale_max *= prescale / 256`` in fp16,
  ``q_perm``/``q_invperm`` to int16, ``q_group_map = make_group_map(q_groups, q_weight.shape[0])``;
  ``ext_qmatrix.cpp`` ``make_q_matrix`` (lines 21-110: dtypes; ``height = len(q_group_map) / 2``,
  ``width = q_weight.shape[1]``, ``groups = q_scale.shape[0]``) and ``make_group_map`` (341-360).
- ``cuda/q_matrix.cu``: the ``QMatrix`` constructor (rows_8 .. rows_2 from q_groups, made
  cumulative: the kernels read all 8-bit rows, then 6, 5, 4, 3, 2), ``shuffle_kernel`` and
  ``reconstruct_kernel`` (blocks of 128 rows, each finding its q_weight row from the cumulative
  row counts as ``pre_rows / 32 * bits``, stepping 32 rows (16 at 2 bits), switching group when
  ``k == nextgroup``, writing row ``q_perm[k]``).
- ``cuda/quant/qdq_util.cuh`` ``dq_scale`` and ``qdq_{2,3,4,5,6}.cuh`` ``shuffle_*`` and
  ``dequant_*`` (the QMODE 1 branches, half tricks included), ``qdq_8.cuh`` (its fallback).
- ``cuda/matrix_view.cuh`` ``MatrixView_q4_row::item`` (the 4-bit scale of column n).

fp16 arithmetic is numpy's float16 (each operation on two halves rounded once, as __hmul/__hadd);
__hfma2 is computed in float64 and rounded once.
"""

from __future__ import annotations

import numpy as np
import torch

BLOCK_KN_SIZE = 128
C0 = 0x64006400
F16 = np.float16


# -- fp16 helpers (qdq_util.cuh) ---------------------------------------------------------------


def _h2(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``half2_uint32(x).as_half2``: (low half, high half)."""
    x = np.asarray(x, dtype=np.uint32)
    return (x & 0xFFFF).astype(np.uint16).view(F16), (x >> 16).astype(np.uint16).view(F16)


def _hadd2(a, z: float):
    return tuple((v + F16(z)).astype(F16) for v in a)


def _hfma2(a, y: float, z: float):
    y, z = float(F16(y)), float(F16(z))  # __float2half_rn of the constants
    return tuple((v.astype(np.float64) * y + z).astype(F16) for v in a)


def _flat(dq: list) -> list[np.ndarray]:
    """``half* dqh = (half*) dq``: dq[j].low, dq[j].high, ... in order."""
    return [h for pair in dq for h in pair]


def _dq_ns(q: np.ndarray, zero: int) -> np.ndarray:
    return (q.astype(np.int64) - zero).astype(F16)  # __int2half_rn(q - qzero), exact


def _exb(q: np.ndarray, shift: int, mask: int) -> np.ndarray:
    return (q >> shift) & mask


def _exb2(q1: np.ndarray, q0: np.ndarray, shift: int, mask: int) -> np.ndarray:
    """``__funnelshift_rc(q0, q1, shift) & mask``: bits ``shift..`` of the 64-bit ``q1:q0``."""
    v = (q1.astype(np.uint64) << np.uint64(32)) | q0.astype(np.uint64)
    return ((v >> np.uint64(shift)) & np.uint64(mask)).astype(np.uint32)


# -- shuffles (in place on rows of a uint32 [rows, width] array) -------------------------------


def _shuffle_2bit_16(q: np.ndarray, r: int) -> None:
    qa = q[r].copy()
    qb = np.zeros_like(qa)
    for i in range(8):
        qa0 = qa & 0x03
        qa1 = (qa & 0x0C) >> 2
        qa >>= 4
        qb |= qa1 << (i * 2 + 16)
        qb |= qa0 << (i * 2)
    q[r] = qb


def _shuffle_3bit_32(q: np.ndarray, r: int) -> None:
    qa, qb, qc = q[r].copy(), q[r + 1].copy(), q[r + 2].copy()
    qd = qc >> 26
    qc <<= 4
    qc |= qb >> 28
    qb <<= 2
    qb |= qa >> 30
    za, zb, zc = (np.zeros_like(qa) for _ in range(3))
    for src, dst in ((qa, za), (qb, zb), (qc, zc)):
        for i in range(5):
            t0 = src & 0x07
            t1 = (src & 0x38) >> 3
            src >>= 6
            dst |= t0 << (i * 3)
            dst |= t1 << (i * 3 + 16)
    za |= ((qd & 0x01) >> 0) << 15
    zb |= ((qd & 0x02) >> 1) << 15
    zc |= ((qd & 0x04) >> 2) << 15
    za |= ((qd & 0x08) >> 3) << 31
    zb |= ((qd & 0x10) >> 4) << 31
    zc |= ((qd & 0x20) >> 5) << 31
    q[r], q[r + 1], q[r + 2] = za, zb, zc


def _shuffle_4bit_8(q: np.ndarray, r: int) -> None:
    qa = q[r].copy()
    qb = np.zeros_like(qa)
    for i in range(4):
        qa0 = qa & 0x0F
        qa1 = (qa & 0xF0) >> 4
        qa >>= 8
        qb |= qa1 << (i * 4 + 16)
        qb |= qa0 << (i * 4)
    q[r] = qb


def _shuffle_5bit_32(q: np.ndarray, r: int) -> None:
    qa, qb, qc, qd, qe = (q[r + i].copy() for i in range(5))
    qf = qe >> 22
    qe <<= 8
    qe |= qd >> 24
    qd <<= 6
    qd |= qc >> 26
    qc <<= 4
    qc |= qb >> 28
    qb <<= 2
    qb |= qa >> 30
    z = [np.zeros_like(qa) for _ in range(5)]
    for src, dst in zip((qa, qb, qc, qd, qe), z, strict=True):
        for i in range(3):
            t0 = src & 0x1F
            t1 = (src & 0x3E0) >> 5
            src >>= 10
            dst |= t0 << (i * 5)
            dst |= t1 << (i * 5 + 16)
    for j in range(5):
        z[j] |= ((qf & (1 << j)) >> j) << 15
        z[j] |= ((qf & (1 << (j + 5))) >> (j + 5)) << 31
    for i in range(5):
        q[r + i] = z[i]


def _shuffle_6bit_16(q: np.ndarray, r: int) -> None:
    qa, qb, qc = q[r].copy(), q[r + 1].copy(), q[r + 2].copy()
    m = 0b111111
    q00 = qa & m
    q01 = (qa >> 6) & m
    q02 = (qa >> 12) & m
    q03 = (qa >> 18) & m
    q04 = (qa >> 24) & m
    q05 = ((qa >> 30) & 0b11) | ((qb & 0b1111) << 2)
    q06 = (qb >> 4) & m
    q07 = (qb >> 10) & m
    q08 = (qb >> 16) & m
    q09 = (qb >> 22) & m
    q0a = ((qb >> 28) & 0b1111) | ((qc & 0b11) << 4)
    q0b = (qc >> 2) & m
    q0c = (qc >> 8) & m
    q0d = (qc >> 14) & m
    q0e = (qc >> 20) & m
    q0f = (qc >> 26) & m
    qa = q00 | (q01 << 16) | (q02 << 6) | (q03 << 22)
    qb = q04 | (q05 << 16) | (q06 << 6) | (q07 << 22)
    qc = q08 | (q09 << 16) | (q0a << 6) | (q0b << 22)
    qa |= (q0c & 0b001111) << 12
    qc |= (q0c & 0b110000) << 8
    qa |= (q0d & 0b001111) << 28
    qc |= (q0d & 0b110000) << 24
    qb |= (q0e & 0b001111) << 12
    qc |= (q0e & 0b110000) << 10
    qb |= (q0f & 0b001111) << 28
    qc |= (q0f & 0b110000) << 26
    q[r], q[r + 1], q[r + 2] = qa, qb, qc


# -- dequant (each returns the list of halves dqh[0..]) ----------------------------------------


def _dequant_2bit_16(q_0):
    qa = q_0.copy()
    q0 = _h2((qa & 0x00030003) | C0)
    q1 = _h2((qa & 0x000C000C) | C0)
    q2 = _h2((qa & 0x00300030) | C0)
    q3 = _h2((qa & 0x00C000C0) | C0)
    qa >>= 8
    q4 = _h2((qa & 0x00030003) | C0)
    q5 = _h2((qa & 0x000C000C) | C0)
    q6 = _h2((qa & 0x00300030) | C0)
    q7 = _h2((qa & 0x00C000C0) | C0)
    z1, z4, z16, z64 = -1024.0 - 2, -1024.0 / 4 - 2, -1024.0 / 16 - 2, -1024.0 / 64 - 2
    dq = [
        _hadd2(q0, z1), _hfma2(q1, 1 / 4, z4), _hfma2(q2, 1 / 16, z16), _hfma2(q3, 1 / 64, z64),
        _hadd2(q4, z1), _hfma2(q5, 1 / 4, z4), _hfma2(q6, 1 / 16, z16), _hfma2(q7, 1 / 64, z64),
    ]  # fmt: skip
    return _flat(dq)


def _dequant_3bit_32(q_0, q_1, q_2):
    qa, qb, qc = q_0.copy(), q_1.copy(), q_2.copy()
    q0 = _h2((qa & 0x00070007) | C0)
    q1 = _h2((qa & 0x00380038) | C0)
    qa >>= 6
    q2 = _h2((qa & 0x00070007) | C0)
    q3 = _h2((qa & 0x00380038) | C0)
    q4 = _h2((qa & 0x01C001C0) | C0)
    qa >>= 9
    qa &= 0x00010001
    q5 = _h2((qb & 0x00070007) | C0)
    q6 = _h2((qb & 0x00380038) | C0)
    qb >>= 6
    q7 = _h2((qb & 0x00070007) | C0)
    q8 = _h2((qb & 0x00380038) | C0)
    q9 = _h2((qb & 0x01C001C0) | C0)
    qb >>= 8
    qb &= 0x00020002
    q10 = _h2((qc & 0x00070007) | C0)
    q11 = _h2((qc & 0x00380038) | C0)
    qc >>= 6
    q12 = _h2((qc & 0x00070007) | C0)
    q13 = _h2((qc & 0x00380038) | C0)
    q14 = _h2((qc & 0x01C001C0) | C0)
    qc >>= 7
    qc &= 0x00040004
    q15 = _h2((qa | qb | qc) | C0)
    z1, z8, z64 = -1024.0 - 4, -1024.0 / 8 - 4, -1024.0 / 64 - 4
    y8, y64 = 1 / 8, 1 / 64
    dq = [
        _hadd2(q0, z1), _hfma2(q1, y8, z8), _hadd2(q2, z1), _hfma2(q3, y8, z8), _hfma2(q4, y64, z64),
        _hadd2(q5, z1), _hfma2(q6, y8, z8), _hadd2(q7, z1), _hfma2(q8, y8, z8), _hfma2(q9, y64, z64),
        _hadd2(q10, z1), _hfma2(q11, y8, z8), _hadd2(q12, z1), _hfma2(q13, y8, z8),
        _hfma2(q14, y64, z64), _hadd2(q15, z1),
    ]  # fmt: skip
    return _flat(dq)


def _dequant_4bit_8(q_0):
    qa = q_0.copy()
    q0 = _h2((qa & 0x000F000F) | C0)
    q1 = _h2((qa & 0x00F000F0) | C0)
    qa >>= 8
    q2 = _h2((qa & 0x000F000F) | C0)
    q3 = _h2((qa & 0x00F000F0) | C0)
    z1, z16 = -1024.0 - 8, -1024.0 / 16 - 8
    dq = [_hadd2(q0, z1), _hfma2(q1, 1 / 16, z16), _hadd2(q2, z1), _hfma2(q3, 1 / 16, z16)]
    return _flat(dq)


def _dequant_5bit_32(q_0, q_1, q_2, q_3, q_4):
    qa, qb, qc, qd, qe = (x.copy() for x in (q_0, q_1, q_2, q_3, q_4))
    q0 = _h2((qa & 0x001F001F) | C0)
    q1 = _h2((qa & 0x03E003E0) | C0)
    qa >>= 10
    q2 = _h2((qa & 0x001F001F) | C0)
    qa >>= 5
    qa &= 0x00010001
    q3 = _h2((qb & 0x001F001F) | C0)
    q4 = _h2((qb & 0x03E003E0) | C0)
    qb >>= 10
    q5 = _h2((qb & 0x001F001F) | C0)
    qb >>= 4
    qb &= 0x00020002
    q6 = _h2((qc & 0x001F001F) | C0)
    q7 = _h2((qc & 0x03E003E0) | C0)
    qc >>= 10
    q8 = _h2((qc & 0x001F001F) | C0)
    qc >>= 3
    qc &= 0x00040004
    q9 = _h2((qd & 0x001F001F) | C0)
    q10 = _h2((qd & 0x03E003E0) | C0)
    qd >>= 10
    q11 = _h2((qd & 0x001F001F) | C0)
    qd >>= 2
    qd &= 0x00080008
    q12 = _h2((qe & 0x001F001F) | C0)
    q13 = _h2((qe & 0x03E003E0) | C0)
    qe >>= 10
    q14 = _h2((qe & 0x001F001F) | C0)
    qe >>= 1
    qe &= 0x00100010
    q15 = _h2((qa | qb | qc | qd | qe) | C0)
    z1, z32, y32 = -1024.0 - 16, -1024.0 / 32 - 16, 1 / 32
    dq = [
        _hadd2(q0, z1), _hfma2(q1, y32, z32), _hadd2(q2, z1),
        _hadd2(q3, z1), _hfma2(q4, y32, z32), _hadd2(q5, z1),
        _hadd2(q6, z1), _hfma2(q7, y32, z32), _hadd2(q8, z1),
        _hadd2(q9, z1), _hfma2(q10, y32, z32), _hadd2(q11, z1),
        _hadd2(q12, z1), _hfma2(q13, y32, z32), _hadd2(q14, z1),
        _hadd2(q15, z1),
    ]  # fmt: skip
    return _flat(dq)


def _dequant_6bit_16(q_0, q_1, q_2):
    qa, qb, qc = q_0.copy(), q_1.copy(), q_2.copy()
    q0 = _h2((qa & 0x003F003F) | C0)
    qa >>= 6
    q1 = _h2((qa & 0x003F003F) | C0)
    qa >>= 6
    q2 = _h2((qb & 0x003F003F) | C0)
    qb >>= 6
    q3 = _h2((qb & 0x003F003F) | C0)
    qb >>= 6
    q4 = _h2((qc & 0x003F003F) | C0)
    qc >>= 6
    q5 = _h2((qc & 0x003F003F) | C0)
    qc >>= 2
    q6 = _h2((qa & 0x000F000F) | (qc & 0x00300030) | C0)
    qc >>= 2
    q7 = _h2((qb & 0x000F000F) | (qc & 0x00300030) | C0)
    z1 = -1024.0 - 32
    return _flat([_hadd2(v, z1) for v in (q0, q1, q2, q3, q4, q5, q6, q7)])


def _dequant_8bit_8(q_0, q_1):  # QMODE_8BIT 0: the fallback
    return [_dq_ns(_exb(q_0, i * 8, 0xFF), 128) for i in range(4)] + [
        _dq_ns(_exb(q_1, i * 8, 0xFF), 128) for i in range(4)
    ]


def _unshuffled_dequant(bits: int, words: list[np.ndarray]) -> list[np.ndarray]:
    """The ``#else`` (QMODE 0) dequant of ``qdq_{bits}.cuh``: the values as pack_columns stored
    them, before any shuffle; used to check the shuffled path above against the plain layout."""
    if bits in (2, 4, 8):
        per = 32 // bits
        zero = 1 << (bits - 1)
        return [_dq_ns(_exb(w, i * bits, (1 << bits) - 1), zero) for w in words for i in range(per)]
    zero, mask = 1 << (bits - 1), (1 << bits) - 1
    out = []
    for i in range(32 if bits != 6 else 16):
        j = i * bits
        k, s = divmod(j, 32)
        v = _exb(words[k], s, mask) if s + bits <= 32 else _exb2(words[k + 1], words[k], s, mask)
        out.append(_dq_ns(v, zero))
    return out


# -- load (module.py, linear.py, mlp.py, ext.py) -----------------------------------------------


def load_weight(parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``ExLlamaV2Module.load_weight``'s EXL2 branch: the parts it reads, q_perm from q_invperm."""
    keys = ("q_weight", "q_invperm", "q_scale", "q_scale_max", "q_groups", "bias")
    w = {k: parts[k].clone() for k in keys if k in parts}
    w["q_perm"] = torch.argsort(w["q_invperm"]).to(torch.int)
    return w


def unmap(w: dict) -> torch.Tensor:
    """``ExLlamaV2Linear.load(unmap=True)``: drop the perm from ``w`` and return it."""
    perm = w.pop("q_perm").cpu()
    del w["q_invperm"]
    return perm


def remap_outputs(w: dict, output_map: torch.Tensor) -> None:
    """``ExLlamaV2Linear.load(output_map=...)``: ``tensor_remap`` of q_weight (output column c
    takes column ``map[c]``) and ``tensor_remap_4bit`` of q_scale (nibble c takes nibble map[c])."""
    assert output_map.dtype == torch.int32 and w["q_weight"].dtype == torch.int32
    idx = output_map.long()
    w["q_weight"] = w["q_weight"][:, idx].contiguous()
    qs = w["q_scale"].numpy().view(np.uint32)
    nib = (qs[:, :, None] >> (np.arange(8, dtype=np.uint32) * 4)) & 0xF
    nib = nib.reshape(qs.shape[0], -1)[:, idx.numpy()].reshape(qs.shape[0], -1, 8).astype(np.uint32)
    packed = np.bitwise_or.reduce(nib << (np.arange(8, dtype=np.uint32) * 4), axis=2).astype(np.uint32)
    w["q_scale"] = torch.from_numpy(packed.view(np.int32).copy())


def make_group_map(q_groups: np.ndarray, num_qrows: int) -> np.ndarray:
    """``ext_qmatrix.cpp`` ``make_group_map``: per input row (group index, rows left in group)."""
    gr = q_groups.astype(np.int16)
    num_groups = len(gr) // 2
    out = []
    for i in range(num_groups):
        bits = int(gr[i * 2])
        end = int(gr[i * 2 + 3]) if i < num_groups - 1 else num_qrows
        qrows = end - int(gr[i * 2 + 1])
        rows = (qrows * 32) // bits  # C integer division, both non-negative here
        for j in range(rows):
            out += [i, rows - j]
    return np.array(out, dtype=np.int16)


class QMatrix:
    """``make_q_matrix`` (ext.py and ext_qmatrix.cpp) and ``QMatrix`` (q_matrix.cu), EXL2 only."""

    def __init__(self, w: dict, prescale: float = 1.0):
        for name, dtype in (("q_weight", torch.int32), ("q_scale", torch.int32), ("q_groups", torch.int16)):
            assert w[name].dtype == dtype, f"TORCH_CHECK_DTYPE({name}): {w[name].dtype}"
        max_scale = w["q_scale_max"].clone()
        assert max_scale.dtype == torch.float16, "TORCH_CHECK_DTYPE(q_scale_max, kHalf)"
        max_scale *= prescale / 256
        self.q_scale_max = max_scale.numpy()
        self.q_perm = w["q_perm"].short().numpy().view(np.uint16) if "q_perm" in w else None
        q_weight = w["q_weight"].numpy().view(np.uint32).copy()
        self.q_scale = w["q_scale"].numpy().view(np.uint32)
        q_groups = w["q_groups"].numpy().view(np.uint16)  # cpu_q_groups in the constructor
        self.group_map = make_group_map(w["q_groups"].numpy(), q_weight.shape[0]).view(np.uint16)
        self.height = len(self.group_map) // 2
        self.width = q_weight.shape[1]
        self.groups = self.q_scale.shape[0]
        assert self.q_scale.shape[1] * 8 == self.width and len(self.q_scale_max) == self.groups

        rows = dict.fromkeys((8, 6, 5, 4, 3, 2), 0)
        row = 0
        for i in range(self.groups):
            bits = int(q_groups[i * 2])
            if i < self.groups - 1:
                r = (int(q_groups[i * 2 + 3]) - int(q_groups[i * 2 + 1])) * 32 // bits
            else:
                r = self.height - row
            if bits in rows:
                rows[bits] += r
            row += r
        acc = 0
        self.rows = {}
        for b in (8, 6, 5, 4, 3, 2):  # rows_6 += rows_8; rows_5 += rows_6; ...
            acc += rows[b]
            self.rows[b] = acc
        self.q_weight = self._shuffled(q_weight)

    def _shuffled(self, q: np.ndarray) -> np.ndarray:
        """``shuffle_kernel``: every column's words rearranged for the dequant functions."""
        r8, r6, r5, r4, r3, r2 = (self.rows[b] for b in (8, 6, 5, 4, 3, 2))
        k = r = 0
        while k < r8:
            r, k = r + 1, k + 4  # shuffle_8bit_4 is empty (QMODE_8BIT 0)
        while k < r6:
            _shuffle_6bit_16(q, r)
            r, k = r + 3, k + 16
        while k < r5:
            _shuffle_5bit_32(q, r)
            r, k = r + 5, k + 32
        while k < r4:
            _shuffle_4bit_8(q, r)
            r, k = r + 1, k + 8
        while k < r3:
            _shuffle_3bit_32(q, r)
            r, k = r + 3, k + 32
        while k < r2:
            _shuffle_2bit_16(q, r)
            r, k = r + 1, k + 16
        return q

    def _scale(self, group: int) -> np.ndarray:
        """``dq_scale(b_q_scale_.item(group, n), b_q_scale_max[group])`` for every column n."""
        n = np.arange(self.width)
        qs = (self.q_scale[group, n // 8] >> ((n & 7) * 4).astype(np.uint32)) & 0x0F
        qs_i = qs.astype(np.int64) + 1
        return ((qs_i * qs_i).astype(F16) * self.q_scale_max[group]).astype(F16)

    def reconstruct(self) -> np.ndarray:
        """``reconstruct_kernel`` over the whole matrix: float16 ``[height, width]`` (rows the
        kernel never writes stay NaN, where torch.empty would hold garbage)."""
        out = np.full((self.height, self.width), np.nan, F16)
        for offset_k in range(0, self.height, BLOCK_KN_SIZE):  # blockIdx.y; every column n at once
            self._reconstruct_block(offset_k, out)
        return out

    def _reconstruct_block(self, offset_k: int, out: np.ndarray) -> None:
        h, gm, qw = self.height, self.group_map, self.q_weight
        r8, r6, r5, r4, r3, r2 = (self.rows[b] for b in (8, 6, 5, 4, 3, 2))
        perm = None if self.q_perm is None else self.q_perm[offset_k : offset_k + BLOCK_KN_SIZE]
        group = int(gm[offset_k * 2])
        pre = {
            8: min(r8, offset_k),
            6: min(r6, offset_k) - r8 if offset_k > r8 else 0,
            5: min(r5, offset_k) - r6 if offset_k > r6 else 0,
            4: min(r4, offset_k) - r5 if offset_k > r5 else 0,
            3: min(r3, offset_k) - r4 if offset_k > r4 else 0,
            2: min(r2, offset_k) - r3 if offset_k > r3 else 0,
        }
        ptr = sum(pre[b] // 32 * b for b in pre)  # qk: b_ptr = b_q_weight + qk * size_n + n
        qs = self._scale(group)
        nextgroup = offset_k + int(gm[offset_k * 2 + 1])
        end_k = min(offset_k + BLOCK_KN_SIZE, h)
        k = offset_k
        lk = 0 if perm is not None else k
        # (rows_X, iterations of the inner p loop, words per dequant call, dequant, k step)
        for limit, reps, n_words, dequant, step in (
            (r8, 4, 2, _dequant_8bit_8, 32),
            (r6, 2, 3, _dequant_6bit_16, 32),
            (r5, 1, 5, _dequant_5bit_32, 32),
            (r4, 4, 1, _dequant_4bit_8, 32),
            (r3, 1, 3, _dequant_3bit_32, 32),
            (r2, 1, 1, _dequant_2bit_16, 16),
        ):
            while k < limit and k < end_k:
                if k == nextgroup:
                    group += 1
                    qs = self._scale(group)
                    nextgroup += int(gm[k * 2 + 1])
                for _ in range(reps):
                    dqh = dequant(*(qw[ptr + i] for i in range(n_words)))
                    ptr += n_words
                    for v in dqh:  # __hmul2(dq, qs_h2), then b_.set(perm[lk++] or lk++, n, ...)
                        if perm is not None:
                            assert lk < len(perm), "reads past the block's perm (shared memory)"
                            row = int(perm[lk])
                        else:
                            row = lk
                        out[row] = (v * qs).astype(F16)
                        lk += 1
                k += step


def linear_dq(parts: dict[str, torch.Tensor], *, drop_perm: bool = False, output_map=None) -> torch.Tensor:
    """``get_weight_tensor_dq()`` of one EXL2 linear loaded from its stored ``parts``: float16
    ``[in, out]``. ``drop_perm`` / ``output_map`` are ``load(unmap=True)`` / ``load(output_map=)``."""
    w = load_weight(parts)
    if drop_perm:
        unmap(w)
    if output_map is not None:
        remap_outputs(w, output_map)
    return torch.from_numpy(QMatrix(w).reconstruct())


def mlp_dq(gate: dict, up: dict, down: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``get_weight_tensor_dq()`` of gate_proj, up_proj, down_proj after ``ExLlamaV2MLP.load``:
    down_proj in stored input order, gate and up with outputs in that order."""
    down_map = unmap(load_weight(down))
    return (
        linear_dq(gate, output_map=down_map),
        linear_dq(up, output_map=down_map),
        linear_dq(down, drop_perm=True),
    )
