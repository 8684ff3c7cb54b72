"""Single-stream decode of the default model (Q4_1 GGUF) against the same model made into
GPTQ- and EXL2-like weights, which run as GGUF blocks behind an input permutation
(``InputSegments``), to see what the permutation and the mixed containers cost.

    flock /tmp/tessera-bench.lock uv run python tools/bench/grouped_speed.py [--reps 5] [--json]

Variants, built from each decoder linear's dequantized Q4_1 weight by round-to-nearest (min/max
scale and zero per output row and group; speed only, not a quantizer):
  q4_1   the GGUF file as it loads;
  gptq   4 bits, groups of 128, act-order: a random input permutation per layer input (q, k and
         v share one, as gate and up do), one Q4_1 segment behind it;
  exl2   groups of 32 in a random order, per matrix 10% at 6 bits, 20% at 5, 60% at 4 and 10%
         at 3 (about 4.3 bits per weight), stored widest first: Q8_0, Q5_1 and Q4_1 segments.
Each is loaded once; decode tok/s is ``tessera bench latency``'s measurement (greedy, 128 tokens
after a 16-token random prompt, tokens after the first over the time between first and last),
run for the variants in turn, ``--reps`` times, rotating who goes first; the median over runs,
and 1 / the median time between tokens over all runs (steadier where other processes share
the cores).
Bytes per token: the packed bytes (quants, scales, mins) of the decoder's linears and of the
LM head, plus the int32 permutations, that one decode step reads.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from itertools import pairwise

import torch

from tessera.engine import DEFAULT_MODEL, LLM
from tessera.engine.bench_offline import random_prompts
from tessera.formats import GroupQuant
from tessera.kernels import InputSegments, RowStack
from tessera.models.linear import prepare_stacked

VARIANTS = ("q4_1", "gptq", "exl2")
EXL2_MIX = ((6, 0.1), (5, 0.2), (3, 0.1))  # the rest at 4 bits; stored 6, 5, 4, 3


class _Groups:
    """A ``GroupQuant`` as a checkpoint tensor (what the GPTQ and EXL2 readers hand a model)."""

    def __init__(self, groups: GroupQuant) -> None:
        self.groups, self.shape = groups, groups.shape

    def as_groups(self) -> GroupQuant:
        return self.groups

    def to(self, device) -> _Groups:
        return _Groups(self.groups.to(device))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.groups.dequantize(dtype)


def round_to_groups(w: torch.Tensor, perm: torch.Tensor, starts: list[int], bits: list[int]) -> GroupQuant:
    """``w [out, in]`` with its columns stored in ``perm``'s order, rounded to nearest per
    (row, group) between the group's min and max."""
    stored = w[:, perm]
    q = torch.empty(w.shape, dtype=torch.uint8)
    scale, zero = torch.empty(w.shape[0], len(bits)), torch.empty(w.shape[0], len(bits))
    for i, (a, b) in enumerate(pairwise(starts)):
        top = 2 ** bits[i] - 1
        lo, hi = stored[:, a:b].amin(1).clamp(max=0), stored[:, a:b].amax(1).clamp(min=0)
        s = ((hi - lo) / top).clamp(min=1e-8)
        z = torch.round(-lo / s)
        q[:, a:b] = (torch.round(stored[:, a:b] / s[:, None]) + z[:, None]).clamp(0, top).to(torch.uint8)
        scale[:, i], zero[:, i] = s, z
    return GroupQuant(tuple(w.shape), q, scale, zero, tuple(starts), tuple(bits), perm)


def layout(variant: str, n_in: int) -> tuple[list[int], list[int]]:
    """Group boundaries and bit widths in stored order."""
    if variant == "gptq":
        starts = [*range(0, n_in, 128), n_in]
        return starts, [4] * (len(starts) - 1)
    groups = n_in // 32
    counts = {b: round(f * groups) for b, f in EXL2_MIX}
    counts[4] = groups - sum(counts.values())
    bits = [b for b in (6, 5, 4, 3) for _ in range(counts[b])]
    return [*range(0, n_in + 1, 32)], bits


def requantize(linear, variant: str, perm: torch.Tensor, opts) -> None:
    """Replace a linear layer's packed Q4_1 weight (its shards stacked by rows) with ``variant``
    groups of its dequantized values behind ``perm``, prepared as the loader prepares them."""
    dense = linear.weight.dequantize(torch.float32)
    starts, bits = layout(variant, dense.shape[1])
    shards = dense.split(list(linear.shards().values()))
    linear.weight = prepare_stacked([_Groups(round_to_groups(w, perm, starts, bits)) for w in shards], opts)


def make_variant(llm: LLM, variant: str, seed: int) -> None:
    model = llm.model
    g = torch.Generator().manual_seed(seed)
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for linear in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
            perm = torch.randperm(linear.in_features, generator=g)
            requantize(linear, variant, perm, model.opts)
    model.loaded()  # the layers' descriptions for the fused decoder


def _packed_bytes(w) -> int:
    if isinstance(w, RowStack):
        return sum(_packed_bytes(p) for p in w.parts)
    if isinstance(w, InputSegments):
        perm = 0 if w.perm is None else 4 * w.perm.numel()  # int32 in the C call
        return perm + sum(_packed_bytes(p) for _, _, p in w.parts)
    if isinstance(w, torch.Tensor):
        return w.numel() * w.element_size()
    return w.nbytes


def bytes_per_token(llm: LLM) -> dict:
    """What one decode step reads: the decoder's linears and the LM head (the embedding row and
    norms are a few KB). RowStack parts of q, k and v with one permutation share one int32
    copy of it, counted once per part here (576 inputs: 2.3 KB)."""
    model = llm.model
    layers = sum(_packed_bytes(w.weight) for s in model.layer_specs for w in (s.qkv, s.o, s.gate_up, s.down))
    head = _packed_bytes(model.lm_head.weight)
    return {"decoder_bytes": layers, "lm_head_bytes": head, "bytes_per_token": layers + head}


def decode_run(llm: LLM, output_tokens: int, seed: int) -> tuple[float, list[float]]:
    """``tessera bench latency``'s decode measurement: tok/s and the times between tokens."""
    from tessera.sampling import SamplingParams

    llm.reset_prefix_cache()
    (prompt,) = random_prompts(1, 16, llm.config.vocab_size, seed=1000 + seed)
    params = SamplingParams(temperature=0.0, max_tokens=output_tokens, ignore_eos=True)
    stamps = [time.perf_counter() for _ in llm.stream(prompt, params)]
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), [b - a for a, b in pairwise(stamps)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--output-tokens", type=int, default=128)
    p.add_argument("--json", action="store_true")
    ns = p.parse_args()
    fallbacks: list[str] = []

    class _Told(logging.Handler):
        def emit(self, record):
            fallbacks.append(record.getMessage())

    logging.getLogger("tessera.kernels_cpu.decoder").addHandler(_Told())
    logging.getLogger("tessera.kernels_cpu.decoder").setLevel(logging.INFO)
    llms = {}
    for i, v in enumerate(VARIANTS):
        llm = LLM(ns.model, max_model_len=256, kv_cache_memory=64 << 20)
        if v != "q4_1":
            make_variant(llm, v, seed=i)
        llms[v] = llm
    rates: dict[str, list[float]] = {v: [] for v in VARIANTS}
    gaps: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for v in VARIANTS:  # warm-up
        decode_run(llms[v], 8, seed=99)
    for r in range(ns.reps):
        for v in VARIANTS[r % 3 :] + VARIANTS[: r % 3]:
            rate, between = decode_run(llms[v], ns.output_tokens, seed=r)
            rates[v].append(rate)
            gaps[v] += between
    base = statistics.median(rates["q4_1"])
    base_gap = statistics.median(gaps["q4_1"])
    for v in VARIANTS:
        med, gap = statistics.median(rates[v]), statistics.median(gaps[v])
        row = {
            "variant": v,
            "decode_tok_s": med,
            "ratio_to_q4_1": med / base,
            "steady_tok_s": 1 / gap,
            "steady_ratio_to_q4_1": base_gap / gap,
            "runs": rates[v],
        } | bytes_per_token(llms[v])
        if ns.json:
            print(json.dumps(row))
        else:
            runs = " ".join(f"{x:.1f}" for x in row["runs"])
            print(
                f"{v:5s} decode {med:6.1f} tok/s (x{row['ratio_to_q4_1']:.3f}; runs {runs}), steady "
                f"{row['steady_tok_s']:6.1f} (x{row['steady_ratio_to_q4_1']:.3f}); "
                f"{row['bytes_per_token'] / 1e6:.2f} MB/token (decoder {row['decoder_bytes'] / 1e6:.2f}, "
                f"LM head {row['lm_head_bytes'] / 1e6:.2f})"
            )
    for msg in sorted(set(fallbacks)):
        print("fallback:", msg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
