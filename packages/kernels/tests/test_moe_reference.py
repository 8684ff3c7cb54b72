"""The fused_moe reference against HF transformers' own sparse MoE blocks (Mixtral, Qwen3-MoE,
Qwen2-MoE) built from tiny configs with random weights, and against a dense formulation."""

import pytest
import torch
import torch.nn.functional as F

from tessera.formats import QuantizedTensor
from tessera.kernels import lookup, moe, ops

H, INTER, E, T = 64, 32, 8, 13


def _randomize(block: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _hf_block(name: str, top_k: int, seed: int):
    transformers = pytest.importorskip("transformers")
    common = dict(hidden_size=H, num_experts_per_tok=top_k, hidden_act="silu")
    if name == "mixtral":
        config = transformers.MixtralConfig(intermediate_size=INTER, num_local_experts=E, **common)
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as Block
    elif name == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(
            moe_intermediate_size=INTER, num_experts=E, norm_topk_prob=True, **common
        )
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock as Block
    else:
        config = transformers.Qwen2MoeConfig(
            moe_intermediate_size=INTER,
            shared_expert_intermediate_size=INTER,
            num_experts=E,
            norm_topk_prob=False,
            **common,
        )
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock as Block
    config._experts_implementation = "eager"
    block = Block(config).eval()
    _randomize(block, seed)
    if name == "qwen2_moe":  # the shared expert is not part of fused_moe: make its output 0
        with torch.no_grad():
            block.shared_expert.down_proj.weight.zero_()
    return block


@pytest.mark.parametrize("name,renormalize", [("mixtral", True), ("qwen3_moe", True), ("qwen2_moe", False)])
@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_the_reference_is_the_transformers_sparse_moe_block(name, renormalize, top_k):
    block = _hf_block(name, top_k, seed=top_k)
    x = torch.randn(T, H)
    with torch.no_grad():
        expected = block(x[None])
        if isinstance(expected, tuple):
            expected = expected[0]
        logits = F.linear(x, block.gate.weight)
        ours = ops.fused_moe(
            x, logits, block.experts.gate_up_proj, block.experts.down_proj, top_k, renormalize
        )
    torch.testing.assert_close(ours, expected.reshape(T, H), rtol=1e-5, atol=1e-5)


def dense_moe(x, logits, gate_up, down, top_k, renormalize, scoring):
    """Every expert on every token, weighted by a [T, E] matrix that is zero off the top k."""
    scores = logits.float().softmax(-1) if scoring == "softmax" else logits.float().sigmoid()
    top = scores.topk(top_k, dim=-1)
    w = torch.zeros_like(scores).scatter(1, top.indices, top.values)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    gate, up = torch.einsum("th,enh->etn", x, gate_up).chunk(2, dim=-1)
    y = torch.einsum("eti,ehi->eth", F.silu(gate) * up, down)
    return torch.einsum("te,eth->th", w, y)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_the_reference_equals_a_dense_every_expert_formulation(scoring, renormalize):
    x, logits = torch.randn(T, H), torch.randn(T, E)
    gate_up, down = torch.randn(E, 2 * INTER, H) * 0.2, torch.randn(E, H, INTER) * 0.2
    ours = moe.fused_moe(x, logits, gate_up, down, 3, renormalize, scoring)
    torch.testing.assert_close(ours, dense_moe(x, logits, gate_up, down, 3, renormalize, scoring))


def test_routing_is_fp32_and_renormalized_weights_sum_to_one():
    logits = torch.randn(T, E).bfloat16()
    w, ids = moe.route(logits, 3, True)
    assert w.dtype == torch.float32 and ids.shape == (T, 3)
    torch.testing.assert_close(w.sum(-1), torch.ones(T))
    w_sig, _ = moe.route(logits, 3, False, "sigmoid")
    torch.testing.assert_close(w_sig, logits.float().sigmoid().topk(3).values)


def test_quantized_expert_weights_are_prepared_as_their_dequantized_tensor():
    rows = torch.randint(0, 256, (E * 2 * INTER, 34), dtype=torch.uint8)
    rows[:, :2] = torch.tensor([0.01], dtype=torch.float16).view(torch.uint8)
    qt = QuantizedTensor("Q8_0", rows, (E, 2 * INTER, 32))
    prepared = lookup("prepare_expert_weights", "meta")(qt, torch.bfloat16)
    assert prepared.shape == (E, 2 * INTER, 32) and prepared.dtype == torch.bfloat16
    assert torch.equal(prepared, qt.dequantize(torch.bfloat16))
    # the reference multiplies with a packed stack too, one expert at a time
    x, logits, down = torch.randn(3, 32), torch.randn(3, E), torch.randn(E, 32, INTER)
    torch.testing.assert_close(
        moe.fused_moe(x, logits, qt, down, 2, True), moe.fused_moe(x, logits, qt.dequantize(), down, 2, True)
    )


def test_bad_arguments_are_refused_by_name():
    x, logits = torch.randn(2, H), torch.randn(2, E)
    gate_up, down = torch.randn(E, 2 * INTER, H), torch.randn(E, H, INTER)
    with pytest.raises(ValueError, match="unknown MoE scoring 'softmax2'"):
        moe.fused_moe(x, logits, gate_up, down, 2, True, "softmax2")
    with pytest.raises(ValueError, match="top_k 9 is not between 1 and the number of experts"):
        moe.fused_moe(x, logits, gate_up, down, 9, True)
    with pytest.raises(ValueError, match=r"needs gate_up \[E, 2I, H\]"):
        moe.fused_moe(x, logits, gate_up[:, :, :32], down, 2, True)
    with pytest.raises(ValueError, match=r"expert weights are \[E, N, K\]"):
        moe.prepare_expert_weights(torch.randn(4, 4), torch.float32)
