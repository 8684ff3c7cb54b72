"""Write a random-weight EXL2 Llama folder of a given shape, for speed measurements and for
cross-checks against exllamav2 where no real EXL2 weights of that shape are at hand.

    uv run python tools/bench/make_random_exl2.py OUT_DIR --shape llama3-8b [--head-bits 6]
    uv run python tools/bench/make_random_exl2.py OUT_DIR --layers 2 --hidden 256 --ffn 512 \
        --heads 4 --kv-heads 2 --vocab 1024

Shapes as tools/bench/make_random_gguf.py (``llama3-8b``, ``smollm2-135m``). Every decoder linear
mixes bit widths along its inputs the way exllamav2's converter does around 4.0 bpw: of its
groups (128 inputs, or 64 or 32 where the inputs are not a multiple of 128) about 10% hold 5
bits, 80% 4 bits and 10% 3 bits, stored widest first behind a random input permutation, with
scales put on EXL2's grid by ``exl2_scale_grid``. The integers are random about EXL2's zero and the scales
give each weight a standard deviation near ``1 / sqrt(fan_in)``, so activations stay at unit
size: a benchmark of speed, not of text. The embedding is fp16; the LM head is 6-bit groups of
128 (exllamav2's default ``head_bits``) or fp16 (``--head-bits 16``). The tokenizer.json is
byte-level BPE over the synthetic vocabulary of make_random_gguf.py (256 byte tokens, then
``<tok N>`` fillers, no merges; BOS and EOS the last two ids), so ``tessera.engine.LLM(folder)``
loads the folder and benchmarks feed token ids. Prints the folder's stored bits per weight.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch
from make_random_gguf import SHAPES, synthetic_vocab  # run as a script from this folder

from tessera.formats import GroupQuant, exl2_scale_grid, write_exl2_folder

SHARES = {5: 0.1, 4: 0.8, 3: 0.1}  # bit width -> share of a matrix's groups
HEAD_GROUP = 128
FIELDS = ("layers", "hidden", "ffn", "heads", "kv_heads", "vocab")


def group_size(n_in: int) -> int:
    """The largest of 128, 64, 32 that divides ``n_in`` (the writer needs multiples of 32)."""
    size = next((s for s in (128, 64, 32) if n_in % s == 0), None)
    if size is None:
        raise SystemExit(f"EXL2 needs each matrix's inputs to be a multiple of 32, got {n_in}")
    return size


def layout(n_in: int, shares: dict[int, float]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(group_starts, group_bits)``: ``n_in`` inputs cut into equal groups, the widths in
    ``shares`` rounded to whole groups (the largest width takes what rounding leaves), widest
    first as exllamav2's kernels read them."""
    size = group_size(n_in)
    groups = n_in // size
    counts = {b: round(share * groups) for b, share in shares.items()}
    widest = max(counts, key=lambda b: shares[b])
    counts[widest] = groups - sum(n for b, n in counts.items() if b != widest)
    bits = tuple(b for b in sorted(counts, reverse=True) for _ in range(counts[b]))
    return tuple(range(0, n_in + 1, size)), bits


def random_groups(gen: torch.Generator, n_out: int, n_in: int, shares: dict[int, float]) -> GroupQuant:
    """A random ``[n_out, n_in]`` EXL2 matrix as a GroupQuant (see the module docstring)."""
    starts, bits = layout(n_in, shares)
    size = starts[1]
    col_bits = torch.tensor(bits).repeat_interleave(size)
    # uniform bytes masked to each group's width: uniform integers of that width (bytes drawn
    # eight at a time as int64: a third of the time of drawing them one by one)
    words = torch.randint(-(2**63), 2**63 - 1, (n_out * n_in // 8,), dtype=torch.int64, generator=gen)
    q = words.view(torch.uint8).reshape(n_out, n_in)
    q &= ((1 << col_bits) - 1).to(torch.uint8)
    # EXL2's zero is 2^(b-1): 0..2^b-1 would average half a step below it, a bias common to every
    # row that builds up through the layers until the residual stream is one constant vector with
    # two stable signs, and logits then compare as all-or-nothing (an exllamav2 run far from ours
    # that said nothing of where). Zeros moved to 2^(b-1) give mean 0: 1..2^b-1 and the zero twice
    q = torch.where(q == 0, (1 << (col_bits - 1)).to(torch.uint8), q)
    mid = torch.tensor([2.0 ** (b - 1) for b in bits])
    spread = torch.sqrt((mid - 1) * (2 * mid - 1) / 6)  # std of those integers about 2^(b-1)
    jitter = 0.5 + 0.5 * torch.rand(n_out, len(bits), generator=gen)  # levels below 16 too
    _, _, scale = exl2_scale_grid(jitter / (spread * math.sqrt(n_in)))
    perm = torch.randperm(n_in, generator=gen)
    return GroupQuant((n_out, n_in), q, scale, mid.expand(n_out, -1).contiguous(), starts, bits, perm)


def hf_config(layers, hidden, ffn, heads, kv_heads, vocab, rope_theta) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": rope_theta,
        "tie_word_embeddings": False,
        "bos_token_id": vocab - 2,
        "eos_token_id": vocab - 1,
        "torch_dtype": "float16",
    }


def tokenizer_files(vocab: int, folder: Path) -> dict[str, Path]:
    """tokenizer.json (byte-level BPE over ``synthetic_vocab``) and tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokens = synthetic_vocab(vocab)
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": tokens[vocab - 2], "eos_token": tokens[vocab - 1], "model_max_length": 8192}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return {name: folder / name for name in ("tokenizer.json", "tokenizer_config.json")}


def write(
    out: str | Path,
    *,
    layers,
    hidden,
    ffn,
    heads,
    kv_heads,
    vocab,
    rope_theta=10000.0,
    head_bits=6,
    seed=0,
) -> Path:
    """The EXL2 folder at ``out`` (which must not exist or be empty)."""
    if head_bits not in (6, 16):
        raise SystemExit(f"--head-bits is 6 (EXL2 groups) or 16 (fp16), got {head_bits}")
    if head_bits == 6 and vocab % 32:
        raise SystemExit(f"a 6-bit LM head needs a vocabulary that is a multiple of 32, got {vocab}")
    gen = torch.Generator().manual_seed(seed)
    head_dim = hidden // heads
    kv = kv_heads * head_dim
    tensors: dict[str, torch.Tensor | GroupQuant] = {
        "model.embed_tokens.weight": torch.randn(vocab, hidden, generator=gen, dtype=torch.float16),
        "model.norm.weight": torch.ones(hidden, dtype=torch.float16),
    }
    if head_bits == 6:
        tensors["lm_head.weight"] = random_groups(gen, vocab, hidden, {6: 1.0})
    else:
        head = torch.randn(vocab, hidden, generator=gen, dtype=torch.float16)
        tensors["lm_head.weight"] = head / math.sqrt(hidden)
    for i in range(layers):
        p = f"model.layers.{i}"
        for name, n_out, n_in in (
            ("self_attn.q_proj", hidden, hidden),
            ("self_attn.k_proj", kv, hidden),
            ("self_attn.v_proj", kv, hidden),
            ("self_attn.o_proj", hidden, hidden),
            ("mlp.gate_proj", ffn, hidden),
            ("mlp.up_proj", ffn, hidden),
            ("mlp.down_proj", hidden, ffn),
        ):
            tensors[f"{p}.{name}.weight"] = random_groups(gen, n_out, n_in, SHARES)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"{p}.{norm}.weight"] = torch.ones(hidden, dtype=torch.float16)
    config = hf_config(layers, hidden, ffn, heads, kv_heads, vocab, rope_theta)
    signature = {
        "quant_method": "exl2",
        "version": "0.3.2",
        "bits": 4.0,
        "calibration": {"rows": 0, "length": 0, "dataset": "(none: random weights)"},
    }
    if head_bits == 6:
        signature["head_bits"] = 6
    with tempfile.TemporaryDirectory() as tmp:
        return write_exl2_folder(out, config, tensors, signature, None, tokenizer_files(vocab, Path(tmp)))


def stored_bits(folder: str | Path) -> dict:
    """Bits per weight of the folder's EXL2 linears as stored (every ``q_*`` part's bytes over
    the weights: scales and permutation included), for the decoder layers and the LM head,
    read from the safetensors header alone."""
    from safetensors import safe_open

    sizes = {torch.int32: 4, torch.int16: 2, torch.float16: 2}
    dtypes = {"I32": torch.int32, "I16": torch.int16, "F16": torch.float16}
    linears: dict[str, dict] = {}
    with safe_open(str(Path(folder) / "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            prefix, _, part = name.rpartition(".")
            if not part.startswith("q_"):
                continue
            sl = f.get_slice(name)
            shape, dtype = sl.get_shape(), dtypes[sl.get_dtype()]
            entry = linears.setdefault(prefix, {"bytes": 0})
            entry["bytes"] += math.prod(shape) * sizes[dtype]
            if part == "q_weight":
                entry["out"] = shape[1]
            elif part == "q_invperm":
                entry["in"] = shape[0]
    out = {}
    for key, names in (("decoder_bpw", [p for p in linears if ".layers." in p]), ("head_bpw", ["lm_head"])):
        names = [n for n in names if n in linears]
        weights = sum(linears[n]["out"] * linears[n]["in"] for n in names)
        out[key] = 8 * sum(linears[n]["bytes"] for n in names) / weights if weights else None
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None)
    for name in FIELDS:
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
    p.add_argument("--head-bits", type=int, choices=[6, 16], default=6, help="6: EXL2 groups, 16: fp16")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    shape = dict(SHAPES[a.shape]) if a.shape else {}
    for name in FIELDS:
        if getattr(a, name) is not None:
            shape[name] = getattr(a, name)
    missing = [n for n in FIELDS if n not in shape]
    if missing:
        p.error(f"give --shape or all of: {', '.join('--' + m.replace('_', '-') for m in missing)}")
    t = time.perf_counter()
    path = write(a.out, head_bits=a.head_bits, seed=a.seed, **shape)
    seconds = time.perf_counter() - t
    size = sum(f.stat().st_size for f in path.iterdir()) / 2**20
    bits = stored_bits(path)
    print(f"wrote {path} ({size:.0f} MiB) in {seconds:.1f} s on {torch.get_num_threads()} threads")
    print(json.dumps({k: round(v, 4) if v else v for k, v in bits.items()}))


if __name__ == "__main__":
    main()
