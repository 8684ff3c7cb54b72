"""The CUDA C++ elementwise ops against the torch references of tessera.kernels.reference.

Without a GPU: the wrappers' argument checks, and their fallback to the reference for tensors the
kernels do not take. With one (torch.cuda.is_available()): every op for fp32/fp16/bf16 at T=1
and T=37 with awkward widths, within one ulp of the output dtype (norms: plus one ulp of the
rounded x/rms(x) the reference multiplies by the weight, and fp32 ones four of those units: the
sum of squares runs in another order than torch's; act-and-mul: plus the fp32 reference's
own error where it cancels; rotary bit for bit: it has no transcendental and rounds each product
where the reference does), and batch invariance (row r of a 37-row call equals a 1-row call on that row,
bit for bit)."""

from __future__ import annotations

import pytest
import torch

from tessera.kernels import reference
from tessera.kernels_cuda import elementwise, native

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device: the kernels cannot launch here")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _spacing(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One ulp of ``dtype`` at each magnitude of v (float64)."""
    info = torch.finfo(dtype)
    return torch.exp2(torch.floor(torch.log2(v.abs().clamp(min=info.tiny)))) * info.eps


def norm_error(
    actual: torch.Tensor, expected: torch.Tensor, x: torch.Tensor, w: torch.Tensor, eps: float
) -> float:
    """The largest difference of an RMSNorm result in units of (one ulp of the output + |w| times
    one ulp of x/rms(x) in the dtype). The reference rounds x/rms(x) to the dtype before the
    weight, and a scale computed in another order (or with CUDA's rsqrtf, as torch does) can move
    a value across that rounding boundary: one ulp there is |w| ulps after the weight."""
    xf = x.double()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    a, e = actual.double(), expected.double()
    scale = _spacing(torch.maximum(a.abs(), e.abs()), expected.dtype) + w.double().abs() * _spacing(
        y, x.dtype
    )
    return ((a - e).abs() / scale).max().item()


def act_error(actual: torch.Tensor, expected: torch.Tensor, x: torch.Tensor) -> float:
    """The largest difference of an act-and-mul result in units of (one ulp of the output dtype +
    4 fp32 epsilons of |gate * up|). The second term is the reference's own error where it is
    ill-conditioned: for a very negative gate, gelu_tanh's ``1 + tanh(inner)`` cancels, and the
    fp32 rounding of tanh is all that is left of the value."""
    a, e = actual.double(), expected.double()
    spacing = _spacing(torch.maximum(a.abs(), e.abs()), expected.dtype)
    gate, up = x.double().chunk(2, dim=-1)
    conditioning = 4 * torch.finfo(torch.float32).eps * (gate * up).abs()
    return ((a - e).abs() / (spacing + conditioning)).max().item()


# ---------------------------------------------------------------- without a GPU


def test_cpu_tensors_get_the_reference_results():
    g = torch.Generator().manual_seed(0)
    x, r = torch.randn(5, 24, generator=g), torch.randn(5, 24, generator=g)
    w = torch.randn(24, generator=g)
    assert torch.equal(elementwise.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6))
    for got, want in zip(
        elementwise.fused_add_rms_norm(x, r, w, 1e-6),
        reference.fused_add_rms_norm(x, r, w, 1e-6),
        strict=True,
    ):
        assert torch.equal(got, want)
    q, k, cs = (
        torch.randn(3, 32, generator=g),
        torch.randn(3, 16, generator=g),
        torch.randn(3, 4, generator=g),
    )
    for got, want in zip(
        elementwise.rotary_embedding(q, k, cs, cs.flip(0), 8),
        reference.rotary_embedding(q, k, cs, cs.flip(0), 8),
        strict=True,
    ):
        assert torch.equal(got, want)
    assert torch.equal(elementwise.silu_and_mul(x), reference.silu_and_mul(x))
    assert torch.equal(elementwise.gelu_tanh_and_mul(x), reference.gelu_tanh_and_mul(x))


def test_norms_refuse_a_weight_that_does_not_match_the_last_dim():
    with pytest.raises(ValueError, match="weight of shape"):
        elementwise.rms_norm(torch.zeros(2, 8), torch.ones(7), 1e-6)
    with pytest.raises(ValueError, match="weight of shape"):
        elementwise.fused_add_rms_norm(torch.zeros(2, 8), torch.zeros(2, 8), torch.ones(2, 8), 1e-6)


def test_fused_add_rms_norm_refuses_a_residual_of_another_shape():
    with pytest.raises(ValueError, match="residual of shape"):
        elementwise.fused_add_rms_norm(torch.zeros(2, 8), torch.zeros(1, 8), torch.ones(8), 1e-6)


@pytest.mark.parametrize(
    ("q_shape", "k_shape", "cs_shape", "head_dim", "match"),
    [
        ((3, 32), (3, 16), (3, 4), 7, "head_dim 7"),
        ((3, 32), (3, 12), (3, 4), 8, "divide the widths"),
        ((3, 32), (2, 16), (3, 4), 8, "same T"),
        ((3, 32), (3, 16), (3, 8), 8, "cos"),
        ((3, 32), (3, 16), (1, 4), 8, "cos"),
    ],
)
def test_rotary_refuses_shapes_outside_its_contract(q_shape, k_shape, cs_shape, head_dim, match):
    q, k, cs = torch.zeros(q_shape), torch.zeros(k_shape), torch.zeros(cs_shape)
    with pytest.raises(ValueError, match=match):
        elementwise.rotary_embedding(q, k, cs, cs, head_dim)


@pytest.mark.parametrize("op", ["silu_and_mul", "gelu_tanh_and_mul"])
def test_act_and_mul_refuses_an_odd_last_dim(op):
    with pytest.raises(ValueError, match="must be even"):
        getattr(elementwise, op)(torch.zeros(2, 9))


def test_rows_is_a_view_with_the_row_stride_of_a_split():
    qkv = torch.zeros(5, 48)
    q = qkv[:, :32]
    q2, stride = elementwise._rows(q)
    assert q2.data_ptr() == q.data_ptr() and stride == 48
    one = qkv[2:3, 8:40]
    assert elementwise._rows(one)[1] == 32  # one row: the stride is never used


# ---------------------------------------------------------------- on a GPU


def _randn(*shape, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, generator=g, device="cuda", dtype=torch.float32).to(dtype)


@pytest.fixture(scope="module")
def lib():
    if not CUDA:
        pytest.skip("no CUDA device: the kernels cannot launch here")
    built = native.library()
    assert built is not None, "the CUDA C++ kernels did not build or load (see the log)"
    return built


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 37])
@pytest.mark.parametrize("n", [100, 4100])
def test_rms_norm_matches_the_reference(lib, dtype, tokens, n):
    x = _randn(tokens, n, dtype=dtype, seed=1) * 3
    w = _randn(n, dtype=dtype, seed=2)
    got, want = elementwise.rms_norm(x, w, 1e-5), reference.rms_norm(x, w, 1e-5)
    assert norm_error(got, want, x, w, 1e-5) <= (1 if dtype != torch.float32 else 4)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 37])
def test_fused_add_rms_norm_matches_the_reference_and_leaves_its_inputs(lib, dtype, tokens):
    n = 2050
    x, r, w = (
        _randn(tokens, n, dtype=dtype, seed=3),
        _randn(tokens, n, dtype=dtype, seed=4),
        _randn(n, dtype=dtype, seed=5),
    )
    x0, r0 = x.clone(), r.clone()
    out, summed = elementwise.fused_add_rms_norm(x, r, w, 1e-6)
    want_out, want_summed = reference.fused_add_rms_norm(x, r, w, 1e-6)
    assert torch.equal(summed, want_summed)
    assert norm_error(out, want_out, want_summed, w, 1e-6) <= (1 if dtype != torch.float32 else 4)
    assert torch.equal(x, x0) and torch.equal(r, r0)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cs_dtype", ["fp32", "same"])
@pytest.mark.parametrize("tokens", [1, 37])
@pytest.mark.parametrize("head_dim", [64, 80, 36])
def test_rotary_on_split_qkv_equals_the_reference_bit_for_bit(lib, dtype, cs_dtype, tokens, head_dim):
    hq, hk = 5, 2
    qkv = _randn(tokens, (hq + 2 * hk) * head_dim, dtype=dtype, seed=6)
    q, k, _ = qkv.split([hq * head_dim, hk * head_dim, hk * head_dim], dim=-1)
    angles = torch.rand(tokens, head_dim // 2, device="cuda") * 50
    cos, sin = angles.cos(), angles.sin()
    if cs_dtype == "same":
        cos, sin = cos.to(dtype), sin.to(dtype)
    got_q, got_k = elementwise.rotary_embedding(q, k, cos, sin, head_dim)
    want_q, want_k = reference.rotary_embedding(q, k, cos, sin, head_dim)
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)


@needs_cuda
@pytest.mark.parametrize("op", ["silu_and_mul", "gelu_tanh_and_mul"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 37])
def test_act_and_mul_matches_the_reference(lib, op, dtype, tokens):
    x = _randn(tokens, 2 * 1379, dtype=dtype, seed=7) * 4
    got, want = getattr(elementwise, op)(x), getattr(reference, op)(x)
    assert act_error(got, want, x) <= 1
    strided = _randn(tokens, 2 * 1379 + 8, dtype=dtype, seed=8)[:, : 2 * 1379]  # a row stride
    assert act_error(getattr(elementwise, op)(strided), getattr(reference, op)(strided), strided) <= 1


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_rows_result_does_not_depend_on_the_batch(lib, dtype):
    # n = 4100: rows of fp16/bf16 alternate between 16-byte aligned and not, so the single-row
    # calls take the vector and the scalar loads; the bits must not change either way
    n, d = 4100, 64
    x, r, w = (
        _randn(37, n, dtype=dtype, seed=9),
        _randn(37, n, dtype=dtype, seed=10),
        _randn(n, dtype=dtype, seed=11),
    )
    q, k = _randn(37, 4 * d, dtype=dtype, seed=12), _randn(37, 2 * d, dtype=dtype, seed=13)
    angles = torch.rand(37, d // 2, device="cuda") * 50
    cos, sin = angles.cos(), angles.sin()
    batch_norm = elementwise.rms_norm(x, w, 1e-6)
    batch_out, batch_sum = elementwise.fused_add_rms_norm(x, r, w, 1e-6)
    batch_q, batch_k = elementwise.rotary_embedding(q, k, cos, sin, d)
    batch_silu = elementwise.silu_and_mul(x)
    for row in (0, 1, 17, 36):
        one = slice(row, row + 1)
        assert torch.equal(elementwise.rms_norm(x[one], w, 1e-6), batch_norm[one])
        out, summed = elementwise.fused_add_rms_norm(x[one], r[one], w, 1e-6)
        assert torch.equal(out, batch_out[one]) and torch.equal(summed, batch_sum[one])
        q1, k1 = elementwise.rotary_embedding(q[one], k[one], cos[one], sin[one], d)
        assert torch.equal(q1, batch_q[one]) and torch.equal(k1, batch_k[one])
        assert torch.equal(elementwise.silu_and_mul(x[one]), batch_silu[one])


@needs_cuda
def test_cuda_tensors_fall_back_to_the_reference_without_the_library(monkeypatch):
    monkeypatch.setattr(native, "library", lambda: None)
    x, w = _randn(3, 40, dtype=torch.bfloat16, seed=14), _randn(40, dtype=torch.bfloat16, seed=15)
    assert torch.equal(elementwise.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6))
    assert torch.equal(elementwise.silu_and_mul(x), reference.silu_and_mul(x))


@needs_cuda
def test_a_weight_of_another_dtype_takes_the_reference_and_its_type_promotion(lib):
    x, w = _randn(3, 40, dtype=torch.bfloat16, seed=16), _randn(40, dtype=torch.float32, seed=17)
    got = elementwise.rms_norm(x, w, 1e-6)
    assert got.dtype == torch.float32 and torch.equal(got, reference.rms_norm(x, w, 1e-6))
