"""Tensor-parallel weight loading: each rank's part, put back together, is the whole weight,
for float, packed (GGUF), GPTQ and EXL2 weights, at 2 and 3 ranks; size 1 holds everything."""

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from tessera.formats import EXL2Tensor, FormatError, GPTQTensor, GroupQuant, QuantizedTensor, exl2_parts  # noqa: E402
from tessera.formats.exl2 import exl2_tensor  # noqa: E402
from tessera.models import (  # noqa: E402
    ColumnParallelLinear,
    LoadOptions,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    TPInfo,
)

OPTS = LoadOptions(torch.float32)


def gptq_weight(rows: int, cols: int, seed: int) -> GPTQTensor:
    """A 4-bit act-order GPTQ (v2) weight: 8 inputs a word, low nibble first."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (cols, rows), generator=g)
    z = torch.randint(0, 16, (cols // 32, rows), generator=g)
    shifts = torch.arange(8) * 4
    qweight = (q.reshape(cols // 8, 8, rows) << shifts[:, None]).sum(1).to(torch.int32)
    qzeros = (z.reshape(cols // 32, rows // 8, 8) << shifts).sum(-1).to(torch.int32)
    scales = torch.rand(cols // 32, rows, generator=g).half()
    g_idx = (torch.randperm(cols, generator=g) // 32).to(torch.int32)
    return GPTQTensor("gptq", 4, 32, False, True, qweight, qzeros, scales, g_idx, (rows, cols))


def exl2_weight(rows: int, cols: int, seed: int) -> EXL2Tensor:
    """An EXL2 weight of 8-, 6-, 4- and 3-bit groups behind a random input permutation."""
    g = torch.Generator().manual_seed(seed)
    starts, bits = (0, 32, 64, cols - 32, cols), (8, 6, 4, 3)
    sizes = torch.tensor([b - a for a, b in zip(starts, starts[1:], strict=False)])
    top = torch.repeat_interleave(torch.tensor([2**b for b in bits]), sizes)
    q = (torch.rand(rows, cols, generator=g) * top).to(torch.uint8)
    # one power-of-two scale per group: each row at level 16 of its group's max (on EXL2's grid)
    scale = torch.tensor([2.0**-4, 2.0**-5, 2.0**-6, 2.0**-7]).expand(rows, -1).contiguous()
    zero = torch.tensor([2.0 ** (b - 1) for b in bits]).expand(rows, -1).contiguous()
    groups = GroupQuant((rows, cols), q, scale, zero, starts, bits, torch.randperm(cols, generator=g))
    return exl2_tensor("w", exl2_parts(groups), "test")


def weight(rows: int, cols: int, packed, seed: int):
    if packed in ("gptq", "exl2"):  # dequantized whole for one rank, else dequantized and cut
        qt = gptq_weight(rows, cols, seed) if packed == "gptq" else exl2_weight(rows, cols, seed)
        return qt, qt.dequantize()
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    if not packed:
        return w, w
    raw = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0)
    qt = QuantizedTensor("Q8_0", torch.from_numpy(raw.view(np.uint8)).clone(), (rows, cols))
    return qt, qt.dequantize()


def loaded(layer, tensors: dict) -> torch.Tensor:
    for shard, t in tensors.items():
        layer.load_weight(t, shard)
    layer.finish(OPTS)
    return layer.weight


@pytest.mark.parametrize("packed", [False, True, "gptq", "exl2"])
@pytest.mark.parametrize("size", [1, 2, 3])
def test_column_and_row_parallel_shards_make_the_whole_weight(packed, size):
    w, whole = weight(96, 192, packed, 0)
    cols = [loaded(ColumnParallelLinear(192, 96, tp=TPInfo(r, size)), {None: w}) for r in range(size)]
    assert torch.equal(torch.cat(cols, dim=0), whole)
    w, whole = weight(96, 192, packed, 1)
    rows = [loaded(RowParallelLinear(192, 96, tp=TPInfo(r, size)), {None: w}) for r in range(size)]
    assert torch.equal(torch.cat(rows, dim=1), whole)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("size", [2, 3])
def test_merged_column_shards_stack_each_part(packed, size):
    (g, gw), (u, uw) = weight(96, 64, packed, 2), weight(96, 64, packed, 3)
    parts = [
        loaded(MergedColumnParallelLinear(64, [96, 96], tp=TPInfo(r, size)), {0: g, 1: u})
        for r in range(size)
    ]
    k = 96 // size
    assert torch.equal(torch.cat([p[:k] for p in parts]), gw)
    assert torch.equal(torch.cat([p[k:] for p in parts]), uw)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("size,kv_heads", [(2, 2), (3, 3), (2, 1), (3, 1)])
def test_qkv_shards_split_query_heads_and_split_or_share_kv_heads(packed, size, kv_heads):
    d, heads = 32, 6
    (q, qw), (k, kw), (v, vw) = (
        weight(n * d, 64, packed, s) for s, n in enumerate((heads, kv_heads, kv_heads))
    )
    layers = [QKVParallelLinear(64, d, heads, kv_heads, tp=TPInfo(r, size)) for r in range(size)]
    parts = [loaded(layer, {"q": q, "k": k, "v": v}) for layer in layers]
    hq, hk = heads // size * d, layers[0].num_kv_heads * d
    assert torch.equal(torch.cat([p[:hq] for p in parts]), qw)
    got_k = [p[hq : hq + hk] for p in parts]
    got_v = [p[hq + hk :] for p in parts]
    if kv_heads >= size:
        assert torch.equal(torch.cat(got_k), kw) and torch.equal(torch.cat(got_v), vw)
    else:  # each rank holds a copy of the KV head its query heads use
        for r in range(size):
            head = r * kv_heads // size
            assert torch.equal(got_k[r], kw[head * d : (head + 1) * d])
            assert torch.equal(got_v[r], vw[head * d : (head + 1) * d])


def test_a_weight_that_does_not_split_evenly_is_refused_by_name():
    with pytest.raises(FormatError, match="does not split over 3"):
        loaded(ColumnParallelLinear(64, 100, tp=TPInfo(0, 3)), {None: torch.zeros(100, 64)})


def test_a_packed_weight_cut_inside_its_blocks_is_dequantized_exactly_for_its_rank():
    w, whole = weight(32, 96, True, 0)  # Q8_0: blocks of 32 inputs; 48 a rank
    parts = [loaded(RowParallelLinear(96, 32, tp=TPInfo(r, 2)), {None: w}) for r in range(2)]
    assert all(isinstance(p, torch.Tensor) for p in parts)
    assert torch.equal(torch.cat(parts, dim=1), whole)
