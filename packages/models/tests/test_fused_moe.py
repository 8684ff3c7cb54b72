"""FusedMoE's loading: per-expert, GGUF-stacked and transformers-5-fused tensors give the same
expert weights; tensor-parallel ranks hold slices of each expert's intermediate dimension that
put together give the whole layer; packed experts stay packed."""

import pytest
import torch

gguf = pytest.importorskip("gguf")

from tessera.formats import FormatError, QuantizedTensor  # noqa: E402
from tessera.kernels import ops  # noqa: E402
from tessera.models import LoadOptions, TPInfo  # noqa: E402
from tessera.models.moe import FusedMoE  # noqa: E402
from tessera.models.weight_map import WeightMap  # noqa: E402

H, INTER, E, TOP_K = 64, 64, 4, 2  # hidden, expert intermediate size, experts, k


def weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "router": torch.randn(E, H, generator=g),
        "gate": torch.randn(E, INTER, H, generator=g) * 0.2,
        "up": torch.randn(E, INTER, H, generator=g) * 0.2,
        "down": torch.randn(E, H, INTER, generator=g) * 0.2,
    }


def quantized(t: torch.Tensor, scheme: str) -> QuantizedTensor:
    kind = gguf.GGMLQuantizationType[scheme]
    raw = gguf.quants.quantize(t.numpy(), kind)
    return QuantizedTensor(scheme, torch.from_numpy(raw.reshape(-1, raw.shape[-1]).copy()), tuple(t.shape))


def checkpoint(w, layout: str, schemes=("Q8_0", "Q8_0", "Q8_0")) -> list:
    """(name, tensor) as a checkpoint of ``layout`` holds the layer ``model.layers.0.mlp``."""
    if layout == "per_expert":
        out = [("model.layers.0.mlp.gate.weight", w["router"])]
        for e in range(E):
            for which in ("gate", "up", "down"):
                out.append((f"model.layers.0.mlp.experts.{e}.{which}_proj.weight", w[which][e]))
        return out
    if layout == "transformers_5":
        gate_up = torch.cat([w["gate"], w["up"]], dim=1)
        return [
            ("model.layers.0.mlp.gate.weight", w["router"]),
            ("model.layers.0.mlp.experts.gate_up_proj", gate_up),
            ("model.layers.0.mlp.experts.down_proj", w["down"]),
        ]
    stacks = [
        (f"blk.0.ffn_{x}_exps.weight", quantized(w[x], s))
        for x, s in zip(("gate", "up", "down"), schemes, strict=True)
    ]
    return [("blk.0.ffn_gate_inp.weight", w["router"]), *stacks]


def load(w, layout, tp: TPInfo | None = None, opts: LoadOptions | None = None, **kw) -> FusedMoE:
    moe = FusedMoE(H, INTER, E, TOP_K, True, tp or TPInfo())
    wm = WeightMap("qwen3_moe")
    moe.declare(wm, "model.layers.0.mlp", "blk.0")
    wm.load(checkpoint(w, layout, **kw))
    moe.finish(opts or LoadOptions())
    return moe


def dense(stack) -> torch.Tensor:
    return stack if isinstance(stack, torch.Tensor) else stack.dequantize(torch.float32)


@pytest.mark.parametrize("layout", ["per_expert", "transformers_5", "gguf"])
def test_the_layouts_load_as_gate_then_up_rows_per_expert(layout):
    w = weights()
    moe = load(w, layout)
    if layout == "gguf":  # what the file holds
        w = {x: quantized(w[x], "Q8_0").dequantize() for x in ("gate", "up", "down")}
    assert torch.equal(dense(moe.gate_up), torch.cat([w["gate"], w["up"]], dim=1))
    assert torch.equal(dense(moe.down), w["down"])


@pytest.mark.parametrize("layout", ["per_expert", "transformers_5", "gguf"])
def test_two_ranks_shards_put_together_are_the_whole_layer(layout):
    w = weights(1)
    whole = load(w, layout)
    ranks = [load(w, layout, TPInfo(r, 2)) for r in range(2)]
    half = INTER // 2
    for part in ranks:
        assert part.gate_up.shape == (E, 2 * half, H) and part.down.shape == (E, H, half)
    gate = torch.cat([dense(p.gate_up)[:, :half] for p in ranks], dim=1)
    up = torch.cat([dense(p.gate_up)[:, half:] for p in ranks], dim=1)
    down = torch.cat([dense(p.down) for p in ranks], dim=2)
    assert torch.equal(torch.cat([gate, up], dim=1), dense(whole.gate_up))
    assert torch.equal(down, dense(whole.down))
    # each rank's partial output (before the all-reduce) sums to the whole layer's output
    x = torch.randn(9, H, generator=torch.Generator().manual_seed(2))
    partial = sum(p.forward(x, reduce=False) for p in ranks)
    torch.testing.assert_close(partial, whole.forward(x), atol=1e-5, rtol=1e-5)


def test_packed_experts_with_one_scheme_are_handed_over_packed_and_mixed_ones_dequantized(monkeypatch):
    seen = []
    real = ops.prepare_expert_weights
    monkeypatch.setattr(ops, "prepare_expert_weights", lambda wt, dt: seen.append(wt) or real(wt, dt))
    w = weights(3)
    opts = LoadOptions(packed_weights=True)
    load(w, "gguf", opts=opts, schemes=("Q8_0", "Q8_0", "Q4_0"))
    gate_up, down = seen
    assert (
        isinstance(gate_up, QuantizedTensor)
        and gate_up.shape == (E, 2 * INTER, H)
        and gate_up.scheme == "Q8_0"
    )
    ref = torch.cat([quantized(w["gate"], "Q8_0").dequantize(), quantized(w["up"], "Q8_0").dequantize()], 1)
    assert torch.equal(gate_up.dequantize(), ref)  # expert e's gate bytes, then its up bytes
    assert isinstance(down, QuantizedTensor) and down.scheme == "Q4_0"
    seen.clear()
    load(w, "gguf", opts=opts, schemes=("Q8_0", "Q4_0", "Q4_0"))
    assert isinstance(seen[0], torch.Tensor) and seen[0].shape == (E, 2 * INTER, H)


def test_experts_given_twice_are_refused():
    w = weights()
    moe = FusedMoE(H, INTER, E, TOP_K, True)
    wm = WeightMap("qwen3_moe")
    moe.declare(wm, "model.layers.0.mlp", "blk.0")
    both = checkpoint(w, "per_expert") + checkpoint(w, "transformers_5")[1:]
    with pytest.raises(FormatError, match="model.layers.0.mlp.experts.gate_up_proj appears twice"):
        wm.load(both)


def test_a_quantized_down_stack_splits_only_at_whole_blocks():
    w = weights()
    with pytest.raises(FormatError, match="Q8_0 weight can be split only at multiples of 32"):
        load(w, "gguf", TPInfo(0, 4))  # 16 of the 64 intermediate columns each


def test_the_expected_gguf_tensors_are_the_expert_stacks():
    from tessera.formats import ModelConfig
    from tessera.models import expected_shapes

    c = ModelConfig(
        "qwen2_moe", vocab_size=32, hidden_size=H, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, qkv_bias=True, num_experts=E,
        num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48,
        norm_topk_prob=False, dense_layers=(1,),
    )  # fmt: skip
    shapes = expected_shapes(c, "gguf")
    assert shapes["blk.0.ffn_gate_exps.weight"] == (E, 32, H)
    assert shapes["blk.0.ffn_down_exps.weight"] == (E, H, 32)
    assert shapes["blk.0.ffn_gate_inp.weight"] == (E, H)
    assert shapes["blk.0.ffn_gate_inp_shexp.weight"] == (1, H)
    assert shapes["blk.0.ffn_down_shexp.weight"] == (H, 48)
    assert shapes["blk.1.ffn_down.weight"] == (H, 96)  # the dense layer
    assert not any("exps" in n for n in shapes if n.startswith("blk.1."))
    assert "model.layers.0.mlp.experts.3.down_proj.weight" in expected_shapes(c, "hf")
