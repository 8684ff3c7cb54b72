"""Perplexity of a model on a text, in windows, for several compute dtypes, KV-cache storage
dtypes and ways of holding quantized weights (packed for the CPU kernels, or dequantized).

Every prediction in each window is scored (511 per window of 512). On the first 2,048 tokens of
the GPL-3 text (Debian's /usr/share/common-licenses/GPL-3) llama.cpp measures 23.79 and
transformers (fp32) 23.74 for the default model in the same way.

    uv run python tools/eval/perplexity.py [--file F] [--tokens 2048] [--window 512]
        [--kv-cache-dtype auto int8 fp8] [--dtype float32] [--quantized-weights dequantize packed]
        [--json]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from tqdm import tqdm

from tessera.engine import resolve_model
from tessera.engine.llm import kv_storage_dtype
from tessera.formats import open_checkpoint
from tessera.models import load_model
from tessera.models.harness import forward_chunks

GPL3 = Path("/usr/share/common-licenses/GPL-3")


def perplexity(model, tokens: list[int], window: int, kv_dtype: torch.dtype, desc: str) -> float:
    nll, count = 0.0, 0
    windows = [tokens[i : i + window] for i in range(0, len(tokens) - window + 1, window)]
    for w in tqdm(windows, desc=desc, leave=False, disable=None):
        (logits,) = forward_chunks(model, [[w]], block_size=16, kv_dtype=kv_dtype)
        logp = torch.log_softmax(logits[:-1].double(), dim=-1)
        nll -= logp.gather(1, torch.tensor(w[1:])[:, None]).sum().item()
        count += len(w) - 1
    return math.exp(nll / count)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--file", type=Path, default=GPL3)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--dtype", nargs="+", default=["float32"])
    p.add_argument("--kv-cache-dtype", nargs="+", default=["auto", "int8", "fp8"])
    p.add_argument("--quantized-weights", nargs="+", default=["dequantize"], choices=["dequantize", "packed"])
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if not args.file.is_file():
        raise SystemExit(f"perplexity: {args.file}: no such file")
    ck = open_checkpoint(resolve_model(args.model))
    tokens = ck.tokenizer().encode(args.file.read_text(encoding="utf-8"), add_special_tokens=False)[
        : args.tokens
    ]
    rows = []
    for weights in args.quantized_weights:
        for dtype_name in args.dtype:
            dtype = getattr(torch, dtype_name)
            model = load_model(ck, dtype=dtype, packed_weights=weights == "packed")
            for kv in args.kv_cache_dtype:
                ppl = perplexity(
                    model,
                    tokens,
                    args.window,
                    kv_storage_dtype(kv, dtype),
                    f"{weights} / {dtype_name} / KV {kv}",
                )
                rows.append(
                    {
                        "quantized_weights": weights,
                        "dtype": dtype_name,
                        "kv_cache_dtype": kv,
                        "perplexity": ppl,
                        "tokens": len(tokens),
                        "window": args.window,
                        "file": str(args.file),
                    }
                )
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return
    base = {
        (r["quantized_weights"], r["dtype"]): r["perplexity"] for r in rows if r["kv_cache_dtype"] == "auto"
    }
    print(f"{'weights':11} {'dtype':10} {'KV cache':9} {'perplexity':>11} {'vs auto':>8}")
    for r in rows:
        key = (r["quantized_weights"], r["dtype"])
        rel = r["perplexity"] / base[key] - 1 if key in base else float("nan")
        print(
            f"{r['quantized_weights']:11} {r['dtype']:10} {r['kv_cache_dtype']:9} "
            f"{r['perplexity']:11.3f} {rel:+8.2%}"
        )


if __name__ == "__main__":
    main()
