"""Write a random-weight Mixtral-layout GGUF big enough that decode is memory-bound, for
benchmarking tessera's fused MoE against llama.cpp on the same file.

    uv run python tools/bench/make_moe_gguf.py /tmp/moe-q4_0.gguf \
        [--layers 16] [--hidden 1024] [--ffn 2816] [--experts 8] [--top-k 2]

Layout: general.architecture "llama" with expert_count (as llama.cpp writes Mixtral), attention
and experts in Q4_0, embedding and output in Q8_0, the default model's tokenizer (SmolLM2's
49,152-token BPE) so that both engines load it. Weights are random quantized blocks (random
nibbles/bytes under a scale chosen so activations keep unit size), written straight as GGUF
blocks: a benchmark of speed, not of text.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import gguf
import numpy as np
from make_random_gguf import q4_0, q8_0  # noqa: E402 (run as a script from this folder)
from tqdm import tqdm

Q = gguf.GGMLQuantizationType


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=2816)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    rng = np.random.default_rng(a.seed)
    from tessera.engine import resolve_model

    src = gguf.GGUFReader(resolve_model("smollm2-135m-instruct"))
    tokens = [
        bytes(src.fields["tokenizer.ggml.tokens"].parts[i]).decode()
        for i in src.fields["tokenizer.ggml.tokens"].data
    ]
    types = [
        int(src.fields["tokenizer.ggml.token_type"].parts[i][0])
        for i in src.fields["tokenizer.ggml.token_type"].data
    ]
    merges = [
        bytes(src.fields["tokenizer.ggml.merges"].parts[i]).decode()
        for i in src.fields["tokenizer.ggml.merges"].data
    ]
    vocab, h, ff, e = len(tokens), a.hidden, a.ffn, a.experts
    head_dim = h // a.heads

    w = gguf.GGUFWriter(a.out, "llama")
    w.add_name("random MoE benchmark model")
    w.add_context_length(4096)
    w.add_embedding_length(h)
    w.add_block_count(a.layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(a.heads)
    w.add_head_count_kv(a.kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_expert_count(e)
    w.add_expert_used_count(a.top_k)
    w.add_vocab_size(vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    ones = np.ones(h, dtype=np.float32)
    w.add_tensor("token_embd.weight", q8_0(rng, vocab, h, 1.0), raw_dtype=Q.Q8_0)
    w.add_tensor("output_norm.weight", ones)
    w.add_tensor("output.weight", q8_0(rng, vocab, h, 1.0 / np.sqrt(h)), raw_dtype=Q.Q8_0)
    for i in tqdm(range(a.layers), desc="layers", disable=None):
        b = f"blk.{i}"
        w.add_tensor(f"{b}.attn_norm.weight", ones)
        w.add_tensor(f"{b}.attn_q.weight", q4_0(rng, h, h, fan_in=h), raw_dtype=Q.Q4_0)
        w.add_tensor(f"{b}.attn_k.weight", q4_0(rng, a.kv_heads * head_dim, h, fan_in=h), raw_dtype=Q.Q4_0)
        w.add_tensor(f"{b}.attn_v.weight", q4_0(rng, a.kv_heads * head_dim, h, fan_in=h), raw_dtype=Q.Q4_0)
        w.add_tensor(f"{b}.attn_output.weight", q4_0(rng, h, h, fan_in=h), raw_dtype=Q.Q4_0)
        w.add_tensor(f"{b}.ffn_norm.weight", ones)
        router = (rng.standard_normal((e, h)) / np.sqrt(h)).astype(np.float32)
        w.add_tensor(f"{b}.ffn_gate_inp.weight", router)
        w.add_tensor(f"{b}.ffn_gate_exps.weight", q4_0(rng, e, ff, h, fan_in=h), raw_dtype=Q.Q4_0)
        w.add_tensor(f"{b}.ffn_up_exps.weight", q4_0(rng, e, ff, h, fan_in=h), raw_dtype=Q.Q4_0)
        w.add_tensor(f"{b}.ffn_down_exps.weight", q4_0(rng, e, h, ff, fan_in=ff), raw_dtype=Q.Q4_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=True)
    w.close()
    print(f"wrote {a.out} ({Path(a.out).stat().st_size / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
