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
from tessera.kernels_cuda import native, quant_linear
from tessera.kernels_cuda.gguf_layout import FORMS, repack
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
    and every token's outputs are bit-identical to its outputs alone (the dot kernel: its tile of
    tokens is what is tested)."""
    monkeypatch.setattr(quant_linear, "GEMV_MAX_TOKENS", 40)
    monkeypatch.setattr(quant_linear, "GEMV_KERNEL", "dot")
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
    # fp32 on both sides; cuBLAS sums 256 products in another order than the CPU: 1e-6 of
    # sum |x w| (a bound relative to each output fails under cancellation)
    assert_product(linear(x.to(device), w).cpu(), x, w.cpu(), None, 1e-6)


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
    tol = 1e-6 + NATIVE_TOL  # one token: csrc/qgemv.cu's int8 products where it is built
    assert_product(linear(x.to(device), wq).cpu(), x, rq, None, tol)
    torch.testing.assert_close(wq.dequantize().cpu(), rq, rtol=0, atol=0)
    bias = torch.randn(48)
    y = linear(x.to(device), RowStack([wq, wk]), bias.to(device))
    assert y.shape == (m, 48)
    assert_product(y.cpu(), x, torch.cat([rq, rk]), bias, tol)


# -- csrc/qgemv.cu ------------------------------------------------------------------------------
# The few-token quantized GEMV with int8 dot products. Without a GPU, a step-by-step NumPy model
# of the kernel's integer arithmetic (the activations' two int8 levels and their permutation
# within 8 inputs, each word's low nibbles and spread high bits, the byte dot products, the
# per-group scale algebra) is checked against x @ W.T: the derivation of the bit tricks, tested
# where it can be. With a GPU the compiled kernel is checked against the same references.

# |x - s (a + b/254)| <= s/508 = max|x|/64516 per input: relative to sum |x w| of Gaussian x that
# is below 4/(0.8 * 64516) ~ 8e-5 (max|x| of 32 normal values under 4 sigma, mean |x| 0.8 sigma)
NATIVE_TOL = 1e-4


def quantize_model(x: np.ndarray):
    """The q8x2 kernel: x [M, K] -> a, b int8 [M, K] (permuted), s [M, K/32], sums of 16 [M, K/16]."""
    m, k = x.shape
    g = x.reshape(m, k // 32, 32).astype(np.float32)
    amax = np.abs(g).max(-1, keepdims=True)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    u = g * inv
    a = np.clip(np.rint(u), -127, 127)
    b = np.clip(np.rint((u - a) * np.float32(254)), -127, 127)
    slot = np.array([(j & ~7) + (j & 1) * 4 + ((j & 7) >> 1) for j in range(32)])
    pa, pb = np.empty_like(a), np.empty_like(b)
    pa[..., slot], pb[..., slot] = a, b
    sums = g.reshape(m, k // 16, 16).sum(-1)
    return pa.astype(np.int8).reshape(m, k), pb.astype(np.int8).reshape(m, k), amax[..., 0] / 127, sums


def unpack_model(lo: np.ndarray, hi_bits: np.ndarray, hi: int, flip: bool):
    """unpack_word for arrays of uint32 words: (A, B) as uint32."""
    a, b = lo & 0x0F0F0F0F, (lo >> 4) & 0x0F0F0F0F
    if hi == 4:
        a |= (hi_bits << 4) & 0xF0F0F0F0
        b |= hi_bits & 0xF0F0F0F0
    elif hi == 2:
        s = hi_bits & 0xFFFF
        s = (s | (s << 8)) & 0x00FF00FF
        s = (s | (s << 4)) & 0x0F0F0F0F
        a |= (s & 0x03030303) << 4
        b |= (s & 0x0C0C0C0C) << 2
    elif hi == 1:
        s = hi_bits & 0xFF
        s = (s | (s << 12)) & 0x000F000F
        s = (s | (s << 6)) & 0x03030303
        a |= (s & 0x01010101) << 4
        b |= (s & 0x02020202) << 3
    if flip:
        a ^= 0x80808080
        b ^= 0x80808080
    return a.astype(np.uint32), b.astype(np.uint32)


def dp4a(words: np.ndarray, xw: np.ndarray) -> np.ndarray:
    """Signed byte dot products of int32 words, elementwise: [..] x [..] -> int64 [..]."""
    wb = words.astype(np.uint32).view(np.int8).reshape(*words.shape, 4).astype(np.int64)
    xb = xw.astype(np.int32).view(np.int8).reshape(*xw.shape, 4).astype(np.int64)
    return (wb * xb).sum(-1)


def gemv_model(x: np.ndarray, planes, scheme: str) -> np.ndarray:
    """The qgemv kernel's arithmetic for every token and row (fp64 where it sums in fp32)."""
    f = FORMS[scheme]
    lo = planes.lo.numpy().view(np.uint32)  # [N, K/8]
    n, w8 = lo.shape
    k = w8 * 8
    gcount = k // 32
    xa, xb, xs, xsum = quantize_model(x)
    xa_w = xa.view(np.int32).reshape(x.shape[0], gcount, 8)  # per group: word k even, odd
    xb_w = xb.view(np.int32).reshape(x.shape[0], gcount, 8)
    words = lo.reshape(n, gcount, 4)
    if f.hi_bits == 4:
        hb = planes.hi.numpy().view(np.uint32).reshape(n, gcount, 4)
    elif f.hi_bits == 2:
        h = planes.hi.numpy().view(np.uint32).reshape(n, gcount, 2)
        hb = np.stack([h[..., 0], h[..., 0] >> 16, h[..., 1], h[..., 1] >> 16], -1)
    elif f.hi_bits == 1:
        h = planes.hi.numpy().view(np.uint32).reshape(n, gcount, 1)
        hb = np.concatenate([h >> (8 * j) for j in range(4)], -1)
    else:
        hb = np.zeros_like(words)
    A, B = unpack_model(words, hb, f.hi_bits, f.zero == 128)
    d = planes.d.float().numpy().astype(np.float64).reshape(n, gcount, -1)
    m = planes.m.float().numpy().astype(np.float64) if planes.m is not None else None
    out = np.zeros((x.shape[0], n))
    for t in range(x.shape[0]):
        # [N, G, 4 words] x the token's [G, 4] even/odd x words
        ia = dp4a(A, xa_w[t, :, 0::2][None]) + dp4a(B, xa_w[t, :, 1::2][None])
        ib = dp4a(A, xb_w[t, :, 0::2][None]) + dp4a(B, xb_w[t, :, 1::2][None])
        s = xs[t][None, :].astype(np.float64)
        h = s[..., None] * (ia + ib / 254.0)  # [N, G, 4]: per word
        halves = np.stack([h[..., :2].sum(-1), h[..., 2:].sum(-1)], -1)  # per 16 inputs
        sum16 = xsum[t].reshape(gcount, 2)[None].astype(np.float64)
        if f.group == 16:
            v = (d * halves).sum(-1)
            zero_sums = (d * sum16).sum(-1)
        else:
            v = d[..., 0] * halves.sum(-1)
            zero_sums = d[..., 0] * sum16.sum(-1)
        if f.zero and f.zero != 128:
            v -= f.zero * zero_sums
        if m is not None:
            v += m * sum16.sum(-1)
        out[t] = v.sum(-1)
    return out


@pytest.mark.parametrize("scheme", LEGACY + K_QUANTS)
def test_the_kernels_integer_arithmetic_equals_x_times_gguf_weights(scheme):
    qt, ref = gguf_weight(scheme, *shape_of(scheme, 40), seed=11)
    planes = repack(scheme, qt.rows(), qt.shape[1])
    x = np.random.default_rng(3).standard_normal((3, qt.shape[1])).astype(np.float32)
    y = torch.from_numpy(gemv_model(x, planes, scheme))
    tol = tolerance(scheme, torch.float32, torch.float32) + NATIVE_TOL
    assert_product(y, torch.from_numpy(x), ref, None, tol)


def test_the_two_int8_levels_are_within_1_508th_of_the_scale():
    x = np.random.default_rng(0).standard_normal((2, 256)).astype(np.float32) * 50
    x[0, :32] = 0.0  # an all-zero group: scale 0, levels 0
    a, b, s, sums = quantize_model(x)
    slot = np.array([(j & ~7) + (j & 1) * 4 + ((j & 7) >> 1) for j in range(32)])
    back = (a.reshape(2, 8, 32)[..., slot] + b.reshape(2, 8, 32)[..., slot] / 254.0) * s[..., None]
    err = np.abs(back.reshape(2, 256) - x)
    assert (err <= np.repeat(s, 32, axis=1) / 508 * (1 + 1e-5) + 1e-30).all()
    assert s[0, 0] == 0 and not a[0, :32].any() and not b[0, :32].any()
    np.testing.assert_allclose(sums, x.reshape(2, 16, 16).sum(-1), rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("k", [32, 288, 576, 768, 4096, 14336])
def test_the_quantized_x_buffer_keeps_every_part_aligned_for_the_vector_loads(k):
    """(An 8-byte load of the sums at a 4-byte offset was a misaligned address on the H200 for
    K = 288, one token.)"""
    for m in range(1, quant_linear.NATIVE_MAX_TOKENS + 1):
        xs_at, sums_at, size = quant_linear._x_layout(m, k)
        assert m * k % 16 == 0 and xs_at % 16 == 0 and sums_at % 16 == 0
        assert xs_at + 4 * m * (k // 32) <= sums_at and size == sums_at + 8 * m * (k // 32)


# -- the compiled kernel ------------------------------------------------------------------------

needs_library = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the compiled kernel needs a CUDA GPU (its arithmetic: above)"
)


@pytest.fixture
def native_gemv(monkeypatch):
    if native.library() is None:
        pytest.skip("the CUDA C++ library could not be built here (see the log)")
    monkeypatch.setattr(quant_linear, "GEMV_KERNEL", "native")


@needs_library
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scheme", LEGACY + K_QUANTS)
def test_native_linear_equals_x_times_gguf_weights(scheme, dtype, native_gemv):
    qt, ref = gguf_weight(scheme, *shape_of(scheme, 72), seed=2)
    w = prepare_linear_weight(qt.to("cuda"), dtype)
    bias = torch.randn(72)
    for m in (1, 2, 3, 4):
        x = torch.randn(m, qt.shape[1]).to(dtype)
        y = linear(x.to("cuda"), w, bias.to(dtype).to("cuda"), out_dtype=torch.float32)
        assert y.dtype == torch.float32 and y.shape == (m, 72)
        tol = tolerance(scheme, torch.float32, torch.float32) + NATIVE_TOL
        assert_product(y.cpu(), x.float(), ref, bias.to(dtype).float(), tol)
        half = linear(x.to("cuda"), w)
        assert half.dtype == dtype
        out_tol = {torch.float32: 0.0, torch.float16: 2 * 2.0**-11, torch.bfloat16: 2 * 2.0**-8}[dtype]
        assert_product(half.cpu().float(), x.float(), ref, None, tol + out_tol)


@needs_library
@pytest.mark.parametrize("scheme", ["Q4_K", "Q6_K", "Q8_0", "Q5_0"])
def test_native_rows_do_not_depend_on_the_other_tokens(scheme, native_gemv):
    qt, _ = gguf_weight(scheme, 65, 512, seed=4)  # 65 rows: a spare row in the last pair
    w = prepare_linear_weight(qt.to("cuda"), torch.bfloat16)
    x = torch.randn(quant_linear.NATIVE_MAX_TOKENS, 512).bfloat16().cuda()
    alone = [linear(x[t : t + 1], w) for t in range(x.shape[0])]
    for m in range(2, quant_linear.NATIVE_MAX_TOKENS + 1):
        y = linear(x[:m], w)
        for t in range(m):
            assert torch.equal(y[t : t + 1], alone[t]), (m, t)


@needs_library
def test_native_row_stack_quantizes_x_once_and_fills_every_part(native_gemv):
    (q, rq), (kk, rk), (v, rv) = (
        gguf_weight(s, n, 256, seed=i) for i, (s, n) in enumerate([("Q4_K", 48), ("Q4_K", 16), ("Q6_K", 24)])
    )
    plain = torch.randn(20, 256) * 0.05
    parts = [prepare_linear_weight(t.to("cuda"), torch.float16) for t in (q, kk, v)]
    stack = RowStack(parts + [plain.half().cuda()])
    ref = torch.cat([rq, rk, rv, plain.half().float()])
    x = torch.randn(3, 256).half()
    y = linear(x.to("cuda"), stack, out_dtype=torch.float32)
    tol = tolerance("Q6_K", torch.float16, torch.float32) + NATIVE_TOL
    assert_product(y.cpu(), x.float(), ref, None, tol)


@needs_library
def test_native_gives_nan_where_an_input_group_is_not_finite(native_gemv):
    qt, _ = gguf_weight("Q4_0", 8, 64, seed=1)
    w = prepare_linear_weight(qt.to("cuda"), torch.float32)
    x = torch.randn(2, 64)
    x[1, 40] = float("inf")
    y = linear(x.to("cuda"), w).cpu()
    assert torch.isfinite(y[0]).all() and torch.isnan(y[1]).all()
