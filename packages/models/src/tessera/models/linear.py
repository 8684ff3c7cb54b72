"""Linear layers that own their weights.

A layer is told its full (unsharded) shape and its tensor-parallel rank; loading a checkpoint
tensor keeps this rank's part; ``finish`` hands the part to the layer's quantization method,
which prepares it once for the active kernel backend. Column-parallel layers split the outputs,
row-parallel ones the inputs (their products are summed across ranks); merged and QKV layers
are several checkpoint tensors stacked by output rows into one matmul.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tessera.formats import BLOCK_LAYOUT, FormatError, QuantizedTensor
from tessera.formats.gguf_quantize import quantize_gguf
from tessera.kernels import InputSegments, LinearWeights, RowStack, ops

from .parallel import NO_TP, TPInfo, narrow_cols, narrow_rows


@dataclass(frozen=True)
class LoadOptions:
    """How weights are prepared: compute dtype, device, packed GGUF weights kept packed for the
    backend's quantized matmul (else dequantized once at load), the tensor-parallel rank.

    ``quantize``: with packed weights, every linear weight of the layers re-quantized at load to
    this GGUF scheme (``tessera.formats.gguf_quantize.QUANTIZABLE``; one whose inputs are not
    whole blocks of it stays as stored; the LM head: ``embedding.head_scheme``): fewer bytes per
    token for a model that need not be exact, such as a speculative draft. ``lm_head_rows``: the
    vocabulary rows the LM head keeps (sorted token ids; the logits of the others are -inf), the
    embedding keeping all."""

    dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")
    packed_weights: bool = False
    tp: TPInfo = TPInfo()
    quantize: str | None = None
    lm_head_rows: tuple[int, ...] | None = None


# -- quantization methods: what a loaded weight becomes for ops.linear -----------------------


class Unquantized:
    name = "unquantized"

    def prepare(self, weight: torch.Tensor, opts: LoadOptions):
        return weight.to(device=opts.device, dtype=opts.dtype)


class GGUFPacked:
    """A GGUF weight kept packed: the backend repacks it for its quantized matmul, or
    dequantizes it where it has none."""

    name = "gguf"

    def prepare(self, weight: QuantizedTensor, opts: LoadOptions):
        return ops.prepare_linear_weight(weight.to(opts.device), opts.dtype)


class GGUFDequantized:
    name = "gguf-dequantized"

    def prepare(self, weight: QuantizedTensor, opts: LoadOptions):
        return weight.to(opts.device).dequantize(opts.dtype)


class GroupsDequantized:
    """A GPTQ, AWQ or EXL2 weight dequantized once at load to the model dtype, through the
    format's reference ``dequantize()``: without packed weights, or where its groups do not map
    onto GGUF blocks (a group boundary off a multiple of 32 inputs, a scale beyond fp16)."""

    name = "groups-dequantized"

    def prepare(self, weight, opts: LoadOptions):
        return weight.to(opts.device).dequantize(opts.dtype)


class GroupsPacked:
    """A GPTQ, AWQ or EXL2 weight as GGUF blocks (``GroupQuant.blocks``: Q4_1 for up to 4 bits,
    Q5_1, Q8_0 for 6-8) that the backend packs for its quantized matmul, behind the input
    permutation of act-order and EXL2 (an ``InputSegments``: activations are gathered per step,
    the packed weights never move)."""

    name = "groups-packed"

    @staticmethod
    def blocks(weight):
        """``(perm, [(k0, k1, QuantizedTensor)])``, or None where the groups do not map."""
        groups = weight.as_groups()
        parts = groups.blocks()
        return None if parts is None else (groups.perm, parts)

    def prepare(self, weight, opts: LoadOptions):
        if isinstance(weight, _MappedGroups):  # mapped already by prepare_stacked
            weight, mapped = weight.weight, weight.mapped
        else:
            mapped = self.blocks(weight)
        if mapped is None:
            return GroupsDequantized().prepare(weight, opts)
        perm, parts = mapped
        if perm is None and len(parts) == 1:
            return GGUFPacked().prepare(parts[0][2], opts)
        prepared = [(k0, k1, GGUFPacked().prepare(qt, opts)) for k0, k1, qt in parts]
        return InputSegments(None if perm is None else perm.to(opts.device), prepared)


def _is_groups(weight) -> bool:
    """GPTQ, AWQ and EXL2 tensors: anything that gives its ``GroupQuant``."""
    return hasattr(weight, "as_groups") or isinstance(weight, _MappedGroups)


@dataclass(frozen=True)
class _MappedGroups:
    """A GPTQ/AWQ/EXL2 weight with its ``GroupsPacked.blocks`` mapping (None: does not map),
    carried from ``prepare_stacked`` to ``GroupsPacked.prepare`` so each weight is mapped once."""

    weight: object
    mapped: tuple | None


def quant_method(weight, opts: LoadOptions):
    """The method for a loaded tensor."""
    if _is_groups(weight):
        return GroupsPacked() if opts.packed_weights else GroupsDequantized()
    if isinstance(weight, QuantizedTensor):
        return GGUFPacked() if opts.packed_weights else GGUFDequantized()
    return Unquantized()


def _as_blocks(weight):
    """A GPTQ/AWQ/EXL2 weight in input order and one container scheme: its GGUF blocks (so that
    stacked parts of one scheme concatenate into one packed weight); any other GPTQ/AWQ/EXL2
    weight with its mapping (``_MappedGroups``); anything else as it is."""
    if not _is_groups(weight):
        return weight
    mapped = GroupsPacked.blocks(weight)
    if mapped is not None and mapped[0] is None and len(mapped[1]) == 1:
        return mapped[1][0][2]
    return _MappedGroups(weight, mapped)


def requantize(weight, scheme: str):
    """``weight`` (dense, GGUF, GPTQ/AWQ/EXL2) as ``scheme`` blocks, through its float32 values;
    as it is where it already is ``scheme`` or its inputs are not whole blocks of it."""
    if isinstance(weight, _MappedGroups):
        weight = weight.weight
    if isinstance(weight, QuantizedTensor) and weight.scheme == scheme:
        return weight
    if weight.shape[-1] % BLOCK_LAYOUT[scheme][0] or len(weight.shape) != 2:
        return weight
    dense = weight if isinstance(weight, torch.Tensor) else weight.dequantize(torch.float32)
    return quantize_gguf(dense, scheme)


def prepare_stacked(parts: list, opts: LoadOptions):
    """Parts stacked by output rows, as one weight for ``ops.linear``: packed parts of one
    scheme are one packed weight (their rows are whole blocks); a mix of schemes is a RowStack
    of the parts as the backend prepared them, or one tensor where all came out dense."""
    if opts.packed_weights and opts.quantize is not None:
        parts = [requantize(p, opts.quantize) for p in parts]
    if opts.packed_weights:  # GPTQ/AWQ in input order and one container: plain GGUF blocks
        parts = [_as_blocks(p) for p in parts]
    if len(parts) == 1:
        return quant_method(parts[0], opts).prepare(parts[0], opts)
    if (
        opts.packed_weights
        and all(isinstance(p, QuantizedTensor) for p in parts)
        and len({(p.scheme, p.shape[1]) for p in parts}) == 1
    ):
        data = torch.cat([p.data.reshape(p.shape[0], -1) for p in parts])
        shape = (sum(p.shape[0] for p in parts), parts[0].shape[1])
        return GGUFPacked().prepare(QuantizedTensor(parts[0].scheme, data, shape), opts)
    prepared = [quant_method(p, opts).prepare(p, opts) for p in parts]
    if all(isinstance(p, torch.Tensor) for p in prepared):
        return torch.cat(prepared)
    return RowStack(prepared)


# -- layers -----------------------------------------------------------------------------------


class LinearBase:
    """``y = x @ W.T + b`` for W ``[out, in]``; subclasses say which part a rank holds."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp: TPInfo = NO_TP):
        self.in_features, self.out_features, self.has_bias, self.tp = in_features, out_features, bias, tp
        self.weight = None  # prepared by finish()
        self.bias: torch.Tensor | None = None
        self._parts: dict = {}  # shard id -> this rank's part, until finish()

    # the shards a checkpoint supplies: id -> full (unsharded) output rows of that shard
    def shards(self) -> dict:
        return {None: self.out_features}

    def weight_shape(self, shard=None) -> tuple[int, int]:
        return (self.shards()[shard], self.in_features)

    def bias_shape(self, shard=None) -> tuple[int]:
        return (self.shards()[shard],)

    def load_weight(self, tensor, shard=None) -> None:
        self._parts[("w", shard)] = self._take(tensor, shard)

    def load_bias(self, tensor, shard=None) -> None:
        self._parts[("b", shard)] = self._take(tensor, shard, bias=True)

    def _take(self, tensor, shard, bias: bool = False):
        raise NotImplementedError

    def finish(self, opts: LoadOptions) -> None:
        ids = list(self.shards())
        self.weight = prepare_stacked([self._parts.pop(("w", s)) for s in ids], opts)
        if self.has_bias and ("b", ids[0]) in self._parts:
            b = [self._parts.pop(("b", s)).to(device=opts.device, dtype=opts.dtype) for s in ids]
            self.bias = torch.cat(b)
        self._parts.clear()

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        return ops.linear(x, self.weight, self.bias, out_dtype)

    def describe(self) -> LinearWeights:
        return LinearWeights(self.weight, self.bias)


class ReplicatedLinear(LinearBase):
    """Every rank holds the whole weight (routers, small gates)."""

    def _take(self, tensor, shard, bias=False):
        return tensor


class ColumnParallelLinear(LinearBase):
    """Outputs split across ranks: rank r holds output rows ``r*out/size ...``."""

    def _part_of(self, shard) -> tuple[int, int]:
        return self.tp.part(self.shards()[shard], f"{type(self).__name__} output size")

    def _take(self, tensor, shard, bias=False):
        start, length = self._part_of(shard)
        return narrow_rows(tensor, start, length) if not bias else tensor.narrow(0, start, length)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input in one matmul (gate|up): each rank
    holds its part of every one, stacked in order."""

    def __init__(self, in_features: int, output_sizes: list[int], bias=False, tp: TPInfo = NO_TP):
        super().__init__(in_features, sum(output_sizes), bias, tp)
        self.output_sizes = list(output_sizes)

    def shards(self) -> dict:
        return dict(enumerate(self.output_sizes))


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v in one matmul. Query heads split across ranks; key/value heads too where
    there are at least as many as ranks, else each rank holds (a copy of) the one its query
    heads use."""

    def __init__(
        self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias=False, tp: TPInfo = NO_TP
    ):
        super().__init__(hidden, (num_heads + 2 * num_kv_heads) * head_dim, bias, tp)
        self.head_dim, self.total_heads, self.total_kv_heads = head_dim, num_heads, num_kv_heads
        if num_heads % tp.size:
            raise FormatError(f"{num_heads} attention heads do not split over {tp.size} ranks")
        if num_kv_heads >= tp.size and num_kv_heads % tp.size:
            raise FormatError(f"{num_kv_heads} key/value heads do not split over {tp.size} ranks")
        if num_kv_heads < tp.size and tp.size % num_kv_heads:
            raise FormatError(f"{tp.size} ranks do not share {num_kv_heads} key/value heads evenly")
        self.num_heads = num_heads // tp.size
        self.num_kv_heads = max(1, num_kv_heads // tp.size)

    def shards(self) -> dict:
        d = self.head_dim
        return {"q": self.total_heads * d, "k": self.total_kv_heads * d, "v": self.total_kv_heads * d}

    def _part_of(self, shard) -> tuple[int, int]:
        d, r = self.head_dim, self.tp.rank
        if shard == "q":
            return r * self.num_heads * d, self.num_heads * d
        kv_head = (
            r * self.num_kv_heads
            if self.total_kv_heads >= self.tp.size
            else r * self.total_kv_heads // self.tp.size
        )
        return kv_head * d, self.num_kv_heads * d


class RowParallelLinear(LinearBase):
    """Inputs split across ranks: each rank multiplies its columns and the partial products
    are summed across ranks; the bias is added once (rank 0)."""

    def _take(self, tensor, shard, bias=False):
        if bias:
            return tensor if self.tp.rank == 0 else torch.zeros_like(tensor)
        start, length = self.tp.part(self.in_features, f"{type(self).__name__} input size")
        return narrow_cols(tensor, start, length, dense_fallback=True)

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        out = ops.linear(x, self.weight, self.bias, out_dtype)
        if self.tp.size > 1:
            ops.all_reduce(out)
        return out
