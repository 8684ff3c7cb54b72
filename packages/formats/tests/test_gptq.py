"""GPTQ and AWQ checkpoints: our dequantize() against references nobody here wrote.

1. Checkpoints made by GPTQModel 7.7.0 and AutoAWQ 0.2.9 (tools/make_gptq_fixtures.py,
   fixtures/gptq/): our dequantized weights equal the tool's own (GPTQModel's ``dequantize_weight()``
   / ``dequantize_gemm``, AutoAWQ's ``dequantize_gemm``) for 2/3/4/8 bits, act-order, sym/asym,
   per-channel, v1/v2 and AWQ GEMM.
2. Every bits x group size x desc_act x sym x v1/v2 combination packed by a packer transcribed
   from GPTQModel's source (gptqmodel 7.7.0, ``gptqmodel/nn_modules/qlinear/__init__.py``,
   ``BaseQuantLinear.pack_original``: the 2/4/8-bit row loop and the 3-bit 10+1+10+1+10 loop;
   v1 zeros stored minus one as ``gptqmodel/utils/model.py`` ``convert_gptq_v2_to_v1_format_module``
   subtracts 0b0101... per packed value) and AWQ's GEMM packer (``AWQ_ORDER`` of
   ``gptqmodel/quantization/awq/utils/packing_utils.py``): our dequantize must give back exactly
   ``scale * (q - zero)`` of the integers we packed.
3. Bad input: each refused with a FormatError naming the tensor or config field, at open time.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tessera.formats import FormatError, GPTQTensor, open_checkpoint, quantization_config_from_hf
from tessera.formats.gptq import gptq_tensor

FIXTURES = Path(__file__).parent / "fixtures" / "gptq"
FIXTURE_CASES = sorted(p.name for p in FIXTURES.iterdir()) if FIXTURES.is_dir() else []
# GPTQModel dequantizes in the model's dtype (bfloat16): scale and product each rounded to bf16
BF16_RTOL = 2.0**-7


# -- packers transcribed from the tools' source -----------------------------------------------


def pack_rows_like_gptqmodel(ints: np.ndarray, bits: int) -> np.ndarray:
    """``pack_original``'s qweight loop: ints ``[in, out]`` -> int32 ``[ceil(in*bits/32), out]``."""
    ints = ints.astype(np.uint32)
    factor = 32 // bits
    q = np.zeros((-(-ints.shape[0] * bits // 32), ints.shape[1]), dtype=np.uint32)
    if bits in (2, 4, 8):
        for row in range(q.shape[0]):
            for j in range(min(factor, ints.shape[0] - row * factor)):
                q[row] |= ints[row * factor + j] << np.uint32(bits * j)
        return q.view(np.int32)
    i = row = 0
    while row < q.shape[0]:
        for j in range(i, i + 10):
            q[row] |= ints[j] << np.uint32(3 * (j - i))
        i += 10
        q[row] |= ints[i] << np.uint32(30)
        row += 1
        q[row] |= (ints[i] >> np.uint32(2)) & np.uint32(1)
        i += 1
        for j in range(i, i + 10):
            q[row] |= ints[j] << np.uint32(3 * (j - i) + 1)
        i += 10
        q[row] |= ints[i] << np.uint32(31)
        row += 1
        q[row] |= (ints[i] >> np.uint32(1)) & np.uint32(0x3)
        i += 1
        for j in range(i, i + 10):
            q[row] |= ints[j] << np.uint32(3 * (j - i) + 2)
        i += 10
        row += 1
    return q.view(np.int32)


def pack_zeros_like_gptqmodel(zeros: np.ndarray, bits: int) -> np.ndarray:
    """``pack_original``'s qzeros loop is the row loop along the outputs."""
    return np.ascontiguousarray(pack_rows_like_gptqmodel(zeros.T, bits).T)


def pack_awq_gemm(ints: np.ndarray) -> np.ndarray:
    """AWQ GEMM: ``[rows, out]`` 4-bit -> int32 ``[rows, out/8]``, nibble k = column ``AWQ_ORDER[k]``."""
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    ints = ints.astype(np.uint32)
    q = np.zeros((ints.shape[0], ints.shape[1] // 8), dtype=np.uint32)
    for col in range(q.shape[1]):
        for k in range(8):
            q[:, col] |= ints[:, col * 8 + order[k]] << np.uint32(4 * k)
    return q.view(np.int32)


def random_quantized(n_in, n_out, bits, group, desc_act, sym, v1, seed=0):
    """Integers, zeros, scales and g_idx of a random GPTQ weight, and their W = s * (q - z)."""
    rng = np.random.default_rng(seed)
    maxq = (1 << bits) - 1
    size = n_in if group == -1 else group
    groups = -(-n_in // size)
    q = rng.integers(0, maxq + 1, (n_in, n_out))
    if sym:
        z = np.full((groups, n_out), 1 << (bits - 1))
    else:  # v1 stores zero-1, so a zero of 0 can't be written (it reads back as 2**bits)
        z = rng.integers(1 if v1 else 0, maxq + 1, (groups, n_out))
    s = torch.from_numpy(rng.uniform(0.01, 0.1, (groups, n_out))).half()
    if desc_act:  # act-order: group i // size of the i-th column in a random order
        perm = rng.permutation(n_in)
        g = np.empty(n_in, dtype=np.int64)
        g[perm] = np.arange(n_in) // size
    else:
        g = np.arange(n_in) // size
    want = (s.float()[g] * torch.from_numpy(q - z[g]).float()).T
    return q, z, s, g, want


def hf_gptq_config(bits, group, desc_act, sym, fmt="gptq"):
    return {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group,
        "desc_act": desc_act,
        "sym": sym,
        "checkpoint_format": fmt,
    }


# -- 1. GPTQModel's own checkpoints -------------------------------------------------------------


def test_gptqmodel_fixtures_are_present():
    assert {"gptq-3bit-g32-sym-v1", "awq-4bit-g32-sym-gemm"} <= set(FIXTURE_CASES), (
        "run tools/make_gptq_fixtures.py packages/formats/tests/fixtures/gptq in a venv with gptqmodel"
    )


@pytest.mark.parametrize("case", FIXTURE_CASES)
def test_dequantize_equals_gptqmodels_dequantize_weight(case):
    ck = open_checkpoint(FIXTURES / case)
    ref = load_file(FIXTURES / case / "reference.safetensors")
    quantized = {name: t for name, t in ck.weights() if isinstance(t, GPTQTensor)}
    # what GPTQModel quantized: 7 linears in each of 2 layers, the head where it is quantized, not
    # a module that `dynamic` left as it was
    assert sorted(quantized) == sorted(f"{k}.weight" for k in ref if k != "logits")
    assert len(quantized) == {"gptq-4bit-g32-actorder-sym-v1-lmhead": 15}.get(case, 14)
    for name, t in quantized.items():
        theirs = ref[name.removesuffix(".weight")].float()
        assert t.shape == tuple(theirs.shape)
        ours = t.dequantize(torch.float32)
        torch.testing.assert_close(ours, theirs, rtol=BF16_RTOL, atol=1e-6, msg=name)


@pytest.mark.parametrize("case", FIXTURE_CASES)
def test_a_quantized_checkpoint_yields_one_weight_per_linear_and_the_rest_unchanged(case):
    ck = open_checkpoint(FIXTURES / case)
    names = [name for name, _ in ck.weights()]
    assert not [n for n in names if n.rsplit(".", 1)[-1] in ("qweight", "qzeros", "scales", "g_idx")]
    assert "model.layers.1.mlp.down_proj.weight" in names and "lm_head.weight" in names
    assert ck.config.quantization is not None
    assert ck.config.quantization.quant_method == ("awq" if "awq" in case else "gptq")


def test_gptqmodels_per_module_settings_are_read_as_it_wrote_them():
    """``dynamic``: its default 8-bit head, a head of 8 bits in groups of 64, layer 1's MLP at 8
    bits, layer 0's o_proj left unquantized (a plain bfloat16 weight)."""
    head = dict(open_checkpoint(FIXTURES / "gptq-4bit-g32-actorder-sym-v1-lmhead").weights())[
        "lm_head.weight"
    ]
    assert (head.bits, head.group_size, head.sym, head.desc_act) == (8, 32, True, False)
    ck = open_checkpoint(FIXTURES / "gptq-4bit-g32-sym-v1-dynamic")
    w = dict(ck.weights())
    settings = {n: (t.bits, t.group_size) for n, t in w.items() if isinstance(t, GPTQTensor)}
    assert settings.pop("lm_head.weight") == (8, 64)
    for proj in ("gate_proj", "up_proj", "down_proj"):
        assert settings.pop(f"model.layers.1.mlp.{proj}.weight") == (8, 64)
    assert set(settings.values()) == {(4, 32)} and len(settings) == 10
    plain = w["model.layers.0.self_attn.o_proj.weight"]
    assert isinstance(plain, torch.Tensor) and plain.dtype == torch.bfloat16


def gptq_folder_with(tmp_path, case, edit_config=None, edit_tensors=None):
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / case
    shutil.copytree(FIXTURES / case, folder)
    if edit_config:
        cfg = json.loads((folder / "config.json").read_text())
        edit_config(cfg)
        (folder / "config.json").write_text(json.dumps(cfg))
    if edit_tensors:
        tensors = load_file(folder / "model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def quant_edit(**fields):
    def edit(cfg):
        q = cfg["quantization_config"]
        for k, v in fields.items():
            if v is None:
                q.pop(k, None)
            else:
                q[k] = v

    return edit


def unquantized(prefix, shape):
    """Tensor edit: the linear ``prefix`` as a plain bfloat16 weight instead of its GPTQ parts."""

    def edit(tensors):
        for part in ("qweight", "qzeros", "scales", "g_idx"):
            tensors.pop(f"{prefix}.{part}")
        tensors[f"{prefix}.weight"] = torch.zeros(shape, dtype=torch.bfloat16)

    return edit


DYN = "gptq-4bit-g32-sym-v1-dynamic"
DYN_RULES = {  # the fixture's own, as tools/make_gptq_fixtures.py asked GPTQModel
    "lm_head": {"bits": 8, "group_size": 64},
    r"+:.*\.1\.mlp\..*": {"bits": 8, "group_size": 64},
    r"-:.*\.0\.self_attn\.o_proj": {},
}
HEAD = "gptq-4bit-g32-actorder-sym-v1-lmhead"


@pytest.mark.parametrize(
    "case,edit_config,edit_tensors,names",
    [
        # the head is quantized but the config says it is not, or the reverse
        (HEAD, quant_edit(lm_head=False), None, ["lm_head.qweight", "quantization_config.lm_head is false"]),
        (HEAD, None, unquantized("lm_head", (160, 64)), ["quantization_config.lm_head is true"]),
        (
            HEAD,
            lambda c: c.update(tie_word_embeddings=True),
            None,
            ["lm_head.qweight", "tie_word_embeddings"],
        ),
        # a module `dynamic` skips holds quantized parts
        (
            DYN,
            quant_edit(dynamic={r"-:.*\.1\.mlp\.down_proj": {}, **DYN_RULES}),
            None,
            ["model.layers.1.mlp.down_proj.qweight", "dynamic"],
        ),
        # an override that does not match what the tensors hold
        (
            DYN,
            quant_edit(dynamic={**DYN_RULES, "lm_head": {"bits": 4, "group_size": 64}}),
            None,
            ["lm_head.qweight", "shape", "bits=4", "as quantization_config.dynamic['lm_head'] says"],
        ),
        # overrides we cannot read exactly, each named
        (DYN, quant_edit(dynamic={"lm_head": {"bits": 5}}), None, ["dynamic['lm_head'].bits", "5"]),
        (DYN, quant_edit(dynamic={"lm_head": {"group_size": 48}}), None, ["dynamic['lm_head'].group_size"]),
        (DYN, quant_edit(dynamic={"lm_head": {"sym": "yes"}}), None, ["dynamic['lm_head'].sym"]),
        (
            DYN,
            quant_edit(dynamic={"lm_head": {"pack_dtype": "int16"}}),
            None,
            ["dynamic['lm_head'].pack_dtype"],
        ),
        (DYN, quant_edit(dynamic={"lm_head": {"format": "marlin"}}), None, ["dynamic['lm_head'].format"]),
        (DYN, quant_edit(dynamic={"+:model.(": {}}), None, ["dynamic['+:model.(']", "regular expression"]),
        (DYN, quant_edit(dynamic=["lm_head"]), None, ["quantization_config.dynamic"]),
        (DYN, quant_edit(dynamic={"lm_head": 8}), None, ["dynamic['lm_head']", "not an object"]),
        (DYN, quant_edit(modules_to_not_convert="lm_head"), None, ["modules_to_not_convert"]),
        (DYN, quant_edit(modules_to_not_convert=["mlp"]), None, ["mlp", "modules_to_not_convert"]),
    ],
)
def test_inconsistent_per_module_settings_are_refused_at_open(
    tmp_path, case, edit_config, edit_tensors, names
):
    folder = gptq_folder_with(tmp_path, case, edit_config, edit_tensors)
    with pytest.raises(FormatError) as e:
        open_checkpoint(folder)
    for name in names:
        assert name in str(e.value)


def test_modules_to_not_convert_and_skip_rules_leave_plain_weights_alone(tmp_path):
    """A plain weight under a skip rule is read as it is; the rule only decides quantized parts."""
    folder = gptq_folder_with(
        tmp_path, DYN, quant_edit(modules_to_not_convert=["self_attn.o_proj"], dynamic={
            r"-:.*\.0\.self_attn\.o_proj": {}, "lm_head": {"bits": 8, "group_size": 64, "mse": 2.4},
            r".*\.1\.mlp\..*": {"bits": 8, "group_size": 64, "damp_percent": 0.1},
        }),
        edit_tensors=unquantized("model.layers.1.self_attn.o_proj", (64, 64)),
    )  # fmt: skip
    w = dict(open_checkpoint(folder).weights())
    assert isinstance(w["model.layers.1.self_attn.o_proj.weight"], torch.Tensor)
    assert isinstance(w["model.layers.1.mlp.up_proj.weight"], GPTQTensor)


# -- 2. packed here, as the tools pack -------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("desc_act", [False, True])
@pytest.mark.parametrize("group", [32, 64, 128, -1])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_dequantize_inverts_gptqmodels_packing(bits, group, desc_act, sym, fmt):
    n_in, n_out = 256, 96
    q, z, s, g, want = random_quantized(n_in, n_out, bits, group, desc_act, sym, v1=fmt == "gptq")
    stored_z = z - 1 if fmt == "gptq" else z
    parts = {
        "qweight": torch.from_numpy(pack_rows_like_gptqmodel(q, bits)),
        "qzeros": torch.from_numpy(pack_zeros_like_gptqmodel(stored_z & ((1 << bits) - 1), bits)),
        "scales": s,
        "g_idx": torch.from_numpy(g.astype(np.int32)),
    }
    cfg = quantization_config_from_hf(hf_gptq_config(bits, group, desc_act, sym, fmt), "config.json")
    t = gptq_tensor("layer", parts, cfg, "model.safetensors")
    assert t.shape == (n_out, n_in)
    assert torch.equal(t.int_weight().long(), torch.from_numpy(q))
    torch.testing.assert_close(t.dequantize(), want, rtol=0, atol=0)
    assert t.dequantize(torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_a_partly_filled_last_word_is_read_through_g_idx(bits):
    n_in, n_out = 40, 24  # neither a multiple of 32/bits words for every width
    q, z, s, g, want = random_quantized(n_in, n_out, bits, 8, False, False, v1=False)
    parts = {
        "qweight": torch.from_numpy(pack_rows_like_gptqmodel(q, bits)),
        "qzeros": torch.from_numpy(pack_zeros_like_gptqmodel(z, bits)),
        "scales": s,
        "g_idx": torch.from_numpy(g.astype(np.int32)),
    }
    cfg = quantization_config_from_hf(hf_gptq_config(bits, 8, False, False, "gptq_v2"), "config.json")
    t = gptq_tensor("layer", parts, cfg, "model.safetensors")
    torch.testing.assert_close(t.dequantize(), want, rtol=0, atol=0)


@pytest.mark.parametrize("group", [32, 128])
def test_dequantize_inverts_awq_gemm_packing(group):
    n_in, n_out = 256, 64
    q, z, s, g, want = random_quantized(n_in, n_out, 4, group, False, False, v1=False, seed=3)
    parts = {
        "qweight": torch.from_numpy(pack_awq_gemm(q)),
        "qzeros": torch.from_numpy(pack_awq_gemm(z)),
        "scales": s,
    }
    cfg = quantization_config_from_hf(
        {"quant_method": "awq", "bits": 4, "group_size": group, "version": "gemm", "zero_point": True},
        "config.json",
    )
    t = gptq_tensor("layer", parts, cfg, "model.safetensors")
    assert (t.scheme, t.shape) == ("awq", (n_out, n_in))
    torch.testing.assert_close(t.dequantize(), want, rtol=0, atol=0)
    assert t.nbytes == n_in * n_out // 2 + z.shape[0] * n_out // 2 + s.numel() * 2


def _gptq_4bit(group, desc_act, sym, fmt, seed=0):
    n_in, n_out = 256, 96
    q, z, s, g, want = random_quantized(n_in, n_out, 4, group, desc_act, sym, v1=fmt == "gptq", seed=seed)
    stored_z = z - 1 if fmt == "gptq" else z
    parts = {
        "qweight": torch.from_numpy(pack_rows_like_gptqmodel(q, 4)),
        "qzeros": torch.from_numpy(pack_zeros_like_gptqmodel(stored_z & 15, 4)),
        "scales": s,
        "g_idx": torch.from_numpy(g.astype(np.int32)),
    }
    cfg = quantization_config_from_hf(hf_gptq_config(4, group, desc_act, sym, fmt), "config.json")
    return gptq_tensor("layer", parts, cfg, "model.safetensors"), want


def _q4_1_bound(t):
    """|error| of Q4_1 blocks against the exact weight: m = -scale * zero rounded to fp16."""
    g = t.group_index()
    m = (t.scales.float()[g] * t.int_zeros()[g].float()).T
    return m.abs() * 2.0**-11 + 1e-12


def _gguf_dequantized(blocks, perm, shape):
    """The gguf package's own dequantization of GroupQuant.blocks(), columns put back by perm."""
    import gguf

    stored = torch.cat(
        [
            torch.from_numpy(
                gguf.quants.dequantize(qt.data.numpy(), getattr(gguf.GGMLQuantizationType, qt.scheme)).astype(
                    np.float32
                )
            ).reshape(qt.shape)
            for _, _, qt in blocks
        ],
        dim=1,
    )
    assert stored.shape == shape
    if perm is None:
        return stored
    return torch.empty_like(stored).index_copy_(1, perm, stored)


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group", [32, 128, -1])
def test_4bit_gptq_without_act_order_becomes_q4_1_blocks(group, sym, fmt):
    """4-bit GPTQ maps onto GGUF Q4_1 (d = scale, m = -scale * zero): the gguf package's own
    dequantizer of those blocks gives the weight within m's fp16 rounding."""
    t, want = _gptq_4bit(group, False, sym, fmt)
    groups = t.as_groups()
    assert groups.perm is None
    torch.testing.assert_close(groups.dequantize(), want, rtol=0, atol=0)
    ((k0, k1, blocks),) = groups.blocks()
    assert (k0, k1, blocks.scheme, blocks.shape) == (0, t.shape[1], "Q4_1", t.shape)
    theirs = _gguf_dequantized([(k0, k1, blocks)], None, t.shape)
    assert ((theirs - want).abs() <= _q4_1_bound(t)).all()
    torch.testing.assert_close(blocks.dequantize(), theirs, rtol=0, atol=0)


def test_4bit_awq_becomes_q4_1_blocks():
    n_in, n_out = 256, 64
    q, z, s, g, want = random_quantized(n_in, n_out, 4, 64, False, False, v1=False, seed=5)
    parts = {
        "qweight": torch.from_numpy(pack_awq_gemm(q)),
        "qzeros": torch.from_numpy(pack_awq_gemm(z)),
        "scales": s,
    }
    cfg = quantization_config_from_hf(
        {"quant_method": "awq", "bits": 4, "group_size": 64, "version": "gemm", "zero_point": True},
        "config.json",
    )
    t = gptq_tensor("layer", parts, cfg, "model.safetensors")
    ((_, _, blocks),) = t.as_groups().blocks()
    assert ((blocks.dequantize() - want).abs() <= _q4_1_bound(t)).all()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("desc_act", [False, True])
@pytest.mark.parametrize("sym", [False, True])
def test_every_width_and_act_order_becomes_gguf_blocks(bits, desc_act, sym):
    """Any GPTQ width, act-order or not, is GGUF blocks behind an input permutation: up to 4
    bits as Q4_1, 8 bits as Q8_0 holding q - zero. The gguf package's dequantizer of those
    blocks, columns put back by the permutation, gives the weight within fp16 rounding of
    scale * zero (exact for Q8_0, whose d is the fp16 scale itself)."""
    q, z, s, g, want = random_quantized(256, 32, bits, 32, desc_act, sym, v1=False, seed=bits)
    parts = {
        "qweight": torch.from_numpy(pack_rows_like_gptqmodel(q, bits)),
        "qzeros": torch.from_numpy(pack_zeros_like_gptqmodel(z, bits)),
        "scales": s,
        "g_idx": torch.from_numpy(g.astype(np.int32)),
    }
    cfg = quantization_config_from_hf(hf_gptq_config(bits, 32, desc_act, sym, "gptq_v2"), "config.json")
    t = gptq_tensor("layer", parts, cfg, "model.safetensors")
    groups = t.as_groups()
    assert (groups.perm is not None) == desc_act
    assert groups.group_bits == (bits,) * 8 and groups.bits_per_weight == bits
    torch.testing.assert_close(groups.dequantize(), want, rtol=0, atol=0)
    diff = q.astype(np.int64) - z[g]
    if bits == 8 and not bool(((diff >= -128) & (diff <= 127)).all()):
        assert groups.blocks() is None  # q - zero leaves int8: stays dequantized
        return
    blocks = groups.blocks()
    assert {qt.scheme for _, _, qt in blocks} == {"Q4_1" if bits <= 4 else "Q8_0"}
    theirs = _gguf_dequantized(blocks, groups.perm, t.shape)
    assert ((theirs - want).abs() <= _q4_1_bound(t)).all()


@pytest.mark.parametrize("bits", [4, 5, 8])
def test_blocks_made_a_few_rows_at_a_time_are_those_made_at_once(monkeypatch, bits):
    """``GroupQuant.blocks`` works through ``BLOCK_ROWS`` rows at a time (bounded temporaries at
    load): the blocks are the same bytes whatever that size, for Q4_1, Q5_1 and Q8_0."""
    from tessera.formats import grouped

    g = torch.Generator().manual_seed(bits)
    n_out, n_in = 37, 96
    q = torch.randint(0, 2**bits, (n_out, n_in), generator=g).to(torch.uint8)
    scale = torch.rand(n_out, 3, generator=g) + 0.1
    zero = torch.full((n_out, 3), float(2 ** (bits - 1)))
    gq = grouped.GroupQuant((n_out, n_in), q, scale, zero, (0, 32, 64, 96), (bits,) * 3, None)
    whole = gq.blocks()
    monkeypatch.setattr(grouped, "BLOCK_ROWS", 8)
    chunked = gq.blocks()
    assert len(whole) == len(chunked) == 1
    assert whole[0][2].scheme == {4: "Q4_1", 5: "Q5_1", 8: "Q8_0"}[bits]
    assert torch.equal(whole[0][2].data, chunked[0][2].data)


# -- 3. bad input ---------------------------------------------------------------------------------


def write_checkpoint(folder: Path, quant: dict, edit=None) -> Path:
    """A one-layer Llama whose linears are GPTQ (4 bits, group 32) or AWQ; ``edit(tensors)``
    damages it before it is saved."""
    hidden, inter, vocab = 64, 128, 32
    awq = quant.get("quant_method") == "awq"
    tensors = {
        "model.embed_tokens.weight": torch.randn(vocab, hidden),
        "lm_head.weight": torch.randn(vocab, hidden),
        "model.norm.weight": torch.ones(hidden),
        "model.layers.0.input_layernorm.weight": torch.ones(hidden),
        "model.layers.0.post_attention_layernorm.weight": torch.ones(hidden),
    }
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, hidden)}
    shapes |= {"self_attn.v_proj": (hidden, hidden), "self_attn.o_proj": (hidden, hidden)}
    shapes |= {"mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden)}
    shapes |= {"mlp.down_proj": (hidden, inter)}
    for i, (module, (n_out, n_in)) in enumerate(shapes.items()):
        q, z, s, g, _ = random_quantized(n_in, n_out, 4, 32, False, False, v1=not awq, seed=i)
        prefix = f"model.layers.0.{module}"
        if awq:
            tensors[f"{prefix}.qweight"] = torch.from_numpy(pack_awq_gemm(q))
            tensors[f"{prefix}.qzeros"] = torch.from_numpy(pack_awq_gemm(z))
        else:
            tensors[f"{prefix}.qweight"] = torch.from_numpy(pack_rows_like_gptqmodel(q, 4))
            tensors[f"{prefix}.qzeros"] = torch.from_numpy(pack_zeros_like_gptqmodel(z - 1, 4))
            tensors[f"{prefix}.g_idx"] = torch.from_numpy(g.astype(np.int32))
        tensors[f"{prefix}.scales"] = s
    if edit is not None:
        edit(tensors)
    folder.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "quantization_config": quant,
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


GPTQ4 = hf_gptq_config(4, 32, False, False)
AWQ4 = {"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemm", "zero_point": True}
DOWN = "model.layers.0.mlp.down_proj"


def test_a_well_formed_gptq_and_awq_checkpoint_open(tmp_path):
    for quant in (GPTQ4, AWQ4):
        ck = open_checkpoint(write_checkpoint(tmp_path / quant["quant_method"], quant))
        weights = dict(ck.weights())
        assert isinstance(weights[f"{DOWN}.weight"], GPTQTensor)
        assert weights[f"{DOWN}.weight"].shape == (64, 128)


def set_part(name, value):
    def edit(tensors):
        tensors[name] = value(tensors[name]) if callable(value) else value

    return edit


@pytest.mark.parametrize(
    "quant,edit,names",
    [
        (GPTQ4, set_part(f"{DOWN}.g_idx", lambda g: torch.where(g == 3, 4, g)), [f"{DOWN}.g_idx", "group 4"]),
        (GPTQ4, set_part(f"{DOWN}.g_idx", lambda g: g - 1), [f"{DOWN}.g_idx", "group -1"]),
        ({**GPTQ4, "bits": 5}, None, ["quantization_config.bits", "5"]),
        ({**GPTQ4, "quant_method": "fp8"}, None, ["quantization_config.quant_method", "fp8"]),
        ({**AWQ4, "version": "gemv"}, None, ["quantization_config.version", "gemv"]),
        ({**GPTQ4, "checkpoint_format": "marlin"}, None, ["quantization_config.checkpoint_format"]),
        ({**GPTQ4, "group_size": 48}, None, ["quantization_config.group_size"]),
        ({**GPTQ4, "pack_dtype": "int16"}, None, ["quantization_config.pack_dtype"]),
        (GPTQ4, set_part(f"{DOWN}.scales", lambda s: s[:3]), [f"{DOWN}.scales", "shape"]),
        (GPTQ4, set_part(f"{DOWN}.qzeros", lambda z: z[:, :4]), [f"{DOWN}.qzeros", "shape"]),
        (GPTQ4, set_part(f"{DOWN}.qweight", lambda q: q[:15]), [f"{DOWN}.qweight", "shape"]),
        (GPTQ4, set_part(f"{DOWN}.g_idx", lambda g: g[:100]), [f"{DOWN}.qweight", "shape"]),
        (GPTQ4, set_part(f"{DOWN}.qweight", lambda q: q.float()), [f"{DOWN}.qweight", "dtype"]),
        (GPTQ4, lambda t: t.pop(f"{DOWN}.scales"), [f"{DOWN}.scales", "missing"]),
        (GPTQ4, set_part(f"{DOWN}.g_idx", lambda g: g.flip(0)), [f"{DOWN}.g_idx", "desc_act"]),
        ({**GPTQ4, "desc_act": True}, lambda t: t.pop(f"{DOWN}.g_idx"), [f"{DOWN}.g_idx", "desc_act"]),
        ({**GPTQ4, "sym": True}, None, ["qzeros", "sym"]),
        (AWQ4, set_part(f"{DOWN}.g_idx", torch.zeros(128, dtype=torch.int32)), [f"{DOWN}.g_idx", "AWQ"]),
        ({**AWQ4, "bits": 3}, None, ["quantization_config.bits"]),
        ({**AWQ4, "zero_point": False}, None, ["qzeros", "zero_point"]),
    ],
)
def test_bad_quantized_checkpoints_are_refused_at_open_naming_the_tensor_and_field(
    tmp_path, quant, edit, names
):
    folder = write_checkpoint(tmp_path, quant, edit)
    with pytest.raises(FormatError) as e:
        open_checkpoint(folder)  # refused before any weight is read or loaded
    for name in names:
        assert name in str(e.value)


def test_a_linear_whose_parts_lie_in_different_shards_is_yielded_once_all_are_read(tmp_path):
    folder = write_checkpoint(tmp_path, GPTQ4)
    tensors = load_file(folder / "model.safetensors")
    first = {k: v for k, v in tensors.items() if not k.startswith(DOWN) or k.endswith(".qweight")}
    second = {k: v for k, v in tensors.items() if k not in first}
    save_file(first, str(folder / "a.safetensors"))
    save_file(second, str(folder / "b.safetensors"))
    (folder / "model.safetensors").unlink()
    index = {"weight_map": {k: "a.safetensors" for k in first} | {k: "b.safetensors" for k in second}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    weights = dict(open_checkpoint(folder).weights())
    down = weights[f"{DOWN}.weight"]
    assert isinstance(down, GPTQTensor) and down.shape == (64, 128)
    assert torch.equal(down.qweight, tensors[f"{DOWN}.qweight"])
    assert torch.equal(down.g_idx, tensors[f"{DOWN}.g_idx"])
    assert len([n for n in weights if n.endswith("_proj.weight")]) == 7
