"""Write a random-weight Llama-layout GGUF of a given shape, for speed measurements where no real
weights of that shape exist (a GPU run shaped like Llama-3-8B, say).

    uv run python tools/bench/make_random_gguf.py OUT.gguf --shape llama3-8b [--scheme Q4_K]
    uv run python tools/bench/make_random_gguf.py OUT.gguf --layers 4 --hidden 256 --ffn 512 \
        --heads 4 --kv-heads 2 --vocab 1000

Shapes: ``llama3-8b`` (32 layers, 4,096 hidden, 14,336 FFN, 32/8 heads, 128,256 tokens) and
``smollm2-135m`` (30 layers, 576 hidden, 1,536 FFN, 9/3 heads, 49,152 tokens); any field can be
overridden. Matrices in ``--scheme`` (Q4_0 or Q4_K), embedding and output in Q8_0 (untied). The
tokenizer is synthetic (GPT-2 style: the 256 byte tokens, then ``<tok N>`` up to the vocabulary
size, no merges), so the file needs nothing else: benchmarks feed token ids. Weights are random
quantized blocks under scales that keep activations at unit size: a benchmark of speed, not of
text. Blocks are written straight as GGUF bytes, so a multi-GB file takes seconds.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import gguf
import numpy as np
from tqdm import tqdm

Q = gguf.GGMLQuantizationType

SHAPES = {
    "llama3-8b": dict(
        layers=32, hidden=4096, ffn=14336, heads=32, kv_heads=8, vocab=128256, rope_theta=500000.0
    ),
    "smollm2-135m": dict(
        layers=30, hidden=576, ffn=1536, heads=9, kv_heads=3, vocab=49152, rope_theta=100000.0
    ),
}


def q4_0(rng, *shape: int, fan_in: int) -> np.ndarray:
    """Random Q4_0 blocks of a ``[..., rows, k]`` tensor: weights d * (q - 8), q uniform in
    0..15 (std 4.6 d), |d| chosen for a std of 1 / sqrt(fan_in). q - 8 averages -0.5: each
    block's d takes a random sign, so that the weights average 0 (a bias shared by every weight
    would push the residual stream of a deep model onto one direction)."""
    *rows, k = shape
    n = int(np.prod(rows)) * (k // 32)
    sign = rng.choice(np.array([-1.0, 1.0]), (n, 1))
    d = (sign / (4.6 * np.sqrt(fan_in))).astype(np.float16).view(np.uint8)
    qs = rng.integers(0, 256, (n, 16), dtype=np.uint8)
    return np.concatenate([d, qs], axis=1).reshape(*rows, k // 32 * 18)


def q4_k(rng, *shape: int) -> np.ndarray:
    """Random Q4_K super-blocks of a ``[..., rows, k]`` tensor (d, dmin, 12 bytes of 6-bit scales
    and mins, 128 bytes of nibbles): weight d * sc * q - dmin * m with sc, m uniform in 0..63 and
    q in 0..15, so dmin = 7.5 d centres them (std about 145 d)."""
    *rows, k = shape
    n = int(np.prod(rows)) * (k // 256)
    d = 1.0 / (145.0 * np.sqrt(k))
    head = np.tile(np.array([d, 7.5 * d], dtype=np.float16).view(np.uint8), (n, 1))
    rest = rng.integers(0, 256, (n, 140), dtype=np.uint8)
    return np.concatenate([head, rest], axis=1).reshape(*rows, k // 256 * 144)


def q8_0(rng, rows: int, k: int, std: float) -> np.ndarray:
    n = rows * (k // 32)
    d = np.full((n, 1), std / 73.0, dtype=np.float16).view(np.uint8)  # std of U(-127, 127) ~ 73
    qs = rng.integers(-127, 128, (n, 32), dtype=np.int8).view(np.uint8)
    return np.concatenate([d, qs], axis=1).reshape(rows, k // 32 * 34)


def synthetic_vocab(size: int) -> list[str]:
    """GPT-2's byte tokens (as its byte-to-unicode table spells them), then filler tokens."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)}
    printable |= set(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    vocab = [chars[b] for b in range(256)]
    return vocab + [f"<tok {i}>" for i in range(size - len(vocab))]


def write(
    out: str,
    *,
    layers,
    hidden,
    ffn,
    heads,
    kv_heads,
    vocab,
    rope_theta=10000.0,
    scheme="Q4_K",
    seed=0,
    experts=0,
    top_k=0,
) -> Path:
    """The GGUF at ``out``; with ``experts`` > 0, Mixtral's layout as llama.cpp writes it (a
    router and ``ffn_*_exps`` stacks, ``top_k`` of them per token)."""
    rng = np.random.default_rng(seed)
    block = 256 if scheme == "Q4_K" else 32
    for name, n in (("hidden", hidden), ("ffn", ffn)):
        if n % block:
            raise SystemExit(f"{scheme} needs {name} to be a multiple of {block}, got {n}")

    def matrix(*shape: int):
        if scheme == "Q4_K":
            return q4_k(rng, *shape), Q.Q4_K
        return q4_0(rng, *shape, fan_in=shape[-1]), Q.Q4_0

    head_dim = hidden // heads
    w = gguf.GGUFWriter(out, "llama")
    w.add_name(f"random {layers}-layer benchmark model")
    w.add_context_length(8192)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(rope_theta)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    if experts:
        w.add_expert_count(experts)
        w.add_expert_used_count(top_k)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M if scheme == "Q4_K" else gguf.LlamaFileType.MOSTLY_Q4_0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    tokens = synthetic_vocab(vocab)
    w.add_token_list(tokens)
    w.add_token_types([1] * len(tokens))
    w.add_token_merges([])
    w.add_bos_token_id(vocab - 2)
    w.add_eos_token_id(vocab - 1)
    ones = np.ones(hidden, dtype=np.float32)
    w.add_tensor("token_embd.weight", q8_0(rng, vocab, hidden, 1.0), raw_dtype=Q.Q8_0)
    w.add_tensor("output_norm.weight", ones)
    w.add_tensor("output.weight", q8_0(rng, vocab, hidden, 1.0 / np.sqrt(hidden)), raw_dtype=Q.Q8_0)
    for i in tqdm(range(layers), desc="layers", disable=None):
        b = f"blk.{i}"
        w.add_tensor(f"{b}.attn_norm.weight", ones)
        for name, rows, k in (
            ("attn_q", hidden, hidden),
            ("attn_k", kv_heads * head_dim, hidden),
            ("attn_v", kv_heads * head_dim, hidden),
            ("attn_output", hidden, hidden),
        ):
            data, qtype = matrix(rows, k)
            w.add_tensor(f"{b}.{name}.weight", data, raw_dtype=qtype)
        stack = (experts,) if experts else ()
        if experts:
            router = (rng.standard_normal((experts, hidden)) / np.sqrt(hidden)).astype(np.float32)
            w.add_tensor(f"{b}.ffn_gate_inp.weight", router)
        suffix = "_exps" if experts else ""
        for name, rows, k in (("ffn_gate", ffn, hidden), ("ffn_up", ffn, hidden), ("ffn_down", hidden, ffn)):
            data, qtype = matrix(*stack, rows, k)
            w.add_tensor(f"{b}.{name}{suffix}.weight", data, raw_dtype=qtype)
        w.add_tensor(f"{b}.ffn_norm.weight", ones)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=True)
    w.close()
    return Path(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None)
    for name in ("layers", "hidden", "ffn", "heads", "kv_heads", "vocab"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
    p.add_argument("--scheme", choices=["Q4_K", "Q4_0"], default="Q4_K")
    p.add_argument("--experts", type=int, default=0, help="experts per MoE layer (0: dense)")
    p.add_argument("--top-k", type=int, default=2, help="experts per token (with --experts)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    shape = dict(SHAPES[a.shape]) if a.shape else {}
    for name in ("layers", "hidden", "ffn", "heads", "kv_heads", "vocab"):
        if getattr(a, name) is not None:
            shape[name] = getattr(a, name)
    missing = [n for n in ("layers", "hidden", "ffn", "heads", "kv_heads", "vocab") if n not in shape]
    if missing:
        p.error(f"give --shape or all of: {', '.join('--' + m.replace('_', '-') for m in missing)}")
    moe = {"experts": a.experts, "top_k": a.top_k} if a.experts else {}
    path = write(a.out, scheme=a.scheme, seed=a.seed, **shape, **moe)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
