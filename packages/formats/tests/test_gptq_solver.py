"""The GPTQ solver against the paper's own formulation (Frantar et al. 2022, eqs. 2-3: quantize
one column, update the rest with the explicit inverse Hessian, then remove that column from the
inverse), written out here without Cholesky factors or lazy batches."""

from __future__ import annotations

import pytest
import torch

from tessera.formats.quantize import fp16_scales, gptq_quantize, relative_output_error


def _layer(n_out=48, n_in=96, tokens=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n_in, generator=g) * torch.rand(n_in, generator=g) * 3
    w = torch.randn(n_out, n_in, generator=g)
    return w, 2 * x.T @ x / tokens


def _paper_gptq(w, h, bits, group, sym, act_order, damp):
    """Eqs. 2-3 of the paper in float64: after quantizing column q,
    ``W[:, F] -= (w_q - quant(w_q)) / Hinv[q, q] * Hinv[q, F]`` and
    ``Hinv <- Hinv - Hinv[:, q] Hinv[q, :] / Hinv[q, q]``; group parameters by min-max over the
    group's current weights when its first column comes up."""
    w, h = w.double().clone(), h.double().clone()
    n_in = w.shape[1]
    perm = torch.argsort(torch.diag(h), descending=True, stable=True) if act_order else torch.arange(n_in)
    w, h = w[:, perm], h[perm][:, perm]
    h += damp * torch.diag(h).mean() * torch.eye(n_in, dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    maxq = 2**bits - 1
    out = torch.zeros_like(w)
    for c in range(n_in):
        if c % group == 0:
            x = w[:, c : c + group]
            lo, hi = x.min(1).values.clamp(max=0), x.max(1).values.clamp(min=0)
            if sym:
                hi = torch.maximum(hi, -lo)
                lo = -hi
            scale = (hi - lo) / maxq
            zero = torch.full_like(scale, 2 ** (bits - 1)) if sym else torch.round(-lo / scale)
        q = scale * (torch.clamp(torch.round(w[:, c] / scale) + zero, 0, maxq) - zero)
        out[:, c] = q
        err = (w[:, c] - q) / hinv[c, c]
        w[:, c:] -= err[:, None] * hinv[c, c:][None, :]
        hinv = hinv - torch.outer(hinv[:, c], hinv[c, :]) / hinv[c, c]
    return torch.empty_like(out).index_copy_(1, perm, out).float()


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_solver_matches_the_papers_column_by_column_updates(sym, act_order):
    w, h = _layer()
    res = gptq_quantize(w, h, group_bits=4, group_size=32, sym=sym, act_order=act_order, block=64)
    ref = _paper_gptq(w, h, 4, 32, sym, act_order, 0.01)
    ours = res.groups.dequantize()
    # float32 vs float64: a weight sitting on a rounding tie may land on the other code
    assert (ours - ref).abs().le(1e-4).float().mean() > 0.99
    assert res.output_error == pytest.approx(relative_output_error(w, ref, h), rel=0.02)


def test_lazy_blocks_do_not_change_the_result():
    w, h = _layer()
    one = gptq_quantize(w, h, group_bits=3, group_size=32, sym=False, act_order=True, block=1)
    lazy = gptq_quantize(w, h, group_bits=3, group_size=32, sym=False, act_order=True, block=128)
    assert (one.groups.q != lazy.groups.q).float().mean() < 0.01
    assert lazy.output_error == pytest.approx(one.output_error, rel=0.02)


def test_gptq_beats_round_to_nearest_on_the_output():
    w, h = _layer(seed=3)
    res = gptq_quantize(w, h, group_bits=4, group_size=32, sym=True, act_order=True)
    rtn = gptq_quantize(w, torch.eye(w.shape[1]), group_bits=4, group_size=32, sym=True, act_order=False)
    assert res.output_error < 0.9 * relative_output_error(w, rtn.groups.dequantize(), h)


def test_mixed_group_bits_are_stored_per_group_in_act_order():
    w, h = _layer()
    bits = [8, 6, 4, 4, 3, 3]
    res = gptq_quantize(w, h, group_bits=bits, group_size=16, sym=False, act_order=True)
    gq = res.groups
    assert gq.group_bits == tuple(bits) and gq.group_starts == (0, 16, 32, 48, 64, 80, 96)
    assert torch.equal(gq.perm, torch.argsort(torch.diag(h), descending=True, stable=True))
    for g, b in enumerate(bits):
        assert int(gq.q[:, 16 * g : 16 * (g + 1)].max()) < 2**b
    # more bits on the salient groups: no worse than 4 bits everywhere at a similar size
    flat = gptq_quantize(w, h, group_bits=4, group_size=16, sym=False, act_order=True)
    assert res.output_error < flat.output_error


def test_dead_inputs_get_zero_weights():
    w, h = _layer()
    h[:, 5] = 0
    h[5, :] = 0
    res = gptq_quantize(w, h, group_bits=4, group_size=32, sym=False, act_order=True)
    assert torch.equal(res.groups.dequantize()[:, 5], torch.zeros(w.shape[0]))


def test_scale_fn_sees_each_group_and_its_scales_are_used():
    w, h = _layer()
    seen = []

    def hook(x, scale, zero, bits):
        seen.append((x.shape, bits))
        s, z = fp16_scales(x, scale, zero, bits)
        return s, z, len(seen)

    res = gptq_quantize(w, h, group_bits=[4, 4, 3], group_size=32, sym=True, act_order=False, scale_fn=hook)
    assert seen == [(torch.Size([48, 32]), 4), (torch.Size([48, 32]), 4), (torch.Size([48, 32]), 3)]
    assert res.scale_meta == (1, 2, 3)
    assert torch.equal(res.groups.scale, res.groups.scale.half().float())


def test_one_group_per_row_longer_than_a_block():
    w, h = _layer()
    res = gptq_quantize(w, h, group_bits=4, group_size=-1, sym=False, act_order=False, block=32)
    assert res.groups.group_starts == (0, 96)
    ref = _paper_gptq(w, h, 4, 96, False, False, 0.01)
    assert (res.groups.dequantize() - ref).abs().le(1e-4).float().mean() > 0.99


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"group_bits": [4, 4]}, "names 2 groups"),
        ({"group_bits": 9}, "outside 1..8"),
        ({"group_size": 0}, "not a positive size"),
        ({"damp": 1.5}, "not a fraction"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    w, h = _layer()
    args = {"group_bits": 4, "group_size": 32, "sym": True, "act_order": False, **kwargs}
    with pytest.raises(ValueError, match=message):
        gptq_quantize(w, h, **args)


def test_a_hessian_of_the_wrong_size_is_refused():
    w, h = _layer()
    with pytest.raises(ValueError, match="H must be"):
        gptq_quantize(w, h[:10, :10], group_bits=4, group_size=32, sym=True, act_order=False)


def test_a_shared_hessian_factor_and_output_error_give_the_same_result():
    """EXL2's measurement solves many settings against one H: sharing its factor and W's output
    energy must not change any of them."""
    from tessera.formats.quantize import OutputError, factor_hessian

    torch.manual_seed(3)
    w = torch.randn(24, 96)
    x = torch.randn(400, 96) * torch.linspace(0.1, 3, 96)
    h = x.T @ x / 400
    h[:, 5] = h[5, :] = 0  # a dead input
    factor = factor_hessian(h, act_order=True, damp=0.01)
    error = OutputError(w, h)
    for bits in (3, 4, [6, 4, 4]):
        size = 32
        alone = gptq_quantize(w, h, group_bits=bits, group_size=size, sym=True, act_order=True)
        shared = gptq_quantize(
            w, h, group_bits=bits, group_size=size, sym=True, act_order=True, factor=factor, error=error
        )
        assert torch.equal(alone.groups.q, shared.groups.q)
        assert torch.equal(alone.groups.scale, shared.groups.scale)
        assert alone.output_error == shared.output_error and alone.proxy_loss == shared.proxy_loss
    with pytest.raises(ValueError, match="another act_order"):
        gptq_quantize(w, h, group_bits=4, group_size=32, sym=True, act_order=False, factor=factor)
