"""Hostile and damaged model files, each built small in a folder, with what the error must say.

Shared by ``test_bad_checkpoints.py`` (the readers raise FormatError) and
``integration_tests/test_bad_model_files.py`` (the CLI prints one line and exits 2 in bounded
memory), which loads this file by path. Each case starts from a well-formed tiny Llama (a GGUF
written with gguf's GGUFWriter, or an HF folder written with safetensors) and breaks one thing;
the few faults a writer won't produce are hand-written bytes.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TOKENS = [chr(c) for c in range(ord("a"), ord("a") + 16)]  # 16 one-letter BPE tokens


@dataclass
class Bad:
    model: Path  # what ``--model`` is given
    source: Path  # the file the message must start with
    fragments: tuple[str, ...]  # what the message must contain (field or tensor, bad value)


# -- a tiny Llama GGUF ---------------------------------------------------------------------------

GGUF_META = {
    "llama.block_count": ("uint32", 1),
    "llama.context_length": ("uint32", 64),
    "llama.embedding_length": ("uint32", 32),
    "llama.feed_forward_length": ("uint32", 64),
    "llama.attention.head_count": ("uint32", 4),
    "llama.attention.head_count_kv": ("uint32", 2),
    "llama.attention.layer_norm_rms_epsilon": ("float32", 1e-5),
    "tokenizer.ggml.model": ("string", "gpt2"),
    "tokenizer.ggml.pre": ("string", "default"),
    "tokenizer.ggml.tokens": ("array", TOKENS),
    "tokenizer.ggml.bos_token_id": ("uint32", 1),
    "tokenizer.ggml.eos_token_id": ("uint32", 2),
}


def gguf_tensors(hidden=32, ffn=64, kv=16, vocab=16, layers=1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)

    def w(*shape):
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    out = {"token_embd.weight": w(vocab, hidden), "output_norm.weight": np.ones(hidden, np.float32)}
    for b in range(layers):
        out |= {
            f"blk.{b}.attn_norm.weight": np.ones(hidden, np.float32),
            f"blk.{b}.ffn_norm.weight": np.ones(hidden, np.float32),
            f"blk.{b}.attn_q.weight": w(hidden, hidden),
            f"blk.{b}.attn_k.weight": w(kv, hidden),
            f"blk.{b}.attn_v.weight": w(kv, hidden),
            f"blk.{b}.attn_output.weight": w(hidden, hidden),
            f"blk.{b}.ffn_gate.weight": w(ffn, hidden),
            f"blk.{b}.ffn_up.weight": w(ffn, hidden),
            f"blk.{b}.ffn_down.weight": w(hidden, ffn),
        }
    return out


def write_gguf(path: Path, meta: dict | None = None, tensors: dict | None = None, arch="llama") -> Path:
    """The tiny Llama with metadata entries replaced (``(kind, value)``) or dropped (``None``)."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch=arch)
    for key, entry in {**GGUF_META, **(meta or {})}.items():
        if entry is not None:
            kind, value = entry
            getattr(w, f"add_{kind}")(key, value)
    for name, value in (gguf_tensors() if tensors is None else tensors).items():
        if isinstance(value, tuple):  # (raw bytes, quant type, shape)
            raw, qtype, shape = value
            w.add_tensor(name, raw, raw_shape=shape, raw_dtype=qtype)
        else:
            w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# -- hand-written GGUF bytes -----------------------------------------------------------------------


def _gstr(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def kv_u32(key: str, value: int) -> bytes:
    return _gstr(key) + struct.pack("<II", 4, value)


def kv_str(key: str, value: str) -> bytes:
    return _gstr(key) + struct.pack("<I", 8) + _gstr(value)


def raw_gguf(
    path: Path,
    kvs: list[bytes] = (),
    tensors: list[tuple[str, tuple[int, ...], int, int]] = (),
    *,
    n_kv: int | None = None,
    n_tensors: int | None = None,
    version: int = 3,
    magic: bytes = b"GGUF",
    tail: bytes = b"",
) -> Path:
    """A GGUF laid out by hand: header counts may lie, ``tail`` follows the tensor table."""
    out = bytearray(magic + struct.pack("<I", version))
    out += struct.pack(
        "<QQ", len(tensors) if n_tensors is None else n_tensors, len(kvs) if n_kv is None else n_kv
    )
    for kv in kvs:
        out += kv
    for name, dims, qtype, offset in tensors:
        out += (
            _gstr(name) + struct.pack(f"<I{len(dims)}Q", len(dims), *dims) + struct.pack("<IQ", qtype, offset)
        )
    out += b"\0" * (-len(out) % 32) + tail
    path.write_bytes(bytes(out))
    return path


LLAMA_KVS = [kv_str("general.architecture", "llama"), kv_u32("llama.block_count", 1)]


# -- a tiny Llama HF folder ------------------------------------------------------------------------

HF_CONFIG = {
    "model_type": "llama",
    "vocab_size": 16,
    "hidden_size": 8,
    "intermediate_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "tie_word_embeddings": True,
}


def hf_tensors(vocab=16, hidden=8, inter=16, q=8, kv=4, layers=1):
    import torch

    out = {"model.embed_tokens.weight": torch.zeros(vocab, hidden), "model.norm.weight": torch.ones(hidden)}
    for n in range(layers):
        p = f"model.layers.{n}."
        out |= {
            p + "input_layernorm.weight": torch.ones(hidden),
            p + "post_attention_layernorm.weight": torch.ones(hidden),
            p + "self_attn.q_proj.weight": torch.zeros(q, hidden),
            p + "self_attn.k_proj.weight": torch.zeros(kv, hidden),
            p + "self_attn.v_proj.weight": torch.zeros(kv, hidden),
            p + "self_attn.o_proj.weight": torch.zeros(hidden, q),
            p + "mlp.gate_proj.weight": torch.zeros(inter, hidden),
            p + "mlp.up_proj.weight": torch.zeros(inter, hidden),
            p + "mlp.down_proj.weight": torch.zeros(hidden, inter),
        }
    return out


def write_hf(
    folder: Path,
    config: dict | None = None,
    *,
    config_bytes: bytes | None = None,
    tensors: dict | None = None,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """The tiny Llama folder (config.json, model.safetensors, a word-level tokenizer.json) with the
    config's fields replaced (``None`` drops one) or config.json's bytes given outright."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder.mkdir(parents=True, exist_ok=True)
    if config_bytes is None:
        cfg = {k: v for k, v in {**HF_CONFIG, **(config or {})}.items() if v is not None}
        config_bytes = json.dumps(cfg).encode()
    (folder / "config.json").write_bytes(config_bytes)
    save_file(hf_tensors() if tensors is None else tensors, str(folder / "model.safetensors"))
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(TOKENS)}, unk_token="a"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    for name, data in (extra_files or {}).items():
        (folder / name).write_bytes(data)
    return folder


# -- the cases -------------------------------------------------------------------------------------


def _gguf(name, fragments, meta=None, tensors=None, arch="llama"):
    def build(d: Path) -> Bad:
        p = write_gguf(d / f"{name}.gguf", meta, tensors, arch)
        return Bad(p, p, _tuple(fragments))

    return build


def _raw(name, fragments, **kwargs):
    def build(d: Path) -> Bad:
        p = raw_gguf(d / f"{name}.gguf", **kwargs)
        return Bad(p, p, _tuple(fragments))

    return build


def _hf(name, fragments, config=None, source="config.json", **kwargs):
    def build(d: Path) -> Bad:
        folder = write_hf(d / name, config, **kwargs)
        return Bad(folder, folder / source, _tuple(fragments))

    return build


def _tuple(fragments) -> tuple[str, ...]:
    return (fragments,) if isinstance(fragments, str) else tuple(fragments)


def _truncated_gguf(d: Path) -> Bad:
    p = write_gguf(d / "truncated.gguf")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 1000])  # the last tensors' data is gone
    return Bad(p, p, ("ends at byte", "truncated?"))


def _unknown_quant(d: Path) -> Bad:
    import gguf

    qtype = gguf.GGMLQuantizationType.IQ2_XXS
    _, size = gguf.GGML_QUANT_SIZES[qtype]
    tensors = gguf_tensors()
    tensors["blk.0.attn_q.weight"] = (np.zeros((32, size), np.uint8), qtype, (32, size))  # 32 rows of 256
    p = write_gguf(d / "iq2.gguf", None, tensors)
    return Bad(p, p, ("tensor blk.0.attn_q.weight has type IQ2_XXS", "supported:"))


def _u32(key, value):
    return {key: ("uint32", value)}


_LAYERS_1E9 = json.dumps(HF_CONFIG).replace('"num_hidden_layers": 1', '"num_hidden_layers": 1e9').encode()

CASES = {
    # GGUF metadata as a writer produces it
    "gguf-head-count-zero": _gguf(
        "heads0", "llama.attention.head_count is 0, must be at least 1", _u32("llama.attention.head_count", 0)
    ),
    "gguf-kv-heads-do-not-divide": _gguf(
        "kv3",
        "llama.attention.head_count 4 is not a multiple of llama.attention.head_count_kv 3",
        _u32("llama.attention.head_count_kv", 3),
    ),
    "gguf-hidden-not-a-multiple-of-heads": _gguf(
        "heads5",
        "llama.embedding_length 32 is not a multiple of llama.attention.head_count 5",
        {**_u32("llama.attention.head_count", 5), **_u32("llama.attention.head_count_kv", 5)},
    ),
    "gguf-block-count-2**40": _gguf(
        "blocks",
        ("llama.block_count is 1099511627776", "tensors of 1 block (numbered up to 0)"),
        {"llama.block_count": ("uint64", 2**40)},
    ),
    "gguf-block-count-above-the-blocks-present": _gguf(
        "blocks3",
        ("llama.block_count is 3", "tensors of 1 block (numbered up to 0)"),
        _u32("llama.block_count", 3),
    ),
    "gguf-block-count-a-float": _gguf(
        "blocksf", "llama.block_count is 1.0, not an integer", {"llama.block_count": ("float32", 1.0)}
    ),
    "gguf-head-count-a-string": _gguf(
        "headss",
        "llama.attention.head_count is '4', not an integer",
        {"llama.attention.head_count": ("string", "4")},
    ),
    "gguf-head-count-a-bool": _gguf(
        "headsb",
        "llama.attention.head_count is True, not an integer",
        {"llama.attention.head_count": ("bool", True)},
    ),
    "gguf-head-count-per-layer-array": _gguf(
        "headsa",
        "llama.attention.head_count is [4], not an integer",
        {"llama.attention.head_count": ("array", [4])},
    ),
    "gguf-embedding-length-2**40": _gguf(
        "hidden",
        "llama.embedding_length is 1099511627776, more than",
        {"llama.embedding_length": ("uint64", 2**40)},
    ),
    "gguf-vocab-size-not-the-embedding": _gguf(
        "vocab",
        "llama.vocab_size is 100 but tensor token_embd.weight has 16 rows",
        _u32("llama.vocab_size", 100),
    ),
    "gguf-no-embedding-tensor": _gguf(
        "noembd",
        "tensor token_embd.weight is missing",
        tensors={k: v for k, v in gguf_tensors().items() if k != "token_embd.weight"},
    ),
    "gguf-unknown-architecture": _gguf(
        "falcon",
        "architecture 'falcon' is not supported (supported: llama, qwen2, gemma3, qwen2moe, qwen3moe)",
        arch="falcon",
    ),
    "gguf-no-token-list": _gguf(
        "notokens",
        "metadata key tokenizer.ggml.tokens is missing",
        {"tokenizer.ggml.tokens": None, **_u32("llama.vocab_size", 16)},
    ),
    "gguf-bos-id-past-the-vocab": _gguf(
        "bos",
        "tokenizer.ggml.bos_token_id is 999, more than the largest allowed (15)",
        _u32("tokenizer.ggml.bos_token_id", 999),
    ),
    "gguf-unknown-quant-type": _unknown_quant,
    "gguf-truncated-tensor-data": _truncated_gguf,
    # GGUF bytes no writer produces
    "gguf-bad-magic": _raw("magic", "not a GGUF file (magic b'GGUX')", magic=b"GGUX", kvs=LLAMA_KVS),
    "gguf-version-7": _raw("version", "GGUF version 7", version=7, kvs=LLAMA_KVS),
    "gguf-tensor-dims-overflow-64-bits": _raw(
        "dims",
        ("tensor token_embd.weight has dimensions [1099511627776, 1099511627776]", "64-bit"),
        kvs=LLAMA_KVS,
        tensors=[("token_embd.weight", (2**40, 2**40), 0, 0)],
    ),
    "gguf-tensor-bigger-than-the-file": _raw(
        "dims2",
        ("tensor token_embd.weight has dimensions [1048576, 1048576]", "more than the whole file"),
        kvs=LLAMA_KVS,
        tensors=[("token_embd.weight", (2**20, 2**20), 0, 0)],
    ),
    "gguf-unknown-tensor-type-number": _raw(
        "qtype",
        "tensor token_embd.weight has unknown type number 999",
        kvs=LLAMA_KVS,
        tensors=[("token_embd.weight", (32, 16), 999, 0)],
    ),
    "gguf-string-of-2**60-bytes": _raw(
        "string",
        ("a string of 1152921504606846976 bytes", "runs past the end of the file"),
        kvs=[_gstr("general.name") + struct.pack("<IQ", 8, 2**60) + b"abc"],
    ),
    "gguf-key-of-2**60-bytes": _raw(
        "key", "a string of 1152921504606846976 bytes", kvs=[struct.pack("<Q", 2**60) + b"general.name"]
    ),
    "gguf-array-of-2**40-integers": _raw(
        "array",
        "1099511627776 values in the array tokenizer.ggml.token_type",
        kvs=[*LLAMA_KVS, _gstr("tokenizer.ggml.token_type") + struct.pack("<IIQ", 9, 5, 2**40) + b"\0" * 64],
    ),
    "gguf-array-of-2**40-strings": _raw(
        "strings",
        "1099511627776 strings in the array tokenizer.ggml.tokens",
        kvs=[*LLAMA_KVS, _gstr("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2**40) + _gstr("a")],
    ),
    "gguf-2**60-metadata-entries": _raw("nkv", "claims 1152921504606846976 metadata entries", n_kv=2**60),
    "gguf-2**60-tensors": _raw("ntensors", "claims 1152921504606846976 tensors", n_tensors=2**60),
    # HF folders
    "hf-num-attention-heads-zero": _hf(
        "heads0", "num_attention_heads is 0, must be at least 1", {"num_attention_heads": 0}
    ),
    "hf-config-is-an-array": _hf("array", "holds a JSON array, expected an object", config_bytes=b"[]"),
    "hf-config-invalid-utf8": _hf("utf8", "not valid UTF-8", config_bytes=b'{"model_type": "llama\xff\xfe"}'),
    "hf-config-invalid-json": _hf("json", "not valid JSON", config_bytes=b'{"model_type": "llama",'),
    "hf-config-nested-too-deep": _hf(
        "deep", "not readable JSON (nested too deeply)", config_bytes=b"[" * 200_000
    ),
    "hf-config-integer-of-5000-digits": _hf(
        "digits", "not readable JSON (Exceeds the limit", config_bytes=b'{"vocab_size": ' + b"9" * 5000 + b"}"
    ),
    "hf-num-hidden-layers-1e9": _hf(
        "layers1e9", "num_hidden_layers is 1000000000.0, not an integer", config_bytes=_LAYERS_1E9
    ),
    "hf-num-hidden-layers-above-the-tensors": _hf(
        "layers",
        "num_hidden_layers is 1000000000 but model.safetensors holds tensors of 1 layer (numbered up to 0)",
        {"num_hidden_layers": 10**9},
    ),
    "hf-num-hidden-layers-a-string": _hf(
        "layerss", "num_hidden_layers is '1', not an integer", {"num_hidden_layers": "1"}
    ),
    "hf-num-key-value-heads-a-bool": _hf(
        "kvbool", "num_key_value_heads is True, not an integer", {"num_key_value_heads": True}
    ),
    "hf-kv-heads-do-not-divide": _hf(
        "kv3",
        "num_attention_heads 4 is not a multiple of num_key_value_heads 3",
        {"num_attention_heads": 4, "num_key_value_heads": 3},
    ),
    "hf-hidden-size-not-a-multiple-of-heads": _hf(
        "hidden",
        "hidden_size 10 is not a multiple of num_attention_heads 4",
        {"hidden_size": 10, "num_attention_heads": 4, "num_key_value_heads": 4},
    ),
    "hf-hidden-size-2**40": _hf(
        "hidden40", "hidden_size is 1099511627776, more than", {"hidden_size": 2**40}
    ),
    "hf-vocab-size-not-the-embedding": _hf(
        "vocab",
        "vocab_size is 40 but tensor model.embed_tokens.weight in model.safetensors has 16 rows",
        {"vocab_size": 40},
    ),
    "hf-huge-model-type": _hf(
        "arch", ("architecture 'xxxxxxxxxx", "characters)"), {"model_type": "x" * 1_000_000}
    ),
    "hf-llama3-rope-without-its-original-length": _hf(
        "rope",
        "rope_scaling.original_max_position_embeddings is missing",
        {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
    ),
    "hf-generation-config-invalid-utf8": _hf(
        "gen",
        "not valid UTF-8",
        source="generation_config.json",
        extra_files={"generation_config.json": b'{"eos_token_id": "\xff"}'},
    ),
    "hf-tokenizer-config-invalid-json": _hf(
        "tokcfg",
        "not valid JSON",
        source="tokenizer_config.json",
        extra_files={"tokenizer_config.json": b'{"eos_token": '},
    ),
}
