"""Weights as the parts of the C matmul (csrc/qmatmul.h): a packed GGUF weight is one part of one
segment; an ``InputSegments`` of packed weights (GPTQ act-order, EXL2 mixed bit widths as GGUF
blocks) is one part whose segments run along its permuted inputs; a ``RowStack`` of either is
its parts side by side (q|k|v, gate|up).

One C call multiplies them all: x is gathered and quantized to int8 once for consecutive parts
with one permutation (q, k and v of one Hessian share it), and a row's segments are summed in
their order into one fp32 sum, so a row's result does not depend on the rows beside it
(batch invariance). The fused decoder (decoder.py) runs the same parts.
"""

from __future__ import annotations

import ctypes
import weakref

import torch

from tessera.kernels import InputSegments, RowStack

from . import native, packed  # packed imports this module: its names are read at call time

_p, _i = ctypes.c_void_p, ctypes.c_int
MAX_SEGS, MAX_PARTS = 64, 8  # csrc/qmatmul.c


class Seg(ctypes.Structure):
    _fields_ = [("qtype", _i), ("k0", _i), ("k1", _i), ("qs", _p), ("d", _p), ("m", _p)]


class Part(ctypes.Structure):
    _fields_ = [("N", _i), ("n_segs", _i), ("segs", _p), ("perm", _p), ("bias", _p)]


class CParts:
    """A weight's parts as C structs (bias pointers left empty), holding the tensors and arrays
    they point into (not the weight: it keys the cache): the packed bytes, and each permutation
    as int32, one tensor for parts whose permutations are equal (so the C call gathers and
    quantizes x once for them)."""

    def __init__(self, weight) -> None:
        self.shape = tuple(weight.shape)
        self.sizes: list[int] = []
        self.parts: list[Part] = []
        self._keep: list = []
        perms: list[torch.Tensor] = []
        stacked = weight.parts if isinstance(weight, RowStack) else [weight]
        if len(stacked) > MAX_PARTS:
            raise ValueError("too many stacked parts")
        for part in stacked:
            perm, segs = _segments(part, self._keep)
            if perm is not None:
                same = next((q for q in perms if torch.equal(q, perm)), None)
                if same is None:
                    same = perm.to(torch.int32).contiguous()
                    perms.append(same)
                perm = same
            arr = (Seg * len(segs))(*segs)
            self._keep.append(arr)
            self.sizes.append(part.shape[0])
            self.parts.append(Part(part.shape[0], len(segs), ctypes.addressof(arr), _ptr(perm), None))
        self._keep += perms

    def with_biases(self, bias: torch.Tensor | None) -> list[Part]:
        """The parts with ``bias`` (``[out]``, contiguous, the output's dtype; None for none)
        split among them. The caller keeps ``bias`` alive while the parts are used."""
        if bias is None:
            return self.parts
        out, row = [], 0
        for p, n in zip(self.parts, self.sizes, strict=True):
            out.append(Part(p.N, p.n_segs, p.segs, p.perm, bias.data_ptr() + row * bias.element_size()))
            row += n
        return out


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _seg(k0: int, k1: int, w, keep: list) -> Seg:
    keep += [w.qs, w.d, w.m]
    return Seg(w.qtype, k0, k1, w.qs.data_ptr(), w.d.data_ptr(), _ptr(w.m))


def _segments(w, keep: list) -> tuple[torch.Tensor | None, list[Seg]]:
    """``(perm, segments)`` of a packed weight or an ``InputSegments`` of packed weights on the
    CPU (their tensors added to ``keep``); ValueError for anything else (the caller falls back
    to its op-by-op product)."""
    if isinstance(w, packed.PackedWeight):
        return None, [_seg(0, w.shape[1], w, keep)]
    if not isinstance(w, InputSegments) or len(w.parts) > MAX_SEGS:
        raise ValueError("not packed segments")
    if not all(isinstance(p, packed.PackedWeight) for _, _, p in w.parts):
        raise ValueError("a segment that is not packed")
    perm = w.perm
    if perm is not None:
        # the C gather reads x[perm[j]] unchecked: every index must be an input
        if perm.device.type != "cpu" or int(perm.min()) < 0 or int(perm.max()) >= w.shape[1]:
            raise ValueError("a permutation outside the inputs")
    return perm, [_seg(k0, k1, p, keep) for k0, k1, p in w.parts]


# weight -> its CParts, or None where the C matmul does not take it (gone with the weight)
_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def c_parts(weight) -> CParts | None:
    """The C matmul's parts of a packed weight, an ``InputSegments`` of packed weights, or a
    ``RowStack`` of those; None for anything else (dense parts, no C kernels)."""
    if not isinstance(weight, (packed.PackedWeight, InputSegments, RowStack)) or native.library() is None:
        return None
    if weight not in _cache:
        try:
            _cache[weight] = CParts(weight)
        except ValueError:
            _cache[weight] = None
    return _cache[weight]


def matmul(parts: CParts, x: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """``x @ W.T + bias`` for x in bf16 (int8 products) or fp32 (FMAs over the exact weights),
    the result in ``out_dtype`` (bf16 or fp32) straight from the fp32 sums."""
    n, k = parts.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).contiguous()
    tokens = x2.shape[0]
    out = torch.empty(tokens, n, dtype=out_dtype)
    if tokens == 0:
        return out.reshape(*lead, n)
    if bias is not None:
        bias = bias.to(out_dtype).contiguous()
    arr = (Part * len(parts.parts))(*parts.with_biases(bias))
    rc = native.library().tessera_q_matmul_parts(
        arr,
        len(parts.parts),
        x2.data_ptr(),
        int(x.dtype == torch.bfloat16),
        tokens,
        k,
        out.data_ptr(),
        n,
        int(out_dtype == torch.bfloat16),
        torch.get_num_threads(),
    )
    if rc == -3:
        raise MemoryError(f"no memory for the inputs of a {tokens}-token packed matmul")
    if rc != 0:
        raise ValueError(f"the packed matmul refused x of shape {tuple(x.shape)} for a {parts.shape} weight")
    return out.reshape(*lead, n)
