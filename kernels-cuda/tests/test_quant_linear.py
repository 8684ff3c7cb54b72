"""The packed GGUF linear of kernels-cuda against the `gguf` package's own dequantizers.

Blocks come from ``gguf.quants.quantize`` on random data where it quantizes the scheme (Q4_0 ..
Q8_0) and are written byte by byte with realistic scales where it does not (Q4_K, Q5_K, Q6_K).
Products are checked against x @ W.T in float64 with W from ``gguf.quants.dequantize``, within a
bound relative to sum_k |x_k w_k| (so cancellation does not hide or fake errors).
"""

import gguf
import gguf.quants
import numpy as np
import pytest
import torch

from tessera.formats.quantized import QuantizedTensor
from tessera.kernels import RowStack
from tessera.kernels_cuda import quant_linear
from tessera.kernels_cuda.quant_linear import PackedGPUWeight, linear, prepare_linear_weight

LEGACY = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
K_QUANTS = ["Q4_K", "Q5_K", "Q6_K"]
# the one rounding of the layout: K-quant sub-block scales folded into fp16 (relative 2^-11)
FOLD = 2.0**-11


def _f16_bytes(rng: np.random.Generator, n: int, lo: float, hi: float) -> np.ndarray:
    return rng.uniform(lo, hi, n).astype(np.float16).view(np.uint8).reshape(n, 2)


def random_blocks(scheme: str, n: int, k: int, seed: int = 0) -> np.ndarray:
    """GGUF bytes ``[n, bytes_per_row]`` of an n x k matrix of ``scheme``."""
    rng = np.random.default_rng(seed)
    qtype = gguf.GGMLQuantizationType[scheme]
    if scheme in LEGACY:
        return gguf.quants.quantize(rng.standard_normal((n, k)).astype(np.float32), qtype)
    nb = n * k // 256
    parts = []
    if scheme in ("Q4_K", "Q5_K"):
        # d = max scale / 63, dmin = max min / 63 for weights up to about 0.5 (dmin may be
        # an fp16 subnormal)
        parts += [_f16_bytes(rng, nb, 1e-4, 5e-4), _f16_bytes(rng, nb, 1e-5, 2e-4)]
        parts.append(rng.integers(0, 256, (nb, 12), dtype=np.uint8))  # packed 6-bit scales, mins
        if scheme == "Q5_K":
            parts.append(rng.integers(0, 256, (nb, 32), dtype=np.uint8))  # qh
        parts.append(rng.integers(0, 256, (nb, 128), dtype=np.uint8))  # qs
    else:  # Q6_K: ql, qh, 16 int8 scales, d
        parts.append(rng.integers(0, 256, (nb, 192), dtype=np.uint8))
        parts.append(rng.integers(-128, 128, (nb, 16), dtype=np.int8).view(np.uint8))
        parts.append(_f16_bytes(rng, nb, 1e-5, 1e-4))  # often an fp16 subnormal, as in real files
    blocks = np.concatenate(parts, axis=1)
    assert blocks.shape[1] == gguf.GGML_QUANT_SIZES[qtype][1]
    return blocks.reshape(n, -1)


def gguf_weight(scheme: str, n: int, k: int, seed: int = 0) -> tuple[QuantizedTensor, torch.Tensor]:
    """(the packed tensor, its float32 values by gguf.quants.dequantize)."""
    blocks = random_blocks(scheme, n, k, seed)
    ref = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[scheme])
    return QuantizedTensor(scheme, torch.from_numpy(blocks.copy()), (n, k)), torch.from_numpy(ref.copy())


def assert_product(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias, tol: float) -> None:
    """|y - (x @ w.T + bias)| <= tol * (|x| @ |w|.T + |bias|), all in float64."""
    xd, wd = x.double(), w.double()
    want = xd @ wd.T
    scale = xd.abs() @ wd.abs().T
    if bias is not None:
        want, scale = want + bias.double(), scale + bias.double().abs()
    err = (y.double() - want).abs()
    worst = (err - tol * scale).max().item()
    assert worst <= 1e-9, f"error {err.max().item():.3g} beyond {tol:.3g} x sum|x w|"


def tolerance(scheme: str, dtype: torch.dtype, out_dtype: torch.dtype) -> float:
    tol = 4 * FOLD if scheme in K_QUANTS else 1e-6  # fp32 sums over a few hundred terms
    if dtype == torch.float16:
        tol += 2 * FOLD  # the weight rounded to fp16, as the reference rounds it
    if out_dtype == torch.float16:
        tol += 2 * FOLD
    return tol


def shape_of(scheme: str, n: int) -> tuple[int, int]:
    # 288 = 9 blocks (a partial 256-input tile); K-quants: three super-blocks
    return (n, 288) if scheme in LEGACY else (n, 768)


@pytest.mark.parametrize("scheme", LEGACY + K_QUANTS)
def test_dequantize_equals_gguf_dequantize(scheme, device):
    qt, ref = gguf_weight(scheme, *shape_of(scheme, 48))
    w = prepare_linear_weight(qt.to(device), torch.float32)
    assert isinstance(w, PackedGPUWeight) and w.device.type == device.type and w.shape == (48, qt.shape[1])
    got = w.dequantize(torch.float32).cpu()
    if scheme in LEGACY:  # the file's own values, rounded as ggml rounds them
        assert torch.equal(got, ref)
        assert torch.equal(w.dequantize(torch.float16).cpu(), ref.half())
    else:  # sub-block scale d*sc and min dmin*m rounded to fp16: 2^-11 of each term
        torch.testing.assert_close(got, ref, rtol=2 * FOLD, atol=2 * FOLD * ref.abs().max().item())
    assert w.nbytes < qt.data.numel() * 1.3


@pytest.mark.parametrize("scheme", K_QUANTS)
def test_k_quant_row_of_one_super_block(scheme, device):
    qt, ref = gguf_weight(scheme, 80, 256, seed=1)
    w = prepare_linear_weight(qt.to(device), torch.float32)
    torch.testing.assert_close(
        w.dequantize().cpu(), ref, rtol=2 * FOLD, atol=2 * FOLD * ref.abs().max().item()
    )
    for m in (1, 17):
        x = torch.randn(m, 256)
        y = linear(x.to(device), w).cpu()
        assert_product(y, x, ref, None, tolerance(scheme, torch.float32, torch.float32))


@pytest.fixture(params=["dot", "words", "words-fast-cvt"])
def gemv(request, monkeypatch):
    """Each few-token kernel: tokens padded to a tensor-core tile, or a program per token by words
    (with q - ZERO by an int-to-float conversion, or through the float 2^23 + q)."""
    monkeypatch.setattr(quant_linear, "GEMV_KERNEL", request.param.split("-")[0])
    monkeypatch.setattr(quant_linear, "WORDS_FAST_CVT", request.param.endswith("fast-cvt"))
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("scheme", LEGACY + K_QUANTS)
def test_linear_equals_x_times_gguf_weights_transposed(scheme, dtype, device, gemv, monkeypatch):
    """M = 1, 3, 8 take the GEMV kernel (its threshold raised to 8), 17 the dequantize + matmul
    path; N = 80 is 5 row blocks of 16."""
    monkeypatch.setattr(quant_linear, "GEMV_MAX_TOKENS", 8)
    qt, ref = gguf_weight(scheme, *shape_of(scheme, 80), seed=2)
    w = prepare_linear_weight(qt.to(device), dtype)
    for m in (1, 3, 8, 17):
        x = torch.randn(m, qt.shape[1]).to(dtype)
        y = linear(x.to(device), w)
        assert y.dtype == dtype and y.shape == (m, 80)
        assert_product(y.cpu(), x, ref, None, tolerance(scheme, dtype, dtype))


@pytest.mark.parametrize("m", [3, 17])
def test_row_stack_of_two_schemes_with_bias_and_fp32_out_from_fp16(m, device):
    """q|k|v as a Q4_K_M file has them: Q4_K, Q4_K and Q6_K parts, plus a plain tensor part."""
    (q, rq), (kk, rk), (v, rv) = (
        gguf_weight(s, n, 256, seed=i) for i, (s, n) in enumerate([("Q4_K", 48), ("Q4_K", 16), ("Q6_K", 24)])
    )
    plain = torch.randn(20, 256) * 0.05
    parts = [prepare_linear_weight(t.to(device), torch.float16) for t in (q, kk, v)]
    stack = RowStack(parts + [plain.half().to(device)])
    ref = torch.cat([rq, rk, rv, plain.half().float()])
    bias = torch.randn(108).half()
    x = torch.randn(2, m, 256).half()
    y = linear(x.to(device), stack, bias.to(device), out_dtype=torch.float32)
    assert y.dtype == torch.float32 and y.shape == (2, m, 108)
    # the GEMV path writes fp32 from its fp32 sums; the cuBLAS path rounds to fp16 first
    gemv = m <= quant_linear.GEMV_MAX_TOKENS
    tol = tolerance("Q6_K", torch.float16, torch.float32 if gemv else torch.float16)
    assert_product(y.cpu().reshape(-1, 108), x.reshape(-1, 256), ref, bias, tol)
    half = linear(x.to(device), stack, bias.to(device))
    assert half.dtype == torch.float16
    tol = tolerance("Q6_K", torch.float16, torch.float16)
    assert_product(half.cpu().reshape(-1, 108), x.reshape(-1, 256), ref, bias, tol)


def test_many_tokens_in_runs_of_rows_across_the_parts_of_a_stack(device, monkeypatch):
    """A buffer of 30 rows for a 24 + 40 + 20-row stack: runs split inside parts and span two."""
    monkeypatch.setattr(quant_linear, "DEQ_BUFFER_MAX", 30 * 256)
    (a, ra), (b, rb) = gguf_weight("Q8_0", 24, 256, seed=5), gguf_weight("Q5_K", 40, 256, seed=6)
    plain = torch.randn(20, 256) * 0.05
    packed = [prepare_linear_weight(t.to(device), torch.float32) for t in (a, b)]
    stack = RowStack(packed + [plain.to(device)])
    bias = torch.randn(84)
    x = torch.randn(3, 7, 256)
    y = linear(x.to(device), stack, bias.to(device))
    assert y.shape == (3, 7, 84)
    ref = torch.cat([ra, rb, plain])
    assert_product(
        y.cpu().reshape(-1, 84), x.reshape(-1, 256), ref, bias, tolerance("Q5_K", *[torch.float32] * 2)
    )


def test_the_kernel_over_several_token_tiles_is_batch_invariant(device, monkeypatch):
    """With the threshold raised (as a measurement may raise it), 33 tokens are three tiles of 16
    and every token's outputs are bit-identical to its outputs alone."""
    monkeypatch.setattr(quant_linear, "GEMV_MAX_TOKENS", 40)
    qt, ref = gguf_weight("Q4_1", 48, 288, seed=7)
    w = prepare_linear_weight(qt.to(device), torch.float16)
    x = torch.randn(33, 288).half()
    y = linear(x.to(device), w)
    assert_product(y.cpu(), x, ref, None, tolerance("Q4_1", torch.float16, torch.float16))
    for t in (0, 20, 32):
        assert torch.equal(linear(x[t : t + 1].to(device), w)[0], y[t])


def test_gemv_rows_do_not_depend_on_the_other_tokens(device, gemv, monkeypatch):
    """Batch invariance of each kernel: token 0's outputs are bit-identical for M = 1..8 (the
    threshold raised to 8, as a measurement may raise it)."""
    monkeypatch.setattr(quant_linear, "GEMV_MAX_TOKENS", 8)
    qt, _ = gguf_weight("Q5_K", 48, 512, seed=3)
    w = prepare_linear_weight(qt.to(device), torch.float16)
    x = torch.randn(quant_linear.GEMV_MAX_TOKENS, 512).half().to(device)
    alone = linear(x[:1], w)
    for m in range(2, quant_linear.GEMV_MAX_TOKENS + 1):
        assert torch.equal(linear(x[:m], w)[:1], alone)


@pytest.mark.parametrize("scheme", ["Q4_0", "Q6_K"])
def test_rows_are_the_embedding_rows(scheme, device):
    qt, ref = gguf_weight(scheme, 40, 256, seed=4)
    w = prepare_linear_weight(qt.to(device), torch.float32)
    ids = torch.tensor([[3, 39, 0], [3, 17, 22]])
    got = w.rows(ids.to(device), torch.float32).cpu()
    assert got.shape == (2, 3, 256)
    torch.testing.assert_close(got, ref[ids], rtol=2 * FOLD, atol=2 * FOLD * ref.abs().max().item())
    assert w.rows(ids.to(device), torch.float16).dtype == torch.float16
    with pytest.raises(IndexError, match="40-row"):
        w.rows(torch.tensor([40]), torch.float32)


def test_other_weights_go_to_the_reference(device):
    """Plain tensors, schemes without a layout here, and K-quant scales beyond fp16."""
    t = torch.randn(16, 32)
    assert torch.equal(prepare_linear_weight(t.to(device), torch.float16).cpu(), t.half())
    q2 = QuantizedTensor("Q2_K", torch.zeros(16, 84, dtype=torch.uint8), (16, 256))
    assert torch.equal(prepare_linear_weight(q2.to(device), torch.float32).cpu(), q2.dequantize())
    blocks = random_blocks("Q6_K", 16, 256)
    blocks[:, 208:210] = np.array([60000.0], dtype=np.float16).view(np.uint8)  # d * 127 > 65504
    huge = QuantizedTensor("Q6_K", torch.from_numpy(blocks.copy()), (16, 256))
    w = prepare_linear_weight(huge.to(device), torch.float32)
    assert isinstance(w, torch.Tensor)
    ref = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q6_K)
    assert torch.equal(w.cpu(), torch.from_numpy(ref.copy()))
    x = torch.randn(2, 256)
    # fp32 on both sides; cuBLAS sums 256 products in another order than the CPU (rtol 1e-5)
    torch.testing.assert_close(linear(x.to(device), w).cpu(), x @ w.cpu().T, rtol=1e-5, atol=0)


COMPILE_SCRIPT = r"""
import json, sys
from triton_usage import usage
from tessera.kernels_cuda import quant_linear as ql
from tessera.kernels_cuda.gguf_layout import FORMS

PLANES = {"lo_ptr": "*i32", "hi_ptr": "*i32", "d_ptr": "*fp16", "m_ptr": "*fp16"}
STRIDES = {"s_lo": "i32", "s_hi": "i32", "s_d": "i32", "s_m": "i32"}
ALIGNED = ["lo_ptr", "hi_ptr", "d_ptr", "m_ptr", "x_ptr", "out_ptr", "K", "s_lo", "s_d", "stride_xm"]

for arch, scheme, xt, ot in json.loads(sys.argv[1]):
    f = FORMS[scheme]
    ce = {"HI_BITS": f.hi_bits, "GROUP": f.group, "ZERO": f.zero, "HAS_M": f.has_m}
    if xt == "dequant":
        sig = {**PLANES, "ids_ptr": "*i64", "out_ptr": "*" + ot, "row0": "i32", "R": "i32", "N": "i32",
               "K": "i32", **STRIDES}
        ce |= {"HAS_IDS": True, "BLOCK_N": ql.DEQ_BLOCK_N, "BLOCK_K": ql.DEQ_BLOCK_K}
        res = usage(ql._dequant_kernel, sig, ce, arch, ALIGNED)
    elif xt.startswith("words-"):
        xt = xt[len("words-"):]
        sig = {"x_ptr": "*" + xt, **PLANES, "bias_ptr": "*" + ot, "out_ptr": "*" + ot, "M": "i32", "N": "i32",
               "K": "i32", **STRIDES, "stride_xm": "i32", "stride_om": "i32"}
        ce |= {"HAS_BIAS": True, "BLOCK_N": ql.WORDS_BLOCK_N, "BLOCK_W": ql.WORDS_BLOCK_W,
               "FAST_CVT": arch == 90}  # both forms compile without spills
        res = usage(ql._qgemv_words_kernel, sig, ce, arch, ALIGNED, num_warps=ql.WORDS_WARPS,
                    num_stages=ql.WORDS_STAGES)
    else:
        sig = {"x_ptr": "*" + xt, **PLANES, "bias_ptr": "*" + ot, "out_ptr": "*" + ot, "M": "i32", "N": "i32",
               "K": "i32", **STRIDES, "stride_xm": "i32", "stride_om": "i32"}
        bk = ql.GEMV_BLOCK_K_FP32 if xt == "fp32" else ql.GEMV_BLOCK_K
        ce |= {"HAS_BIAS": True, "IEEE": xt == "fp32", "BLOCK_M": ql.GEMV_BLOCK_M, "BLOCK_N": ql.GEMV_BLOCK_N,
               "BLOCK_K": bk}
        res = usage(ql._qgemv_kernel, sig, ce, arch, ALIGNED)
    print(json.dumps([arch, scheme, xt, ot, res]), flush=True)
"""


def test_kernels_compile_for_sm80_and_sm90_without_register_spills(compile_cases):
    """What the interpreter cannot show: every scheme's GEMV (bf16 in, bf16 out) and a few other
    variants compile for the H200 and for sm_80 cards, with no local-memory spills."""
    cases = [[90, s, "bf16", "bf16"] for s in LEGACY + K_QUANTS]
    cases += [[90, "Q5_K", "fp32", "fp32"], [80, "Q5_1", "bf16", "fp32"], [90, "Q6_K", "dequant", "bf16"]]
    cases += [[arch, s, "words-bf16", "bf16"] for arch in (80, 90) for s in LEGACY + K_QUANTS]
    cases += [[90, "Q4_K", "words-fp32", "fp32"]]
    results = compile_cases(COMPILE_SCRIPT, cases)
    for arch, scheme, xt, ot, res in results:
        assert res["LOCAL"] == 0, f"sm_{arch} {scheme} {xt}->{ot} spills: {res}"
        assert res["REG"] <= 255


@pytest.mark.parametrize("m", [1, 17])
def test_input_segments_of_three_schemes_behind_a_permutation(m, device):
    """GPTQ act-order / EXL2 as the backends get them: the inputs permuted, then Q8_0 | Q5_1 |
    Q4_1 ranges (6-8, 5 and <=4-bit groups); a RowStack of two such weights (q|k with one
    permutation). The product is x @ W.T with W's columns put back in input order."""
    from tessera.kernels import InputSegments

    k = 96 + 64 + 128
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(3))

    def segmented(n, seed):
        parts, refs, k0 = [], [], 0
        for i, (scheme, width) in enumerate([("Q8_0", 96), ("Q5_1", 64), ("Q4_1", 128)]):
            qt, ref = gguf_weight(scheme, n, width, seed=seed + i)
            parts.append((k0, k0 + width, prepare_linear_weight(qt.to(device), torch.float32)))
            refs.append(ref)
            k0 += width
        stored = torch.cat(refs, dim=1)
        return InputSegments(perm.to(device), parts), torch.empty_like(stored).index_copy_(1, perm, stored)

    (wq, rq), (wk, rk) = segmented(32, 0), segmented(16, 10)
    x = torch.randn(m, k)
    assert_product(linear(x.to(device), wq).cpu(), x, rq, None, 1e-6)
    torch.testing.assert_close(wq.dequantize().cpu(), rq, rtol=0, atol=0)
    bias = torch.randn(48)
    y = linear(x.to(device), RowStack([wq, wk]), bias.to(device))
    assert y.shape == (m, 48)
    assert_product(y.cpu(), x, torch.cat([rq, rk]), bias, 1e-6)
