"""What one drafted token costs a draft model, as stored and made lean: its per-token forward
(one token at position 200, through the engine's DraftRunner) and its LM head alone, with the
bytes of weights each streams per token.

    uv run python tools/bench/draft_cost.py [--draft qwen2.5-coder-0.5b-instruct] [--vocab 32768]
        [--quantization q4_0] [--repeats 21]

Variants, loaded in this one process and timed round-robin (the median of ``--repeats``): the
draft as stored; its head cut to ``--vocab`` tokens (``draft_vocab_size``); re-quantized
(``quantization``); both ("lean"). bf16 activations, as the engine runs on this CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import machine


def weight_bytes(model) -> tuple[int, int]:
    """Bytes of the layers' linear weights and of the LM head (what a decode step streams)."""

    def nbytes(w) -> int:
        if isinstance(w, torch.Tensor):
            return w.numel() * w.element_size()
        if hasattr(w, "nbytes"):
            return int(w.nbytes)
        return sum(nbytes(p) for p in getattr(w, "parts", ()))

    layers = 0
    for layer in model.layers:
        for mod in (*vars(layer.self_attn).values(), *vars(layer.mlp).values()):
            if hasattr(mod, "weight") and mod.weight is not None:
                layers += nbytes(mod.weight)
    return layers, nbytes(model.lm_head.weight)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--draft", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--quantization", default="q4_0")
    p.add_argument("--repeats", type=int, default=21)
    args = p.parse_args()

    from tessera.engine import resolve_model
    from tessera.engine.draft_runner import DraftRunner, draft_load_options
    from tessera.formats import open_checkpoint
    from tessera.models import load_model
    from tessera.spec_decode import SpeculativeConfig

    ck = open_checkpoint(resolve_model(args.draft))
    variants = {
        "as stored": {},
        f"head {args.vocab}": {"draft_vocab_size": args.vocab},
        args.quantization: {"quantization": args.quantization},
        "lean (both)": {"draft_vocab_size": args.vocab, "quantization": args.quantization},
    }
    runners, load_s = {}, {}
    for name, extra in variants.items():
        spec = SpeculativeConfig(method="draft_model", model=args.draft, num_speculative_tokens=4, **extra)
        t0 = time.perf_counter()
        model = load_model(ck, torch.bfloat16, "cpu", packed_weights=True, **draft_load_options(spec, ck))
        load_s[name] = time.perf_counter() - t0
        runners[name] = DraftRunner(model, 64, 16, torch.bfloat16)
    table = list(range(32))
    for r in runners.values():  # a 200-token context in each one's K/V
        r.logits(list(range(1000, 1200)), [200], [200], [table])
    fwd = {n: [] for n in runners}
    head = {n: [] for n in runners}
    h = torch.randn(1, ck.config.hidden_size, dtype=torch.bfloat16)
    for _ in range(args.repeats):
        for n, r in runners.items():
            t0 = time.perf_counter()
            r.logits([5], [1], [201], [table]).argmax(-1).tolist()
            fwd[n].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            r.model.compute_logits(h).argmax(-1).tolist()
            head[n].append(time.perf_counter() - t0)
    print(f"# {machine()}; draft {args.draft}, median of {args.repeats}")
    cols = f"{'layers MB':>9s} {'head MB':>8s} {'forward ms':>10s} {'head ms':>8s} {'load s':>7s}"
    print(f"{'variant':14s} {cols}")
    for n, r in runners.items():
        layers, head_b = weight_bytes(r.model)
        print(
            f"{n:14s} {layers / 1e6:9.1f} {head_b / 1e6:8.1f} {statistics.median(fwd[n]) * 1e3:10.2f} "
            f"{statistics.median(head[n]) * 1e3:8.2f} {load_s[n]:7.1f}"
        )


if __name__ == "__main__":
    main()
