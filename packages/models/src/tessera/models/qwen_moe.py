"""Qwen2-MoE and Qwen3-MoE: Mixtral's layer shape (``mixtral.py``) with Qwen's MLP blocks.

Qwen2-MoE has q/k/v biases, routing weights left as softmax gave them (``norm_topk_prob``
False), and beside the routed experts a shared expert that every token passes through, scaled
by ``sigmoid(x . w)`` of its own one-row gate. Qwen3-MoE has no biases and no shared expert,
renormalizes per config and RMS-normalizes each head of q and k. In both, the layers listed in
``dense_layers`` (HF ``mlp_only_layers``, ``decoder_sparse_step``) have an ordinary MLP of
``intermediate_size``. llama.cpp converts these as themselves: q/k rows are not permuted.
"""

from __future__ import annotations

import torch

from tessera.formats import QuantizedTensor
from tessera.kernels import ops

from .linear import LoadOptions, ReplicatedLinear
from .llama import LlamaMLP
from .mixtral import MixtralForCausalLM
from .moe import FusedMoE
from .weight_map import WeightMap


def as_row(t, hidden: int):
    """The shared expert's gate as the ``[1, H]`` matrix HF holds: llama.cpp's converter wrote it
    squeezed to ``[H]`` until it stopped squeezing tensors."""
    if isinstance(t, QuantizedTensor):
        return QuantizedTensor(t.scheme, t.data, (1, hidden))
    return t.reshape(1, hidden)


class Qwen2MoeSparseBlock:
    """The routed experts, plus the gated shared expert where the config has one."""

    def __init__(self, config, opts: LoadOptions) -> None:
        c = config
        h, shared = c.hidden_size, c.shared_expert_intermediate_size
        self.tp = opts.tp
        self.experts = FusedMoE(
            h, c.moe_intermediate_size, c.num_experts, c.num_experts_per_tok, c.norm_topk_prob, opts.tp
        )
        self.shared_expert = LlamaMLP(h, shared, False, opts) if shared else None
        self.shared_expert_gate = ReplicatedLinear(h, 1) if shared else None

    def declare(self, wm: WeightMap, hf: str, gguf: str) -> None:
        """``hf`` is the block's prefix (``model.layers.N.mlp``), ``gguf`` the layer's."""
        self.experts.declare(wm, hf, gguf)
        if self.shared_expert is None:
            return
        s, gate = self.shared_expert, self.shared_expert_gate
        wm.add_linear(s.gate_up_proj, f"{hf}.shared_expert.gate_proj", f"{gguf}.ffn_gate_shexp", 0)
        wm.add_linear(s.gate_up_proj, f"{hf}.shared_expert.up_proj", f"{gguf}.ffn_up_shexp", 1)
        wm.add_linear(s.down_proj, f"{hf}.shared_expert.down_proj", f"{gguf}.ffn_down_shexp")
        wm.add_linear(gate, f"{hf}.shared_expert_gate", None)
        h = gate.in_features
        wm.add_fused(
            f"{gguf}.ffn_gate_inp_shexp.weight",
            (1, h),
            lambda t: gate.load_weight(as_row(t, h)),
            [f"{hf}.shared_expert_gate.weight"],
            "gguf",
            other_shapes=((h,),),
        )

    def finish(self, opts: LoadOptions) -> None:
        self.experts.finish(opts)
        if self.shared_expert is not None:
            self.shared_expert.finish(opts)
            self.shared_expert_gate.finish(opts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.experts.forward(x, reduce=False)
        if self.shared_expert is not None:
            s = self.shared_expert
            # this rank's partial product (its slice of the shared expert), summed with the
            # experts' partial sums in one all-reduce below
            shared = ops.linear(ops.silu_and_mul(s.gate_up_proj.forward(x)), s.down_proj.weight)
            out = out + torch.sigmoid(self.shared_expert_gate.forward(x)) * shared
        if self.tp.size > 1:
            ops.all_reduce(out)
        return out


class Qwen2MoeForCausalLM(MixtralForCausalLM):
    rope_rows_permuted = False

    def make_mlp(self, layer: int):
        c = self.config
        if layer in c.dense_layers:
            return LlamaMLP(c.hidden_size, c.intermediate_size, c.mlp_bias, self.opts)
        return Qwen2MoeSparseBlock(c, self.opts)

    def declare_mlp(self, wm: WeightMap, mlp, hf: str, gguf: str) -> None:
        mlp.declare(wm, f"{hf}.mlp", gguf)


class Qwen3MoeForCausalLM(Qwen2MoeForCausalLM):
    """The same layers: the config turns off the biases and the shared expert, and on QK-norm."""
