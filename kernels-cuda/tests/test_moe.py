"""The Triton fused MoE of kernels-cuda against the torch reference ``tessera.kernels.moe.fused_moe``
run on expert weights from the `gguf` package's own dequantizers.

Experts come from ``gguf.quants.quantize`` (Q8_0, Q4_0) or are Q4_K blocks written byte by byte
with realistic scales. Errors are measured against the largest output of the reference:

- fp32 x, Q8_0/Q4_0: both sides multiply the same fp32 weights and differ only in the order of
  fp32 sums over <= 256 terms and silu's last bit: 1e-5 of the largest output;
- Q4_K: the layout folds each sub-block scale into fp16 (relative 2^-11 per weight, see
  gguf_layout), and two products compound it: 4 * 2^-11;
- fp16 x: the gate/up intermediate is rounded to fp16 on both sides, from sums taken in another
  order, so one ulp (2^-11) of it can differ and carries through the down product; the output is
  rounded to fp16 too: 2e-3 (plus the Q4_K fold where it applies).
"""

import gguf
import gguf.quants
import numpy as np
import pytest
import torch

from tessera.formats.quantized import QuantizedTensor
from tessera.kernels import moe as reference
from tessera.kernels_cuda import moe
from tessera.kernels_cuda.moe import PackedGPUExperts, fused_moe, prepare_expert_weights

FOLD = 2.0**-11


def q4_k_blocks(rng: np.random.Generator, rows: int, k: int) -> np.ndarray:
    """Q4_K bytes ``[rows, k/256*144]``: d, dmin (fp16), 12 bytes of 6-bit scales and mins, 128 of quants."""
    nb = rows * k // 256

    def f16(lo, hi):
        return rng.uniform(lo, hi, nb).astype(np.float16).view(np.uint8).reshape(nb, 2)

    parts = [f16(1e-4, 5e-4), f16(1e-5, 2e-4), rng.integers(0, 256, (nb, 140), dtype=np.uint8)]
    return np.concatenate(parts, axis=1).reshape(rows, -1)


def experts(scheme: str, e: int, n: int, k: int, seed: int) -> tuple[QuantizedTensor, torch.Tensor]:
    """(a GGUF expert stack ``[e, n, k]``, its float32 values by gguf.quants.dequantize)."""
    rng = np.random.default_rng(seed)
    qtype = gguf.GGMLQuantizationType[scheme]
    if scheme == "Q4_K":
        blocks = q4_k_blocks(rng, e * n, k)
    else:
        blocks = gguf.quants.quantize(rng.standard_normal((e * n, k)).astype(np.float32) * 0.2, qtype)
    values = gguf.quants.dequantize(blocks, qtype).reshape(e, n, k)
    return QuantizedTensor(scheme, torch.from_numpy(blocks.copy()), (e, n, k)), torch.from_numpy(
        values.copy()
    )


def layer(scheme: str, e: int, h: int, i: int, dtype, device, seed: int = 0):
    """(packed gate_up, packed down, their gguf values) for one MoE layer."""
    gu, gu_ref = experts(scheme, e, 2 * i, h, seed)
    dn, dn_ref = experts(scheme, e, h, i, seed + 1)
    pgu, pdn = prepare_expert_weights(gu.to(device), dtype), prepare_expert_weights(dn.to(device), dtype)
    assert isinstance(pgu, PackedGPUExperts) and isinstance(pdn, PackedGPUExperts)
    return pgu, pdn, gu_ref, dn_ref


def tolerance(scheme: str, dtype: torch.dtype) -> float:
    tol = 4 * FOLD if scheme == "Q4_K" else 1e-5
    return tol + (2e-3 if dtype == torch.float16 else 0.0)


def assert_moe(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    err = (got.cpu().double() - want.double()).abs().max().item()
    scale = want.double().abs().max().item()
    assert err <= tol * scale, f"error {err:.3g} beyond {tol:.3g} x max|out| {scale:.3g}"


def test_packed_experts_are_one_matrix_with_the_gguf_values(device):
    pgu, pdn, gu_ref, dn_ref = layer("Q8_0", 5, 64, 96, torch.float32, device)
    assert pgu.shape == (5, 192, 64) and pdn.shape == (5, 64, 96) and pgu.scheme == "Q8_0"
    assert pgu.device.type == device.type and 0 < pgu.nbytes < 5 * 192 * 64 * 1.3
    assert torch.equal(pgu.dequantize(torch.float32).cpu(), gu_ref)
    for e in (0, 3, 4):
        assert torch.equal(pdn.expert(e).dequantize(torch.float32).cpu(), dn_ref[e])
    with pytest.raises(IndexError, match="5 experts"):
        pgu.expert(5)
    qk, qk_ref = experts("Q4_K", 3, 16, 256, seed=9)
    pk = prepare_expert_weights(qk.to(device), torch.float16)
    torch.testing.assert_close(
        pk.dequantize().cpu(), qk_ref, rtol=2 * FOLD, atol=2 * FOLD * qk_ref.abs().max()
    )


def test_sorted_pairs_cover_every_pair_once_in_blocks_of_one_expert(device):
    ids = torch.tensor([[3, 0], [3, 5], [0, 3], [5, 1], [3, 0]], device=device)
    pairs, block_expert = moe._sort_by_expert(ids, 7)
    bm = moe.BLOCK_M
    assert pairs.numel() == block_expert.numel() * bm >= 10 + 7 * (bm - 1)
    pairs, block_expert = pairs.cpu(), block_expert.cpu()
    flat = ids.reshape(-1).cpu()
    real = pairs[pairs < 10]
    assert sorted(real.tolist()) == list(range(10))
    for b, e in enumerate(block_expert.tolist()):
        block = pairs[b * bm : (b + 1) * bm]
        block = block[block < 10]
        if e < 0:
            assert block.numel() == 0
        else:
            assert block.numel() > 0 and (flat[block] == e).all()
            assert block.tolist() == sorted(block.tolist())  # stable: pairs in order
    assert sorted(e for e in block_expert.tolist() if e >= 0) == [0, 1, 3, 5]


CASES = [
    # scheme, x dtype, T, top_k, renormalize, scoring (E=4, H=64, I=96; Q4_K: H=I=256)
    ("Q8_0", torch.float32, 1, 2, True, "softmax"),
    ("Q8_0", torch.float32, 33, 2, True, "softmax"),
    ("Q8_0", torch.float16, 5, 4, False, "sigmoid"),
    ("Q4_0", torch.float16, 33, 1, False, "softmax"),
    ("Q4_0", torch.float32, 5, 4, True, "sigmoid"),
    ("Q4_K", torch.float32, 5, 2, False, "softmax"),
    ("Q4_K", torch.float16, 1, 4, True, "sigmoid"),
]


@pytest.mark.parametrize("scheme,dtype,t,top_k,renormalize,scoring", CASES)
def test_fused_moe_equals_the_reference_on_gguf_experts(
    scheme, dtype, t, top_k, renormalize, scoring, device
):
    h, i = (256, 256) if scheme == "Q4_K" else (64, 96)
    pgu, pdn, gu_ref, dn_ref = layer(scheme, 4, h, i, dtype, device, seed=t)
    x = torch.randn(t, h).to(dtype)
    logits = torch.randn(t, 4) * 2
    got = fused_moe(x.to(device), logits.to(device), pgu, pdn, top_k, renormalize, scoring)
    want = reference.fused_moe(x, logits, gu_ref, dn_ref, top_k, renormalize, scoring)
    assert_moe(got, want, tolerance(scheme, dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_plain_tensor_experts_take_the_same_grouped_gemm(dtype, device):
    """The reference's prepared tensors (fp16 here; fp32 x reads them widened)."""
    gu = torch.randn(6, 2 * 80, 48) * 0.2
    dn = torch.randn(6, 48, 80) * 0.2
    pgu = prepare_expert_weights(gu.to(device), torch.float16)
    pdn = prepare_expert_weights(dn.to(device), torch.float16)
    assert isinstance(pgu, torch.Tensor) and pgu.dtype == torch.float16
    x = torch.randn(17, 48).to(dtype)
    logits = torch.randn(17, 6)
    got = fused_moe(x.to(device), logits.to(device), pgu, pdn, 2, True)
    want = reference.fused_moe(x, logits, pgu.cpu(), pdn.cpu(), 2, True)
    assert_moe(got, want, tolerance("plain", dtype))


def test_all_tokens_on_one_expert_and_experts_without_tokens(device):
    """8 experts; every token's first choice is expert 6 and its second one of 1 or 2: five
    experts get no token, expert 6 gets all 21 (two blocks)."""
    pgu, pdn, gu_ref, dn_ref = layer("Q8_0", 8, 64, 96, torch.float32, device, seed=3)
    x = torch.randn(21, 64)
    logits = torch.randn(21, 8) * 0.1
    logits[:, 6] += 10
    logits[torch.arange(21) % 2 == 0, 1] += 5
    logits[torch.arange(21) % 2 == 1, 2] += 5
    for top_k in (1, 2):
        got = fused_moe(x.to(device), logits.to(device), pgu, pdn, top_k, False, "softmax")
        want = reference.fused_moe(x, logits, gu_ref, dn_ref, top_k, False, "softmax")
        assert_moe(got, want, tolerance("Q8_0", torch.float32))


def test_no_tokens_give_an_empty_output(device):
    pgu, pdn, _, _ = layer("Q4_0", 4, 64, 96, torch.float16, device)
    out = fused_moe(
        torch.empty(0, 64, dtype=torch.float16, device=device), torch.empty(0, 4), pgu, pdn, 2, True
    )
    assert out.shape == (0, 64) and out.dtype == torch.float16


@pytest.mark.parametrize("scheme", ["Q4_K", "plain"])
def test_a_tokens_output_does_not_depend_on_the_other_tokens(scheme, device):
    """Rows of a 33-token call (66 pairs over 4 experts: several blocks per expert) are
    bit-identical to the same token in a call without the tokens after it (fewer blocks, other
    neighbours in its own) and, compiled on a GPU, to the same tokens alone.

    Under the interpreter tl.dot is numpy's matmul (OpenBLAS), whose micro-kernels round a row
    differently by its position in the 16-row tile; a token alone sits at row 0 of its blocks, so
    there only token 0 (at row 0 in both calls) must match alone bit for bit, the others within
    fp16 rounding. Tensor cores give a row the same arithmetic wherever it sits."""
    h, i = (256, 256) if scheme == "Q4_K" else (64, 96)
    if scheme == "Q4_K":
        pgu, pdn, _, _ = layer(scheme, 4, h, i, torch.float16, device, seed=5)
    else:
        pgu = (torch.randn(4, 2 * i, h) * 0.2).half().to(device)
        pdn = (torch.randn(4, h, i) * 0.2).half().to(device)
    x = torch.randn(33, h).half().to(device)
    logits = torch.randn(33, 4).to(device)
    y = fused_moe(x, logits, pgu, pdn, 2, True)
    assert torch.equal(fused_moe(x[:18], logits[:18], pgu, pdn, 2, True)[17], y[17])
    for t in (0, 17, 32):
        alone = fused_moe(x[t : t + 1], logits[t : t + 1], pgu, pdn, 2, True)[0]
        if device.type == "cuda" or t == 0:
            assert torch.equal(alone, y[t])
        else:
            torch.testing.assert_close(alone, y[t], rtol=2e-3, atol=2e-3 * y[t].abs().max().item())


def test_other_inputs_go_to_the_reference(device):
    """Schemes without a layout here are dequantized by the reference; float64 x runs the reference."""
    q2 = QuantizedTensor("Q2_K", torch.zeros(2 * 4 * 256, 84, dtype=torch.uint8), (2, 1024, 256))
    w = prepare_expert_weights(q2.to(device), torch.float32)
    assert isinstance(w, torch.Tensor) and torch.equal(w.cpu(), q2.dequantize())
    pgu, pdn, gu_ref, dn_ref = layer("Q8_0", 4, 64, 96, torch.float32, device)
    x, logits = torch.randn(3, 64, dtype=torch.float64), torch.randn(3, 4)
    got = fused_moe(x.to(device), logits.to(device), pgu, pdn, 2, True)
    want = reference.fused_moe(x, logits, gu_ref, dn_ref, 2, True)
    # the packed weights dequantize in fp32 on the device (an FMA on a GPU, 1 ulp from the
    # CPU's multiply-add); the float64 products on top are exact to 1e-12
    assert_moe(got, want, 1e-12 if device.type == "cpu" else 1e-6)
    with pytest.raises(ValueError, match="top_k 5"):
        fused_moe(x.float().to(device), logits.to(device), pgu, pdn, 5, True)


COMPILE_SCRIPT = r"""
import json, sys
from triton_usage import usage
from tessera.kernels_cuda import moe
from tessera.kernels_cuda.gguf_layout import FORMS

ALIGNED = ["x_ptr", "w_ptr", "lo_ptr", "hi_ptr", "d_ptr", "m_ptr", "pairs_ptr", "out_ptr", "K", "stride_xm",
           "stride_wn", "stride_om", "s_lo", "s_d"]

for arch, scheme, xt, ot in json.loads(sys.argv[1]):
    packed = scheme != "plain"
    f = FORMS[scheme] if packed else FORMS["Q4_0"]
    sig = {"x_ptr": "*" + xt, "w_ptr": "*" + xt, "lo_ptr": "*i32", "hi_ptr": "*i32", "d_ptr": "*fp16",
           "m_ptr": "*fp16", "pairs_ptr": "*i32", "block_expert_ptr": "*i32", "out_ptr": "*" + ot,
           "num_pairs": "i32", "x_row_div": "i32", "N": "i32", "K": "i32", "stride_xm": "i32",
           "stride_wn": "i32", "stride_om": "i32", "s_lo": "i32", "s_hi": "i32", "s_d": "i32", "s_m": "i32"}
    ce = {"PACKED": packed, "HI_BITS": f.hi_bits, "GROUP": f.group, "ZERO": f.zero, "HAS_M": f.has_m,
          "IEEE": xt == "fp32", "BLOCK_M": moe.BLOCK_M, "BLOCK_N": moe.BLOCK_N,
          "BLOCK_K": moe.BLOCK_K_FP32 if xt == "fp32" else moe.BLOCK_K}
    res = usage(moe._moe_gemm_kernel, sig, ce, arch, ALIGNED)
    print(json.dumps([arch, scheme, xt, ot, res["REG"], res["LOCAL"]]), flush=True)
"""


def test_the_grouped_gemm_compiles_for_sm80_and_sm90_without_register_spills(compile_cases):
    """What the interpreter cannot show: the gate_up (bf16 out) and down (fp32 out) variants of
    the kernel compile for the H200 and for sm_80 cards with no local-memory spills."""
    cases = [[90, "Q6_K", "bf16", "bf16"], [90, "Q4_K", "bf16", "fp32"], [80, "Q8_0", "bf16", "fp32"]]
    cases += [[90, "Q5_K", "fp32", "fp32"], [90, "plain", "bf16", "bf16"], [80, "Q5_1", "fp16", "fp16"]]
    results = compile_cases(COMPILE_SCRIPT, cases)
    for arch, scheme, xt, ot, reg, local in results:
        assert local == 0 and reg <= 255, f"sm_{arch} {scheme} {xt}->{ot}: {reg} registers, {local} B spilled"
