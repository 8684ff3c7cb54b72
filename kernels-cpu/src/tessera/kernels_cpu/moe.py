"""The mixture-of-experts MLP with GGUF expert weights kept packed (csrc/moe.c).

``prepare_expert_weights`` repacks each expert of a 3-D ``[E, N, K]`` quantized tensor once at
load, as ``prepare_linear_weight`` does a matrix; ``fused_moe`` routes in fp32 with the
reference's own ``route`` and hands the rest to one C call per layer: tokens grouped by
expert, each active expert's weights read once for all its tokens, a token's k outputs summed
in its top-k order. Whatever the C kernel cannot take runs the torch reference.
"""

from __future__ import annotations

import threading

import torch

from tessera.kernels import moe as reference

from . import native, packed
from .packed import PackedWeight


class PackedExperts:
    """Stacked expert matrices ``[E, N, K]``, one ``PackedWeight`` per expert."""

    def __init__(self, experts: list[PackedWeight]) -> None:
        first = experts[0]
        if any(p.scheme != first.scheme or p.shape != first.shape for p in experts):
            raise ValueError("packed experts need one scheme and one shape")
        self.experts = experts
        self.scheme, self.qtype = first.scheme, first.qtype
        self.shape = (len(experts), *first.shape)
        # the C kernel's view: per expert the addresses of its quants, scales and minimums
        self.pointers = torch.tensor(
            [[p.qs.data_ptr(), p.d.data_ptr(), p.m.data_ptr() if p.m is not None else 0] for p in experts],
            dtype=torch.int64,
        )

    @property
    def device(self) -> torch.device:
        return self.experts[0].device

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.experts)

    def expert(self, e: int) -> PackedWeight:
        return self.experts[e]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.stack([p.dequantize(dtype) for p in self.experts])


def prepare_expert_weights(weight, dtype: torch.dtype):
    """Packed experts for the C kernel where it takes the scheme and shape, else the
    reference's tensor."""
    if (
        native.library() is None
        or isinstance(weight, torch.Tensor)
        or len(weight.shape) != 3
        or not hasattr(weight, "expert")
        or not packed.supported(weight.expert(0))
    ):
        return reference.prepare_expert_weights(weight, dtype)
    experts = [packed.prepare_linear_weight(weight.expert(e), dtype) for e in range(weight.shape[0])]
    if not all(isinstance(p, PackedWeight) for p in experts):  # a K-quant scale beyond fp16
        return reference.prepare_expert_weights(weight, dtype)
    return PackedExperts(experts)


_scratch = threading.local()


def _scratch_buffer(nbytes: int) -> torch.Tensor:
    """A 64-byte aligned buffer of at least ``nbytes``, kept between calls (one per thread):
    fresh pages cost a fault and zeroing each, every step."""
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < nbytes + 64:
        buf = _scratch.buf = torch.empty(nbytes + 64, dtype=torch.uint8)
    return buf[-buf.data_ptr() % 64 :]


def fused_moe(
    x: torch.Tensor,
    router_logits: torch.Tensor,
    gate_up,
    down,
    top_k: int,
    renormalize: bool,
    scoring: str = "softmax",
) -> torch.Tensor:
    reference.check_shapes(x, router_logits, gate_up, down)
    lib = native.library()
    if (
        lib is None
        or not isinstance(gate_up, PackedExperts)
        or not isinstance(down, PackedExperts)
        or x.dtype not in (torch.bfloat16, torch.float32)
        or x.device.type != "cpu"
    ):
        return reference.fused_moe(x, router_logits, gate_up, down, top_k, renormalize, scoring)
    t, h = x.shape
    if t == 0:
        return x.clone()
    # renormalized in C, each token's weights summed in top-k order (one order per row)
    weights, ids = reference.route(router_logits, top_k, False, scoring)
    weights, ids = weights.contiguous(), ids.contiguous()
    x = x.contiguous()
    n_experts, inter = down.shape[0], down.shape[2]
    out = torch.empty_like(x)
    x_bf16 = int(x.dtype == torch.bfloat16)
    scratch = _scratch_buffer(lib.tessera_moe_scratch_bytes(t, h, inter, n_experts, top_k, x_bf16))
    rc = lib.tessera_moe(
        x.data_ptr(),
        x_bf16,
        t,
        h,
        inter,
        n_experts,
        top_k,
        ids.data_ptr(),
        weights.data_ptr(),
        int(renormalize),
        gate_up.qtype,
        gate_up.pointers.data_ptr(),
        down.qtype,
        down.pointers.data_ptr(),
        out.data_ptr(),
        scratch.data_ptr(),
        torch.get_num_threads(),
    )
    if rc == -3:
        raise MemoryError(f"no memory for the buffers of a {t}-token MoE step")
    if rc != 0:
        raise ValueError(
            f"the packed MoE kernel refused x {tuple(x.shape)} with experts {gate_up.scheme} "
            f"{gate_up.shape} / {down.scheme} {down.shape} (code {rc})"
        )
    return out
