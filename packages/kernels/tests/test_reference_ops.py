"""The references against independent formulations (torch's SDPA, dense RoPE, F.rms_norm)."""

import random

import pytest
import torch
import torch.nn.functional as F

from tessera.kernels import lookup, ops, register, unregister


def test_rms_norm_matches_torch():
    x, w = torch.randn(7, 64), torch.randn(64)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-6), F.rms_norm(x, (64,), w, 1e-6))


def test_fused_add_rms_norm_returns_the_sum_as_residual():
    x, r, w = torch.randn(5, 32), torch.randn(5, 32), torch.randn(32)
    out, res = ops.fused_add_rms_norm(x, r, w, 1e-5)
    torch.testing.assert_close(res, x + r)
    torch.testing.assert_close(out, F.rms_norm(x + r, (32,), w, 1e-5))


def test_rotary_embedding_is_a_rotation_by_position_times_frequency():
    t, h, d = 6, 3, 8
    q, k = torch.randn(t, h * d), torch.randn(t, 1 * d)
    pos = torch.arange(t).float()
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    ang = pos[:, None] * inv[None]
    rq, rk = ops.rotary_embedding(q, k, ang.cos(), ang.sin(), d)
    # as complex numbers: pair (x_i, x_{i+d/2}) times e^{i*angle}
    qc = torch.complex(q.view(t, h, d)[..., : d // 2], q.view(t, h, d)[..., d // 2 :])
    expected = qc * torch.polar(torch.ones_like(ang), ang)[:, None, :]
    torch.testing.assert_close(rq.view(t, h, d), torch.cat([expected.real, expected.imag], -1))
    assert rk.shape == k.shape


def test_silu_and_mul_splits_gate_then_up():
    x = torch.randn(4, 10)
    torch.testing.assert_close(ops.silu_and_mul(x), F.silu(x[:, :5]) * x[:, 5:])


def test_linear_accepts_a_packed_weight():
    from tessera.formats import QuantizedTensor

    rows = torch.randint(0, 256, (4, 34), dtype=torch.uint8)
    rows[:, :2] = torch.tensor([0.01], dtype=torch.float16).view(torch.uint8)
    qt = QuantizedTensor("Q8_0", rows, (4, 32))
    x = torch.randn(3, 32)
    torch.testing.assert_close(ops.linear(x, qt), x @ qt.dequantize().T)


@pytest.mark.parametrize("hq,hk", [(4, 4), (8, 2), (6, 1)])
@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("window", [None, 5])
def test_paged_attention_equals_dense_causal_sdpa(hq, hk, block_size, window):
    """Mixed prefill and decode: each sequence has some tokens cached, some new."""
    torch.manual_seed(0)
    rng = random.Random(1)
    d = 16
    cases = [(17, 17), (1, 1), (33, 1), (20, 7), (4097 % 50, 3)]  # (total length, new tokens)
    n_blocks = sum(-(-n // block_size) for n, _ in cases) + 3
    free = list(range(n_blocks))
    rng.shuffle(free)
    cache = torch.full((2, n_blocks, block_size, hk, d), float("nan"))
    tables, qs, outs_expected = [], [], []
    for total, new in cases:
        table = [free.pop() for _ in range(-(-total // block_size))]
        tables.append(table)
        k, v = torch.randn(total, hk, d), torch.randn(total, hk, d)
        slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(total)])
        ops.reshape_and_cache(k, v, cache, slots)
        q = torch.randn(new, hq, d)
        qs.append(q)
        # dense reference over the full sequence
        q_pos = torch.arange(total - new, total)[:, None]
        k_pos = torch.arange(total)[None, :]
        mask = k_pos <= q_pos
        if window is not None:
            mask &= k_pos > q_pos - window
        ref = F.scaled_dot_product_attention(
            q.transpose(0, 1),
            k.repeat_interleave(hq // hk, 1).transpose(0, 1),
            v.repeat_interleave(hq // hk, 1).transpose(0, 1),
            attn_mask=mask,
            scale=0.3,
        ).transpose(0, 1)
        outs_expected.append(ref)
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    qsl = torch.tensor(
        [0] + [sum(n for _, n in cases[: i + 1]) for i in range(len(cases))], dtype=torch.int32
    )
    seq_lens = torch.tensor([t for t, _ in cases], dtype=torch.int32)
    out = ops.paged_attention(torch.cat(qs), cache, qsl, seq_lens, bt, 0.3, window)
    torch.testing.assert_close(out, torch.cat(outs_expected), atol=1e-5, rtol=1e-5)


def test_a_registered_backend_is_dispatched_by_device_type_and_can_be_removed():
    from tessera.kernels.registry import implementations

    calls = []
    installed = implementations("silu_and_mul").get("cpu")  # e.g. tessera-kernels-cpu's

    @register("silu_and_mul", "cpu")
    def fake(x):
        calls.append(x.shape)
        return x[..., : x.shape[-1] // 2]

    try:
        ops.silu_and_mul(torch.zeros(2, 4))
        assert calls == [torch.Size([2, 4])]
    finally:
        unregister("silu_and_mul", "cpu")
        assert lookup("silu_and_mul", "cpu").__module__ == "tessera.kernels.reference"
        if installed is not None:  # leave the registry as the other tests expect it
            register("silu_and_mul", "cpu")(installed)


def test_registering_an_unknown_op_names_it():
    with pytest.raises(KeyError, match="no such op"):

        @register("flash_everything", "cpu")
        def impl(x):
            return x
