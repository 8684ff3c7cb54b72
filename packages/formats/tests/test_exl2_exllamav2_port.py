"""Our EXL2 writer's linears read back through a port of exllamav2's own load and ``reconstruct``
kernel (exllamav2_ref.py: the QMatrix row counts by width, the shuffles, the half-trick dequant
of each width, 128-row blocks, the group map, ``dq_scale``): every weight equals our
``dequantize``, for mixed 8/6/5/4/3/2-bit layouts and SmolLM2-135M's shapes; and an MLP is held
by exllamav2 permuted by down_proj's order (``ExLlamaV2MLP.load``), the same product."""

import importlib.util
import sys
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch

from tessera.formats import GroupQuant, exl2_parts, exl2_scale_grid
from tessera.formats.exl2 import exl2_tensor


def _ref():
    spec = importlib.util.spec_from_file_location(
        "tessera_exllamav2_ref", Path(__file__).with_name("exllamav2_ref.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


ref = _ref()


def random_linear(gen, n_out, starts, bits) -> GroupQuant:
    """Uniform random integers of each group's width, scales on EXL2's grid, a random perm."""
    n_in = starts[-1]
    sizes = torch.tensor([b - a for a, b in pairwise(starts)])
    col_bits = torch.tensor(bits).repeat_interleave(sizes)
    q = (torch.randint(0, 256, (n_out, n_in), generator=gen) & ((1 << col_bits) - 1)).to(torch.uint8)
    mid = torch.tensor([2.0 ** (b - 1) for b in bits])
    _, _, scale = exl2_scale_grid(torch.rand(n_out, len(bits), generator=gen) * 0.01 + 1e-4)
    perm = torch.randperm(n_in, generator=gen)
    return GroupQuant((n_out, n_in), q, scale, mid.expand(n_out, -1).contiguous(), starts, bits, perm)


def even(n_in, size, widths):
    """Groups of ``size`` inputs; ``widths`` the bits of each, widest first."""
    assert n_in == size * len(widths)
    return tuple(range(0, n_in + 1, size)), tuple(widths)


LAYOUTS = {
    # every width, 2-bit groups of 16, groups crossing the kernel's 128-row blocks
    "all-widths": (64, (0, 32, 64, 96, 128, 224, 320, 352, 368, 384), (8, 6, 6, 5, 4, 3, 3, 2, 2)),
    "8-6-5-4-3-2": (64, (0, 32, 64, 128, 192, 224, 240, 256), (8, 6, 5, 4, 3, 2, 2)),
    "6-5-4-3 by 96": (32, (0, 96, 192, 288, 384), (6, 5, 4, 3)),
    "3-bit only": (32, (0, 96), (3,)),
    # SmolLM2-135M as make_random_exl2 writes it: 5/4/3 bits in groups of 64 over 576 inputs and
    # of 128 over 1536, widest first; the head 6-bit in groups of 64 (a cut vocabulary)
    "q_proj 576x576": (576, *even(576, 64, [5] + [4] * 7 + [3])),
    "k_proj 192x576": (192, *even(576, 64, [5] + [4] * 7 + [3])),
    "up_proj 1536x576": (1536, *even(576, 64, [5] + [4] * 7 + [3])),
    "down_proj 576x1536": (576, *even(1536, 128, [5] + [4] * 10 + [3])),
    "lm_head 6-bit": (2048, *even(576, 64, [6] * 9)),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_exllamav2_reconstructs_our_linears_exactly_as_we_dequantize_them(name):
    n_out, starts, bits = LAYOUTS[name]
    g = random_linear(torch.Generator().manual_seed(len(name)), n_out, starts, bits)
    parts = exl2_parts(g)
    theirs = ref.linear_dq(parts)  # [in, out] as get_weight_tensor_dq
    assert not bool(theirs.isnan().any())  # every row written
    ours = exl2_tensor("x", parts, "mem").dequantize(torch.float16).T
    assert torch.equal(theirs, ours)
    assert torch.equal(ours.float().T, g.dequantize().half().float())  # what the writer was given


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6])
def test_the_ported_shuffle_and_dequant_read_the_words_as_exllamav2s_plain_fallback(bits):
    """qdq_{bits}.cuh's QMODE 1 shuffle and half-trick dequant (ported) against its own QMODE 0
    fallback on the unshuffled words: the port's transcription checked by exllamav2's other path."""
    rng = np.random.default_rng(bits)
    per_call = {2: (1, 16), 3: (3, 32), 4: (1, 8), 5: (5, 32), 6: (3, 16)}[bits]
    n_words, n_values = per_call
    words = rng.integers(0, 2**32, (n_words, 40), dtype=np.uint64).astype(np.uint32)
    shuffled = words.copy()
    getattr(ref, f"_shuffle_{bits}bit_{ {2: 16, 3: 32, 4: 8, 5: 32, 6: 16}[bits] }")(shuffled, 0)
    dequant = getattr(ref, f"_dequant_{bits}bit_{ {2: 16, 3: 32, 4: 8, 5: 32, 6: 16}[bits] }")
    got = dequant(*shuffled)
    want = ref._unshuffled_dequant(bits, list(words))
    assert len(got) == len(want) == n_values
    for a, b in zip(got, want, strict=True):
        assert np.array_equal(a, b)


def test_exllamav2_holds_an_mlp_permuted_by_down_projs_stored_order():
    """``ExLlamaV2MLP.load`` drops down_proj's perm and remaps gate/up's outputs by it: each of the
    three dequantizes (``get_weight_tensor_dq``) to a permutation of ours (so a plain comparison
    finds all three different: the 3 linears per layer of issue 13), the MLP's product the same."""
    gen = torch.Generator().manual_seed(3)
    hidden, ffn = 128, 256
    gate, up = (exl2_parts(random_linear(gen, ffn, *even(hidden, 64, [5, 3]))) for _ in range(2))
    down = exl2_parts(random_linear(gen, hidden, *even(ffn, 128, [4, 3])))
    held = ref.mlp_dq(gate, up, down)
    ours = [exl2_tensor("x", p, "mem").dequantize(torch.float16).T for p in (gate, up, down)]
    perm = torch.argsort(down["q_invperm"].long())
    assert not any(torch.equal(a, b) for a, b in zip(held, ours, strict=True))
    assert torch.equal(held[0], ours[0][:, perm]) and torch.equal(held[1], ours[1][:, perm])
    assert torch.equal(held[2], ours[2][perm])
    x = torch.randn(5, hidden, dtype=torch.float64)

    def mlp(g, u, d):
        return (torch.nn.functional.silu(x @ g.double()) * (x @ u.double())) @ d.double()

    assert torch.allclose(mlp(*held), mlp(*ours), rtol=1e-12, atol=1e-12)
