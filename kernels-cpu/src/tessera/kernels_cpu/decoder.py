"""A stack of ``DecoderLayerSpec`` layers in one C call per step (csrc/decoder_bf16.c): bf16,
packed weights (GGUF, or GPTQ/EXL2 as packed segments behind an input permutation:
segments.py), a bf16 cache. Same kernels in the same order as the op-by-op path, so the
results are the same to the bit, without the Python call, tensors and thread wake-ups of ~10
ops per layer (at one sequence, those cost more than the arithmetic).

Anything else (fp32, dequantized weights, a quantized cache, tensor-parallel layers, ...) runs
op by op; the reason is logged once.
"""

from __future__ import annotations

import ctypes
import logging
import weakref

import torch

from tessera.kernels import InputSegments, RowStack, reference

from . import native, segments
from .moe import PackedExperts
from .packed import PackedWeight

_p, _i, _f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
log = logging.getLogger(__name__)
_told: set[str] = set()


def _op_by_op(reason: str, layers, x, residual, cos, sin, kv_caches, metas):
    if reason not in _told:
        _told.add(reason)
        log.info("fused decoder layers: running op by op (%s)", reason)
    return reference.decoder_layers(layers, x, residual, cos, sin, kv_caches, metas)


class _Stack(ctypes.Structure):
    _fields_ = [("n_parts", _i), ("part", segments.Part * 3)]


class _Moe(ctypes.Structure):
    _fields_ = [
        *((n, _i) for n in ("n_experts", "top_k", "renormalize", "inter", "gu_qtype", "dn_qtype")),
        *((n, _p) for n in ("router", "gu", "dn")),
    ]


class _Layer(ctypes.Structure):
    _fields_ = [
        ("input_norm", _p),
        ("post_norm", _p),
        ("qkv", _Stack),
        ("o", _Stack),
        ("gate_up", _Stack),
        ("down", _Stack),
        ("moe", _Moe),
        ("k_cache", _p),
        ("v_cache", _p),
        ("window", _i),
    ]


class _Step(ctypes.Structure):
    _fields_ = [
        *(
            (n, _i)
            for n in ("T", "hidden", "H", "KH", "D", "inter", "BS", "n_seqs", "bt_stride", "n_threads")
        ),
        ("eps", _f),
        ("scale", _f),
        *((n, _p) for n in ("cos", "sin", "slots", "qsl", "seq_lens", "block_tables")),
        *((n, _p) for n in ("h", "qkv", "q", "attn", "gu", "act")),
        *((n, _p) for n in ("moe_probs", "moe_ids", "moe_w", "moe_scratch")),
    ]


def _bf16_vec(t, n: int) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16 and t.is_contiguous() and t.shape == (n,)


def _weight(w, bias, keep: list) -> _Stack | None:
    """A packed weight, an ``InputSegments`` of packed weights, or a row stack of up to 3 of
    those, as the C struct (None for anything else)."""
    parts = segments.c_parts(w)
    if parts is None or len(parts.parts) > 3:
        return None
    if bias is not None:
        if bias.shape != (w.shape[0],) or bias.dtype not in (torch.bfloat16, torch.float32):
            return None
        bias = bias.to(torch.bfloat16).contiguous()
    keep += [parts, bias]
    made = parts.with_biases(bias)
    return _Stack(len(made), (segments.Part * 3)(*made))


def _tensors(layers) -> list:
    """What the C structs point into, layer by layer: a plan is stale once any of it is
    replaced (or the cache list is another)."""
    out = []
    for ly in layers:
        out += [ly.input_norm, ly.post_attention_norm]
        for w in (ly.qkv, ly.o, ly.gate_up, ly.down):
            out += [None, None] if w is None else [w.weight, w.bias]
        m = ly.moe
        out += [None, None, None] if m is None else [m.router, m.gate_up, m.down]
    return out


class _Plan:
    """The layers' weights and caches as C structs, built once per (layers, caches). It holds
    the tensors it points into (so the pointers stay valid) but not the layers."""

    def __init__(self, layers, kv_caches) -> None:
        self.ok, self.reason = False, ""
        self.owned, self.kv_caches = _tensors(layers), kv_caches
        self.scratch = torch.empty(0, dtype=torch.bfloat16)  # the step's intermediates
        self.keep: list = []
        first = layers[0]
        if any(ly.tp_size > 1 for ly in layers):
            self.reason = "tensor-parallel layers: o's and the MLP's outputs are summed across ranks"
            return
        self.H, self.KH, self.D = first.num_heads, first.num_kv_heads, first.head_dim
        self.eps, self.scale = float(first.eps), float(first.scale)
        packed = (PackedWeight, RowStack, InputSegments)
        self.moe = first.moe
        if any((ly.moe is None) != (self.moe is None) for ly in layers):
            self.reason = "a stack mixing dense and mixture-of-experts layers"
            return
        if self.moe is not None:
            m = self.moe
            if not all(
                isinstance(ly.moe.gate_up, PackedExperts)
                and isinstance(ly.moe.down, PackedExperts)
                and (ly.moe.gate_up.qtype, ly.moe.down.qtype, ly.moe.top_k, ly.moe.renormalize)
                == (m.gate_up.qtype, m.down.qtype, m.top_k, m.renormalize)
                and ly.moe.down.shape == m.down.shape
                for ly in layers
            ):
                self.reason = "experts not packed, or layers with different experts"
                return
        self.hidden = first.hidden_size if isinstance(first.o.weight, packed) else 0
        if self.moe is not None:
            self.inter = self.moe.down.shape[2]
        else:
            self.inter = first.intermediate_size if isinstance(first.down.weight, packed) else 0
        if not self.hidden or not self.inter:
            self.reason = "weights are not packed (load GGUF weights with --quantized-weights packed)"
            return
        if not (
            self.hidden % 16 == 0
            and self.hidden > 0
            and self.inter % 16 == 0
            and self.inter > 0
            and self.D % 32 == 0
            and self.D <= 256
            and self.KH > 0
            and self.H % self.KH == 0
            and self.H // self.KH <= 64
            and self.scale > 0
        ):
            self.reason = f"shapes outside the C kernel's (hidden {self.hidden}, head {self.D})"
            return
        arr = (_Layer * len(layers))()
        for i, (layer, cache) in enumerate(zip(layers, kv_caches, strict=True)):
            data = cache.data
            if (
                (layer.num_heads, layer.num_kv_heads, layer.head_dim) != (self.H, self.KH, self.D)
                or float(layer.eps) != self.eps
                or float(layer.scale) != self.scale
                or not _bf16_vec(layer.input_norm, self.hidden)
                or not _bf16_vec(layer.post_attention_norm, self.hidden)
                or cache.scales is not None
                or data.dtype != torch.bfloat16
                or not data.is_contiguous()
                or tuple(data.shape[3:]) != (self.KH, self.D)
            ):
                self.reason = f"layer {i}: differs from layer 0, or its norms/cache are not bf16"
                return
            projections = [layer.qkv, layer.o] + ([] if self.moe else [layer.gate_up, layer.down])
            ws = [_weight(w.weight, w.bias, self.keep) for w in projections]
            shapes = [
                ((self.H + 2 * self.KH) * self.D, self.hidden),
                (self.hidden, self.H * self.D),
                (2 * self.inter, self.hidden),
                (self.hidden, self.inter),
            ][: len(ws)]
            if any(w is None or p.shape != s for w, p, s in zip(ws, projections, shapes, strict=True)):
                self.reason = (
                    f"layer {i}: a weight in a scheme the C matmul does not take (a dense part, "
                    "more than 3 stacked parts or 64 input segments, a permutation off its inputs)"
                )
                return
            moe = _Moe()
            if self.moe is not None:
                m = layer.moe
                router = m.router.float().contiguous()
                if router.shape != (m.down.shape[0], self.hidden):
                    self.reason = f"layer {i}: a router of shape {tuple(router.shape)}"
                    return
                self.keep.append(router)
                moe = _Moe(
                    m.down.shape[0],
                    m.top_k,
                    int(m.renormalize),
                    self.inter,
                    m.gate_up.qtype,
                    m.down.qtype,
                    router.data_ptr(),
                    m.gate_up.pointers.data_ptr(),
                    m.down.pointers.data_ptr(),
                )
                ws += [_Stack(), _Stack()]
            arr[i] = _Layer(
                layer.input_norm.data_ptr(),
                layer.post_attention_norm.data_ptr(),
                *ws,
                moe,
                data[0].data_ptr(),
                data[1].data_ptr(),
                int(layer.sliding_window or 0),
            )
        self.block_size = kv_caches[0].data.shape[2]
        if any(c.data.shape[2] != self.block_size for c in kv_caches):
            self.reason = "layers with different block sizes"
            return
        self.arr = arr
        self.ok = True


# a model's first layer -> the plan of its stack with the caches it last ran with (one per
# model, gone with it)
_plans: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _plan(layers, kv_caches) -> _Plan:
    plan = _plans.get(layers[0])
    if (
        plan is None
        or plan.kv_caches is not kv_caches
        or len(plan.owned) != 13 * len(layers)
        or not all(a is b for a, b in zip(plan.owned, _tensors(layers), strict=True))
    ):
        plan = _plans[layers[0]] = _Plan(layers, kv_caches)
    return plan


def _int32(t: torch.Tensor) -> bool:
    return t.dtype == torch.int32 and t.is_contiguous()


def decoder_layers(layers, x, residual, cos, sin, kv_caches, attn_metadata):
    args = (layers, x, residual, cos, sin, kv_caches, attn_metadata)
    lib = native.library()
    if lib is None:
        return _op_by_op("the C kernels are not built", *args)
    if x.dtype != torch.bfloat16 or x.dim() != 2:
        return _op_by_op(f"activations in {x.dtype}, the C stack is bf16", *args)
    if not layers or len(layers) != len(kv_caches):
        return _op_by_op("no layers, or not one cache per layer", *args)
    meta = attn_metadata[0]
    if any(m is not meta for m in attn_metadata):
        return _op_by_op("layers with different block tables (KV cache groups)", *args)
    plan = _plan(layers, kv_caches)
    if not plan.ok:
        return _op_by_op(plan.reason, *args)
    T = x.shape[0]
    if (
        x.shape[1] != plan.hidden
        or cos.dtype != torch.float32
        or cos.shape != (T, plan.D // 2)
        or (residual is not None and residual.shape != x.shape)
        or not (_int32(meta.query_start_loc) and _int32(meta.seq_lens) and _int32(meta.block_tables))
        or meta.slot_mapping.dtype != torch.int64
    ):
        return _op_by_op("step inputs of another dtype or layout (fp32 cos/sin, int32 tables)", *args)
    cos, sin = cos.contiguous(), sin.contiguous()
    slots = meta.slot_mapping.contiguous()
    x = x.clone(memory_format=torch.contiguous_format)
    res = (
        torch.empty_like(x)
        if residual is None
        else residual.to(torch.bfloat16).clone(memory_format=torch.contiguous_format)
    )
    H, KH, D = plan.H, plan.KH, plan.D
    dense_inter = 0 if plan.moe is not None else plan.inter
    moe_bytes = 0
    if plan.moe is not None:
        E, k = plan.moe.down.shape[0], plan.moe.top_k
        # probabilities, expert ids, weights, then tessera_moe's own scratch (64-byte aligned)
        moe_bytes = (
            T * (4 * E + 8 * k + 4 * k)
            + 64
            + lib.tessera_moe_scratch_bytes(T, plan.hidden, plan.inter, E, k, 1)
        )
    need = T * (plan.hidden + (H + 2 * KH) * D + 2 * H * D + 3 * dense_inter) + (moe_bytes + 1) // 2
    if plan.scratch.numel() < need:  # kept between steps: fresh pages cost faults and zeroing
        plan.scratch = torch.empty(need, dtype=torch.bfloat16)
    scratch = plan.scratch
    sizes = [plan.hidden, (H + 2 * KH) * D, H * D, H * D, 2 * dense_inter, dense_inter]
    ptrs, base = [], scratch.data_ptr()
    for s in sizes:
        ptrs.append(base)
        base += 2 * T * s
    moe_ptrs = [0, 0, 0, 0]
    if plan.moe is not None:
        base += -base % 8
        moe_ptrs[1] = base  # int64 ids first: 8-byte aligned
        base += 8 * T * k
        moe_ptrs[0] = base
        base += 4 * T * E
        moe_ptrs[2] = base
        base += 4 * T * k
        moe_ptrs[3] = base + (-base % 64)
    st = _Step(
        T,
        plan.hidden,
        H,
        KH,
        D,
        dense_inter,
        plan.block_size,
        meta.seq_lens.shape[0],
        meta.block_tables.shape[1],
        torch.get_num_threads(),
        plan.eps,
        plan.scale,
        cos.data_ptr(),
        sin.data_ptr(),
        slots.data_ptr(),
        meta.query_start_loc.data_ptr(),
        meta.seq_lens.data_ptr(),
        meta.block_tables.data_ptr(),
        *ptrs,
        *moe_ptrs,
    )
    rc = lib.tessera_llama_layers_bf16(
        plan.arr, len(layers), ctypes.byref(st), x.data_ptr(), res.data_ptr(), int(residual is not None)
    )
    if rc == -3:
        raise MemoryError("the fused decoder layers could not allocate their scratch memory")
    if rc != 0:
        raise ValueError(f"the fused decoder layers refused their arguments (code {rc})")
    return x, res
