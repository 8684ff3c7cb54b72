"""Read bandwidth of this machine's memory, as the ceiling for memory-bound decode.

    uv run python tools/bench/membw.py [--mb 512] [--runs 10] [--model F.gguf --context 576]

Sums a buffer far larger than the last-level cache with torch on all its threads (a plain
streaming read) and prints the median and best GB/s. Single-stream decode of a memory-bound
model reads every active weight once per token, so tokens/s cannot exceed this over the bytes
per token. With ``--model``, also the bytes one decode token reads from that GGUF (every tensor
but the embedding, the active share of the expert tensors, and the KV cache at ``--context``
tokens in bf16) and the tokens/s ceiling they give at the measured median.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def decode_bytes(path: str, context: int) -> float:
    """Bytes of weights and KV one single-stream decode token reads."""
    import gguf

    r = gguf.GGUFReader(path)
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()

    def field(name: str, default=None):
        f = r.fields.get(f"{arch}.{name}")
        return default if f is None else int(f.parts[-1][0])

    experts, used = field("expert_count", 0), field("expert_used_count", 0)
    total = 0.0
    for t in r.tensors:
        if t.name == "token_embd.weight":
            continue  # one row per token
        share = used / experts if experts and "_exps" in t.name else 1.0
        total += int(t.n_bytes) * share
    layers, kv_heads = field("block_count"), field("attention.head_count_kv")
    head_dim = field("embedding_length") // field("attention.head_count")
    return total + layers * context * 2 * kv_heads * head_dim * 2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=int, default=512)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--model", help="a GGUF file: print its bytes per decode token and the ceiling")
    p.add_argument("--context", type=int, default=576, help="tokens in the KV cache (default: 512 + 64)")
    a = p.parse_args()
    x = torch.ones(a.mb * (1 << 20) // 4, dtype=torch.float32)
    x.sum()  # pages touched, threads up
    rates = []
    for _ in range(a.runs):
        t = time.perf_counter()
        x.sum()
        rates.append(x.numel() * 4 / (time.perf_counter() - t) / 1e9)
    out = {"threads": torch.get_num_threads(), "mb": a.mb, "median_gb_s": statistics.median(rates)}
    out["best_gb_s"] = max(rates)
    if a.model:
        per_token = decode_bytes(a.model, a.context)
        out["decode_mb_per_token"] = per_token / 1e6
        out["ceiling_tok_s"] = out["median_gb_s"] * 1e9 / per_token
    print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in out.items()}))


if __name__ == "__main__":
    main()
