"""The sparse mixture-of-experts MLP of a layer (Mixtral, Qwen2-MoE, Qwen3-MoE): a router
and E SiLU-gated experts, each token sent to its top k.

The layer owns its expert weights. Checkpoints hold them per expert (HF: ``experts.{e}.w1``
or ``experts.{e}.gate_proj`` ...) or stacked (GGUF's ``ffn_{gate,up,down}_exps`` ``[E, N, K]``,
transformers 5's ``experts.gate_up_proj`` ``[E, 2I, H]`` and ``experts.down_proj``); either way
each expert's gate and up rows are stacked into ``[E, 2I, H]`` and handed with ``[E, H, I]`` to
``ops.prepare_expert_weights`` once at load. With tensor parallelism each rank holds a slice of
every expert's intermediate dimension (gate/up rows, down columns) and the ranks' outputs are
summed.
"""

from __future__ import annotations

import torch

from tessera.formats import QuantizedTensor
from tessera.kernels import ops

from .linear import LoadOptions, ReplicatedLinear
from .parallel import NO_TP, TPInfo, narrow_cols, narrow_rows, to_dense
from .weight_map import WeightMap

PROJECTIONS = ("gate", "up", "down")


def expert_of(stacked, e: int):
    """Expert ``e``'s matrix of a stack ``[E, N, K]`` (a tensor or packed rows; no copy)."""
    return stacked.expert(e) if isinstance(stacked, QuantizedTensor) else stacked[e]


def stack_experts(per_expert: list[list], opts: LoadOptions):
    """``[E, N, K]`` from each expert's parts stacked by rows, ready for ``fused_moe``: packed
    parts of one scheme stay packed where the weights are kept packed (their rows are whole
    blocks), anything else is dequantized to ``opts.dtype``."""
    parts = [p for group in per_expert for p in group]
    n = sum(p.shape[0] for p in per_expert[0])
    shape = (len(per_expert), n, parts[0].shape[1])
    if (
        opts.packed_weights
        and all(isinstance(p, QuantizedTensor) for p in parts)
        and len({p.scheme for p in parts}) == 1
    ):
        data = torch.cat([p.rows() for p in parts])
        weight = QuantizedTensor(parts[0].scheme, data, shape).to(opts.device)
    else:
        weight = torch.stack(
            [torch.cat([to_dense(p, opts.dtype, opts.device) for p in group]) for group in per_expert]
        )
    return ops.prepare_expert_weights(weight, opts.dtype)


class FusedMoE:
    """Router ``[E, H]`` (fp32 logits) and E experts of intermediate size I.

    ``renormalize``: a token's k routing weights are scaled to sum to 1 (Mixtral, Qwen3-MoE;
    Qwen2-MoE's ``norm_topk_prob`` is False)."""

    def __init__(
        self,
        hidden: int,
        intermediate: int,
        num_experts: int,
        top_k: int,
        renormalize: bool,
        tp: TPInfo = NO_TP,
    ) -> None:
        self.hidden, self.intermediate, self.num_experts = hidden, intermediate, num_experts
        self.top_k, self.renormalize, self.tp = top_k, renormalize, tp
        self.start, self.rows = tp.part(intermediate, "expert intermediate size")
        self.router = ReplicatedLinear(hidden, num_experts)
        self.gate_up = self.down = None  # prepared by finish()
        self._parts: dict[tuple[str, int], object] = {}  # (projection, expert) -> this rank's part

    # -- loading: each takes a full (unsharded) tensor and keeps this rank's part --------------

    def expert_shape(self, which: str) -> tuple[int, int]:
        h, i = self.hidden, self.intermediate
        return (h, i) if which == "down" else (i, h)

    def load_expert(self, which: str, e: int, tensor) -> None:
        """One expert's ``gate`` ``[I, H]``, ``up`` ``[I, H]`` or ``down`` ``[H, I]``."""
        if self.tp.size > 1:
            cut = narrow_cols if which == "down" else narrow_rows
            tensor = cut(tensor, self.start, self.rows)
        self._parts[(which, e)] = tensor

    def load_stacked(self, which: str, tensor) -> None:
        """All experts' ``which`` as one ``[E, N, K]`` tensor (GGUF's ``ffn_*_exps``)."""
        for e in range(self.num_experts):
            self.load_expert(which, e, expert_of(tensor, e))

    def load_gate_up(self, tensor) -> None:
        """transformers 5's ``[E, 2I, H]``: each expert's gate rows, then its up rows."""
        i = self.intermediate
        for e in range(self.num_experts):
            m = expert_of(tensor, e)
            self.load_expert("gate", e, narrow_rows(m, 0, i))
            self.load_expert("up", e, narrow_rows(m, i, i))

    def declare(
        self,
        wm: WeightMap,
        hf: str,
        gguf: str,
        names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
        fused_hf: str | None = None,
    ) -> None:
        """The router ``{hf}.gate`` (GGUF ``{gguf}.ffn_gate_inp``) and the experts: per expert
        ``{hf}.experts.{e}.{name}.weight`` for the gate, up and down ``names``; or stacked, as
        GGUF's ``{gguf}.ffn_{gate,up,down}_exps.weight`` or transformers 5's
        ``{fused_hf}.experts.gate_up_proj`` and ``.down_proj`` (``fused_hf`` defaults to ``hf``;
        its router ``{fused_hf}.gate.weight`` is accepted too)."""
        fused_hf = fused_hf or hf
        wm.add_linear(self.router, f"{hf}.gate", f"{gguf}.ffn_gate_inp")
        if fused_hf != hf:
            wm.add_fused(
                f"{fused_hf}.gate.weight",
                self.router.weight_shape(),
                self.router.load_weight,
                [f"{hf}.gate.weight"],
                "hf",
            )
        n_e = self.num_experts
        keys: dict[str, list[str]] = {}
        for which, name in zip(PROJECTIONS, names, strict=True):
            keys[which] = [f"{hf}.experts.{e}.{name}.weight" for e in range(n_e)]
            for e, key in enumerate(keys[which]):
                wm.add(self.expert_shape(which), lambda t, w=which, e=e: self.load_expert(w, e, t), key)
            wm.add_fused(
                f"{gguf}.ffn_{which}_exps.weight",
                (n_e, *self.expert_shape(which)),
                lambda t, w=which: self.load_stacked(w, t),
                keys[which],
                "gguf",
            )
        i, h = self.intermediate, self.hidden
        wm.add_fused(
            f"{fused_hf}.experts.gate_up_proj",
            (n_e, 2 * i, h),
            self.load_gate_up,
            keys["gate"] + keys["up"],
            "hf",
        )
        wm.add_fused(
            f"{fused_hf}.experts.down_proj",
            (n_e, h, i),
            lambda t: self.load_stacked("down", t),
            keys["down"],
            "hf",
        )

    def finish(self, opts: LoadOptions) -> None:
        self.router.finish(opts)
        experts = range(self.num_experts)
        gate_up = [[self._parts.pop(("gate", e)), self._parts.pop(("up", e))] for e in experts]
        self.gate_up = stack_experts(gate_up, opts)
        self.down = stack_experts([[self._parts.pop(("down", e))] for e in experts], opts)

    # -- running -------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        """The routed experts' weighted sum for x ``[T, H]``; ``reduce=False`` leaves a
        tensor-parallel rank's partial sum (a caller adding more partial sums reduces once)."""
        logits = self.router.forward(x, out_dtype=torch.float32)
        out = ops.fused_moe(x, logits, self.gate_up, self.down, self.top_k, self.renormalize)
        if reduce and self.tp.size > 1:
            ops.all_reduce(out)
        return out
