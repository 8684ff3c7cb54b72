"""EXL2 tensors against a reference dequantizer written here from exllamav2's own source (its
CUDA kernels can't run on this machine), on tensors our writer made and on hand-packed words;
the scale grid; the folder writer; bad EXL2 checkpoints refused at open."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tessera.formats import (
    EXL2Tensor,
    FormatError,
    GroupQuant,
    exl2_config_from_hf,
    exl2_parts,
    exl2_scale_grid,
    open_checkpoint,
    write_exl2_folder,
)
from tessera.formats.exl2 import exl2_tensor

# -- the reference: exllamav2 (turboderp-org/exllamav2 @ da07fac) read with numpy ---------------

# pack_columns_kernel (exllamav2_ext/cuda/pack_tensor.cu lines 117-248) packs, per column, a
# chunk of VALUES[b] values into WORDS[b] consecutive rows: value i sits at bit j = i*b of the
# chunk, wshift(x, j - 32*k) into word k (so it spills into word k+1 when it crosses 32 bits).
WORDS = {2: 1, 3: 3, 4: 1, 5: 5, 6: 3, 8: 1}
VALUES = {2: 16, 3: 32, 4: 8, 5: 32, 6: 16, 8: 4}


def reference_unpack_columns(words: np.ndarray, bits: int, rows: int) -> np.ndarray:
    """uint32 ``[qrows, cols]`` -> int ``[rows, cols]``: the inverse of pack_columns_kernel."""
    w = np.asarray(words, dtype=np.uint32).astype(np.uint64)
    n_chunks = -(-w.shape[0] // WORDS[bits])
    w = np.concatenate([w, np.zeros((n_chunks * WORDS[bits] - w.shape[0] + 1, w.shape[1]), np.uint64)])
    out = []
    for c in range(n_chunks):
        base = c * WORDS[bits]
        for i in range(VALUES[bits]):
            j = i * bits
            k, shift = j // 32, j % 32
            lo = w[base + k] >> np.uint64(shift)
            # the part that pack put into word k + 1 (wshift(x, j - 32*(k+1)) is x >> (32*(k+1) - j))
            hi = w[base + k + 1] << np.uint64(32 - shift) if shift + bits > 32 and k + 1 < WORDS[bits] else 0
            out.append((lo | hi) & np.uint64((1 << bits) - 1))
    return np.stack(out)[:rows].astype(np.int64)


def reference_dequantize(parts: dict) -> np.ndarray:
    """float16 ``[out, in]`` as exllamav2 reconstructs it:

    - ``q_perm = argsort(q_invperm)`` (module.py ``load_weight``, lines 119-120);
    - group ``i`` has ``bits = q_groups[2i]`` and starts at q_weight row ``q_groups[2i+1]``; its
      input rows are ``(q_groups[2i+3] - q_groups[2i+1]) * 32 / bits``, the last group the rest
      (q_matrix.cu, QMatrix constructor lines 127-150);
    - the 4-bit scale of column n is nibble ``n % 8`` of ``q_scale[group, n / 8]``
      (matrix_view.cuh ``MatrixView_q4_row::item``) plus one (pack_rows_4_kernel stores
      ``x - 1``, pack_tensor.cu lines 24-31);
    - ``make_q_matrix`` divides q_scale_max by 256 in fp16 (ext.py line 336), ``dq_scale``
      (qdq_util.cuh lines 24-30) is ``half(qs*qs) * max_scale`` in fp16;
    - a weight is ``half(q - 2^(bits-1)) * scale`` in fp16 (qdq_*.cuh ``dequant_*`` subtract the
      midpoint, reconstruct_kernel multiplies by the scale with __hmul2) written to input row
      ``q_perm[k]`` (q_matrix.cu reconstruct_kernel, ``b_.set(perm[lk++], n, ...)``).
    """
    q_weight = parts["q_weight"].numpy().view(np.uint32)
    q_groups = parts["q_groups"].numpy().astype(np.int64)
    q_scale = parts["q_scale"].numpy().view(np.uint32)
    max_scale = (parts["q_scale_max"].numpy().astype(np.float16) / np.float16(256)).astype(np.float16)
    perm = np.argsort(parts["q_invperm"].numpy())
    height, width = len(perm), q_weight.shape[1]
    groups = len(q_groups) // 2
    cols = np.arange(width)
    w = np.zeros((height, width), np.float16)
    row = 0
    for i in range(groups):
        bits, first = int(q_groups[2 * i]), int(q_groups[2 * i + 1])
        if i < groups - 1:
            qrows = int(q_groups[2 * i + 3]) - first
            rows = qrows * 32 // bits
        else:
            qrows, rows = q_weight.shape[0] - first, height - row
        q = reference_unpack_columns(q_weight[first : first + qrows], bits, rows)
        qs = ((q_scale[i, cols // 8] >> (4 * (cols % 8)).astype(np.uint32)) & 0xF).astype(np.int64) + 1
        scale = (qs * qs).astype(np.float16) * max_scale[i]
        w[perm[row : row + rows]] = (q - (1 << (bits - 1))).astype(np.float16) * scale
        row += rows
    assert row == height
    return w.T


# -- building EXL2 linears with our writer -----------------------------------------------------


def quantize(w: torch.Tensor, starts, bits, perm) -> tuple[GroupQuant, torch.Tensor]:
    """Round-to-nearest EXL2 of ``w`` (absmax scales put on EXL2's grid first): the GroupQuant
    and its weights ``exact_scale * (q - 2^(b-1))`` in input order, computed here directly."""
    n_out, n_in = w.shape
    stored = w[:, perm]
    sizes = torch.tensor([b - a for a, b in zip(starts, starts[1:], strict=False)])
    col = torch.repeat_interleave(torch.arange(len(bits)), sizes)
    mid = torch.tensor([2.0 ** (b - 1) for b in bits])
    want = torch.stack([stored[:, a:b].abs().amax(1) for a, b in zip(starts, starts[1:], strict=False)], 1)
    _, _, scale = exl2_scale_grid(want / mid)
    q = torch.round(stored / scale[:, col]) + mid[col]
    q = torch.minimum(q.clamp(min=0), 2 * mid[col] - 1)
    dense = torch.empty_like(w)
    dense[:, perm] = scale[:, col] * (q - mid[col])
    g = GroupQuant(
        (n_out, n_in), q.to(torch.uint8), scale, mid.expand(n_out, -1).contiguous(), starts, bits, perm
    )
    return g, dense


MIXED = [
    # (out, in, group starts, bits): widest first as exllamav2's kernels read them
    (64, 256, (0, 32, 64, 128, 192, 224, 240, 256), (8, 6, 5, 4, 3, 2, 2)),
    (32, 128, (0, 32, 64, 96, 128), (6, 5, 4, 3)),
    (96, 64, (0, 64), (4,)),
    (32, 320, (0, 64, 128, 192, 256, 320), (5, 4, 4, 4, 3)),  # runs of one width pack together
    (32, 96, (0, 96), (3,)),
]


@pytest.mark.parametrize("n_out,n_in,starts,bits", MIXED)
def test_dequantize_of_our_packing_equals_the_exllamav2_reference(n_out, n_in, starts, bits):
    torch.manual_seed(n_in + n_out)
    w = torch.randn(n_out, n_in) * 0.02
    perm = torch.randperm(n_in)
    g, dense = quantize(w, starts, bits, perm)
    parts = exl2_parts(g)
    t = exl2_tensor("x", parts, "mem")
    want = torch.from_numpy(reference_dequantize(parts).copy())
    assert torch.equal(t.dequantize(torch.float16), want)
    assert torch.equal(t.dequantize(torch.float32), dense)  # what the quantizer meant, exactly
    back = t.as_groups()
    assert torch.equal(back.q, g.q) and torch.equal(back.scale, g.scale) and torch.equal(back.perm, perm)
    assert back.group_starts == starts and back.group_bits == bits
    assert torch.equal(back.zero[0], torch.tensor([2.0 ** (b - 1) for b in bits]))


def test_parts_have_exllamav2s_dtypes_and_shapes():
    g, _ = quantize(torch.randn(64, 256), *MIXED[0][2:], torch.randperm(256))
    parts = exl2_parts(g)
    # words: 32 rows at 8 bits = 8, 32 at 6 = 6, 64 at 5 = 10, 64 at 4 = 8, 32 at 3 = 3, 16+16 at 2 = 1+1
    assert {k: (v.dtype, list(v.shape)) for k, v in parts.items()} == {
        "q_weight": (torch.int32, [37, 64]),
        "q_scale": (torch.int32, [7, 8]),
        "q_scale_max": (torch.float16, [7]),
        "q_groups": (torch.int16, [14]),
        "q_invperm": (torch.int32, [256]),
    }
    assert parts["q_groups"].tolist() == [8, 0, 6, 8, 5, 14, 4, 24, 3, 32, 2, 35, 2, 36]


def test_hand_packed_words_dequantize_as_the_reference_and_by_hand():
    """Groups of 16 rows at 6 bits, 32 at 3 and 8 at 4 (three words, three words, one), every
    column holding the same words: 6-bit values 4i+1, 3-bit values i%8, 4-bit values 0..7."""
    six = [0x51349141, 0x99617595, 0xF79D71B6]
    three = [0x88FAC688, 0xC688FAC6, 0xFAC688FA]
    four = [0x76543210]
    words = np.array(six + three + four, dtype=np.uint32)[:, None].repeat(8, 1)
    n_in = 16 + 32 + 8
    invperm = np.arange(n_in)[::-1].copy()  # stored row j is input n_in - 1 - j
    parts = {
        "q_weight": torch.from_numpy(words.view(np.int32)),
        # column n: level n + 9 in group 0, 16 in group 1, 1 in group 2
        "q_scale": torch.from_numpy(
            np.array([[0xFEDCBA98], [0xFFFFFFFF], [0]], dtype=np.uint32).view(np.int32)
        ),
        "q_scale_max": torch.tensor([2.0, 0.5, 256.0], dtype=torch.float16),
        "q_groups": torch.tensor([6, 0, 3, 3, 4, 6], dtype=torch.int16),
        "q_invperm": torch.from_numpy(invperm.astype(np.int32)),
    }
    got = exl2_tensor("x", parts, "mem").dequantize(torch.float32)
    stored = torch.zeros(8, n_in)
    for n in range(8):
        stored[n, :16] = torch.tensor([4.0 * i + 1 - 32 for i in range(16)]) * (n + 9) ** 2 * 2.0 / 256
        stored[n, 16:48] = torch.tensor([i % 8 - 4.0 for i in range(32)]) * 256 * 0.5 / 256
        stored[n, 48:] = torch.tensor([i - 8.0 for i in range(8)]) * 1.0
    assert torch.equal(got, stored.flip(1))
    assert torch.equal(got.half(), torch.from_numpy(reference_dequantize(parts).copy()))


def test_a_partial_last_group_is_read_through_its_inputs():
    """A last group of 20 inputs at 4 bits fills two and a half words: the writer refuses a size
    exllamav2's kernels can't step through, but a reader takes it as exllamav2's pack rounds it."""
    from tessera.formats.exl2_write import pack_rows

    g, _ = quantize(torch.randn(32, 52), (0, 32, 52), (6, 4), torch.randperm(52))
    with pytest.raises(ValueError, match="group 1 spans 20 inputs"):
        exl2_parts(g)
    q = g.q.T.long()
    parts = {
        "q_weight": torch.cat([pack_rows(q[:32], 6), pack_rows(q[32:], 4)]),
        "q_scale": torch.tensor([[0x12345678] * 4, [-1] * 4], dtype=torch.int32),
        "q_scale_max": torch.tensor([0.25, 0.125], dtype=torch.float16),
        "q_groups": torch.tensor([6, 0, 4, 6], dtype=torch.int16),
        "q_invperm": torch.argsort(g.perm).int(),
    }
    assert parts["q_weight"].shape[0] == 6 + 3
    t = exl2_tensor("x", parts, "mem")
    assert t.group_starts == (0, 32, 52)
    assert torch.equal(t.dequantize(torch.float16), torch.from_numpy(reference_dequantize(parts).copy()))


# -- the scale grid -----------------------------------------------------------------------------


def test_scale_grid_is_dq_scale_of_levels_and_the_group_max():
    torch.manual_seed(0)
    want = torch.rand(64, 5) * torch.tensor([1e-4, 1e-3, 0.01, 0.1, 3.0])  # fp16-subnormal max/256 too
    levels, q_scale_max, exact = exl2_scale_grid(want)
    assert levels.dtype == torch.uint8 and int(levels.min()) >= 1 and int(levels.max()) == 16
    ref = (levels.numpy().astype(np.int64) ** 2).astype(np.float16) * (
        q_scale_max.numpy() / np.float16(256)
    ).astype(np.float16)
    assert torch.equal(exact, torch.from_numpy(ref.astype(np.float32)))
    assert torch.equal(exact.max(0).values, q_scale_max.float())  # so exl2_parts finds it back
    # nearest level in the square-root domain, as exllamav2's find_params picks it
    ratio = (want / q_scale_max.float()).sqrt() * 16
    assert bool(((levels.float() - ratio).abs() <= 0.5 + 1e-4).all() | (levels == 1).any())
    assert bool(((exact - want).abs() <= want.max(0).values / 6).all())


def test_a_zero_group_stays_zero_and_bad_scales_are_refused():
    levels, q_scale_max, exact = exl2_scale_grid(torch.zeros(32, 1))
    assert float(q_scale_max[0]) == 0 and not exact.any()
    for bad in (torch.full((4, 1), -1.0), torch.full((4, 1), float("nan")), torch.ones(4)):
        with pytest.raises(ValueError, match="scale"):
            exl2_scale_grid(bad)


# -- what the writer refuses ------------------------------------------------------------------


def _edit(g: GroupQuant, **changes) -> GroupQuant:
    fields = {k: getattr(g, k) for k in ("shape", "q", "scale", "zero", "group_starts", "group_bits", "perm")}
    return GroupQuant(**(fields | changes))


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda g: _edit(g, group_bits=(6, 7)), "bit widths"),
        (lambda g: _edit(g, group_bits=(4, 6)), "widest to narrowest"),
        (lambda g: _edit(g, zero=g.zero + 1), "zero points"),
        (lambda g: _edit(g, scale=g.scale * 1.001), "not on EXL2's grid"),
        (lambda g: _edit(g, group_starts=(0, 48, 64)), "group 0 spans 48 inputs"),
        (lambda g: _edit(g, q=g.q | 0x80), "beyond their group's bit width"),
        (lambda g: _edit(g, shape=(16, 64), q=g.q[:16], scale=g.scale[:16], zero=g.zero[:16]), "16 outputs"),
    ],
)
def test_the_writer_refuses_what_exllamav2_could_not_read(change, message):
    g, _ = quantize(torch.randn(32, 64), (0, 32, 64), (6, 4), torch.randperm(64))
    with pytest.raises(ValueError, match=message):
        exl2_parts(change(g))


# -- the folder writer ---------------------------------------------------------------------------

LLAMA = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 32,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
SIGNATURE = {
    "quant_method": "exl2",
    "version": "0.3.2",
    "bits": 4.5,
    "head_bits": 6,
    "calibration": {"rows": 100, "length": 2048, "dataset": "(default)"},
}
MIX = {64: ((0, 32, 64), (6, 4)), 128: ((0, 32, 64, 128), (5, 4, 3))}
DOWN = "model.layers.0.mlp.down_proj"


def llama_tensors(seed=0) -> dict:
    """A one-layer Llama: every linear (and lm_head) an EXL2 GroupQuant, the rest plain fp16."""
    gen = torch.Generator().manual_seed(seed)
    hidden, inter, vocab, kv = 64, 128, 32, 32
    out = {
        "model.embed_tokens.weight": torch.randn(vocab, hidden, generator=gen).half(),
        "model.norm.weight": torch.ones(hidden).half(),
        "model.layers.0.input_layernorm.weight": torch.ones(hidden).half(),
        "model.layers.0.post_attention_layernorm.weight": torch.ones(hidden).half(),
    }
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv, hidden)}
    shapes |= {"self_attn.v_proj": (kv, hidden), "self_attn.o_proj": (hidden, hidden)}
    shapes |= {
        "mlp.gate_proj": (inter, hidden),
        "mlp.up_proj": (inter, hidden),
        "mlp.down_proj": (hidden, inter),
    }
    for name, (n_out, n_in) in {
        **{f"model.layers.0.{k}": v for k, v in shapes.items()},
        "lm_head": (vocab, hidden),
    }.items():
        w = torch.randn(n_out, n_in, generator=gen) * 0.05
        out[f"{name}.weight"] = quantize(w, *MIX[n_in], torch.randperm(n_in, generator=gen))[0]
    return out


def test_a_written_folder_opens_with_one_exl2_tensor_per_linear(tmp_path):
    tensors = llama_tensors()
    measurement = {"measurement": {"model.layers.0.self_attn": []}, "last_module_idx": 1}
    tok = tmp_path / "tokenizer.json"
    tok.write_text("{}")
    folder = write_exl2_folder(
        tmp_path / "m", LLAMA, tensors, SIGNATURE, measurement, {"tokenizer.json": tok}
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "tokenizer.json"]  # no leftovers
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "measurement.json", "model.safetensors", "tokenizer.json",
    ]  # fmt: skip
    assert json.loads((folder / "config.json").read_text())["quantization_config"] == SIGNATURE
    assert json.loads((folder / "measurement.json").read_text()) == measurement
    ck = open_checkpoint(folder)
    assert ck.config.quantization == exl2_config_from_hf(SIGNATURE, "x")
    weights = dict(ck.weights())
    assert sorted(weights) == sorted(tensors)
    for name, t in tensors.items():
        if isinstance(t, GroupQuant):
            assert isinstance(weights[name], EXL2Tensor) and weights[name].shape == t.shape
            assert torch.equal(weights[name].dequantize(), t.dequantize())
        else:
            assert torch.equal(weights[name], t)


def test_an_unsigned_folder_with_exllamav2s_file_names_is_recognised_by_its_tensors(tmp_path):
    folder = write_exl2_folder(tmp_path / "m", LLAMA, llama_tensors(), SIGNATURE)
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]  # converted without -cf: the original config.json
    (folder / "config.json").write_text(json.dumps(config))
    all_tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(all_tensors)
    save_file({k: all_tensors[k] for k in names[:20]}, str(folder / "output-00001-of-00002.safetensors"))
    save_file({k: all_tensors[k] for k in names[20:]}, str(folder / "output-00002-of-00002.safetensors"))
    ck = open_checkpoint(folder)
    assert ck.config.quantization is not None and ck.config.quantization.quant_method == "exl2"
    weights = dict(ck.weights())
    assert isinstance(weights[f"{DOWN}.weight"], EXL2Tensor) and weights[f"{DOWN}.weight"].shape == (64, 128)


def test_the_folder_writer_refuses_before_writing_anything(tmp_path):
    tensors = llama_tensors()
    g = tensors[f"{DOWN}.weight"]
    bad_cases = [
        ({**tensors, f"{DOWN}.weight": _edit(g, zero=g.zero + 1)}, SIGNATURE, f"tensor {DOWN}.weight"),
        (tensors, {**SIGNATURE, "bits": "four"}, "quantization_config.bits"),
        (tensors, {**SIGNATURE, "quant_method": "gptq"}, "quant_method"),
        ({**tensors, "model.norm.weight": [1.0]}, SIGNATURE, "model.norm.weight"),
        ({**tensors, f"{DOWN}.q_weight": torch.zeros(1)}, SIGNATURE, f"{DOWN}.q_weight"),
    ]
    for case, signature, message in bad_cases:
        with pytest.raises(FormatError, match=message):
            write_exl2_folder(tmp_path / "m", LLAMA, case, signature)
        assert list(tmp_path.iterdir()) == []
    with pytest.raises(FormatError, match="extra file"):
        write_exl2_folder(tmp_path / "m", LLAMA, tensors, SIGNATURE, None, {"x.safetensors": Path(__file__)})
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "keep").write_text("")
    with pytest.raises(FormatError, match="not an empty folder"):
        write_exl2_folder(tmp_path / "m", LLAMA, tensors, SIGNATURE)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["keep", "m"]


def test_a_failure_while_writing_leaves_nothing_behind(tmp_path, monkeypatch):
    import tessera.formats.exl2_write as writer

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(writer.shutil, "copyfile", fail)
    src = tmp_path / "tok.json"
    src.write_text("{}")
    with pytest.raises(OSError, match="disk full"):
        write_exl2_folder(tmp_path / "m", LLAMA, llama_tensors(), SIGNATURE, None, {"tokenizer.json": src})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok.json"]


# -- bad EXL2 checkpoints are refused at open ----------------------------------------------------


def write_damaged(folder: Path, edit) -> Path:
    folder = write_exl2_folder(folder, LLAMA, llama_tensors(), SIGNATURE)
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def set_part(part, value):
    def edit(tensors):
        name = f"{DOWN}.{part}"
        tensors[name] = value(tensors[name]).contiguous() if callable(value) else value

    return edit


def _swap(t: torch.Tensor, i: int, v: int) -> torch.Tensor:
    t = t.clone()
    t[i] = v
    return t


@pytest.mark.parametrize(
    "edit,fragments",
    [
        (set_part("q_weight", lambda q: q[:-1]), ["q_groups", "q_weight's 14 rows"]),
        (set_part("q_weight", lambda q: torch.cat([q, q[:3]])), ["q_groups", "18 rows"]),
        (set_part("q_invperm", lambda p: _swap(p, 5, 128)), ["q_invperm", "holds 128", "0..127"]),
        (set_part("q_invperm", lambda p: _swap(p, 5, -1)), ["q_invperm", "holds -1"]),
        (set_part("q_invperm", lambda p: _swap(p, 5, int(p[6]))), ["q_invperm", "not a permutation"]),
        (set_part("q_groups", lambda g: _swap(g, 0, 7)), ["q_groups", "group 0 7 bits"]),
        (set_part("q_groups", lambda g: _swap(g, 3, 11)), ["q_groups", "group 0"]),
        (set_part("q_groups", lambda g: _swap(g, 1, 2)), ["q_groups", "starts group 0 at q_weight row 2"]),
        (set_part("q_groups", lambda g: g[:4]), ["q_groups", "shape", "[6]"]),
        (set_part("q_scale", lambda s: s[:, :4]), ["q_scale", "shape"]),
        (set_part("q_scale_max", lambda s: s.float()), ["q_scale_max", "dtype", "float16"]),
        (set_part("q_scale_max", lambda s: _swap(s, 1, float("inf"))), ["q_scale_max", "not finite"]),
        (set_part("q_weight", lambda q: q.long()), ["q_weight", "dtype", "int32"]),
        (set_part("q_perm", torch.arange(128, dtype=torch.int32)), ["q_perm", "inverse"]),
        (lambda t: t.pop(f"{DOWN}.q_scale"), [f"{DOWN}.q_scale", "missing"]),
        (lambda t: t.pop(f"{DOWN}.q_weight"), ["has no", f"{DOWN}.q_weight beside it"]),
    ],
)
def test_bad_exl2_checkpoints_are_refused_at_open_naming_the_tensor_and_field(tmp_path, edit, fragments):
    folder = write_damaged(tmp_path / "m", edit)
    with pytest.raises(FormatError) as e:
        open_checkpoint(folder)  # refused before any weight is read or loaded
    assert f"{DOWN}." in str(e.value)
    for fragment in fragments:
        assert fragment in str(e.value)


def test_a_truncated_file_is_refused_at_open(tmp_path):
    folder = write_exl2_folder(tmp_path / "m", LLAMA, llama_tensors(), SIGNATURE)
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(FormatError, match="model.safetensors"):
        open_checkpoint(folder)


@pytest.mark.parametrize(
    "field,value",
    [("bits", 9), ("bits", True), ("head_bits", 7), ("calibration", [1]), ("version", 3)],
)
def test_a_bad_signature_is_refused_naming_the_field(tmp_path, field, value):
    folder = write_exl2_folder(tmp_path / "m", LLAMA, llama_tensors(), SIGNATURE)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"][field] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(FormatError, match=f"quantization_config.{field}"):
        open_checkpoint(folder)
