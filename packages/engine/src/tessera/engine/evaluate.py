"""``tessera eval MODEL [MODEL ...]``: what quantization costs in quality, measured on held-out text.

Every model (a GGUF file, a known model name, an HF folder, GPTQ and AWQ ones included) must
share one tokenizer. The text is the evaluation half of ``tessera.formats.calibration``'s split
(never a document that calibrates a conversion): its documents' tokens, joined (no BOS), cut
into ``--tokens / --window`` windows, each run as one sequence with every prediction in it
scored (window - 1 per window). Per model:

- perplexity over those predictions;
- against the baseline (``--baseline``, else the model with the most bits per weight in its
  linear layers; the first such on a tie): the mean KL(baseline || model) of the next-token
  distributions and the share of positions whose most likely token is the same. The baseline
  runs first and keeps, per position, its top ``--kl-top-k`` log-probs and its tail mass (see
  ``eval_metrics``); nothing else is kept between models, and each model runs over the windows
  once, loaded alone;
- last-word accuracy on ``--last-word-items`` held-out paragraphs (see ``last_word``);
- bits per weight of its linear layers as stored (see ``weight_bits``), read in a first pass
  over every checkpoint's tensors, so that the baseline is known before any model runs.

Models compute in float32 unless ``--dtype`` says otherwise: the noise of bf16 arithmetic
(KL 0.005 between two copies of the same SmolLM2 weights) would hide what Q8_0 costs (0.0013).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tessera.formats import Checkpoint, FormatError, open_checkpoint
from tessera.formats.calibration import default_text, split_text, token_rows
from tessera.models import load_model
from tessera.models.harness import forward_chunks

from . import eval_report
from .eval_metrics import Tally, TopK, compress, log_probs
from .last_word import Item, batches, correct, encode_items, greedy, last_word_items
from .model_source import resolve_model
from .weight_bits import WeightBits, linear_bits

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelResult:
    model: str  # as given on the command line
    path: str
    bits_per_weight: float
    linear_weights: int
    perplexity: float
    kl_divergence: float
    top1_agreement: float
    last_word_correct: int
    last_word_items: int
    seconds: float

    @property
    def last_word_accuracy(self) -> float | None:
        return self.last_word_correct / self.last_word_items if self.last_word_items else None

    def as_json(self) -> dict:
        return asdict(self) | {"last_word_accuracy": self.last_word_accuracy}


@dataclass(frozen=True)
class Held:
    """What every model is scored on."""

    source: Path
    windows: list[list[int]]
    items: list[Item]


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("models", nargs="+", metavar="MODEL", help="GGUF files, HF folders or known model names")
    p.add_argument("--baseline", metavar="MODEL", help="the reference for KL and top-1 (default: most bits)")
    p.add_argument(
        "--text", type=Path, default=None, help="text to split (default: ../shared/data/wiki.utf8)"
    )
    p.add_argument("--tokens", type=int, default=8192, help="held-out tokens scored (default: %(default)s)")
    p.add_argument("--window", type=int, default=512, help="tokens per window (default: %(default)s)")
    p.add_argument(
        "--last-word-items",
        type=int,
        default=200,
        help="paragraphs to complete, 0: none (default: %(default)s)",
    )
    p.add_argument(
        "--kl-top-k",
        type=int,
        default=4096,
        help="baseline tokens kept per position; the KL over them and the rest as one outcome is a "
        "lower bound, about 1%% short at 4096 on a 49k vocabulary (default: %(default)s)",
    )
    p.add_argument("--out", type=Path, default=None, metavar="DIR", help="write eval.json and eval.png there")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: the platform's)")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["auto", *_DTYPES],
        help="compute dtype; auto: the engine's choice for the device. float32 by default because "
        "bf16 rounding alone gave two copies of SmolLM2's weights a KL of 0.005, more than Q8_0's "
        "own 0.0013 (default: %(default)s)",
    )
    p.add_argument(
        "--quantized-weights",
        default="packed",
        choices=["packed", "dequantize"],
        help="keep quantized weights packed (as the engine runs them) or dequantize at load",
    )


def run(ns: argparse.Namespace) -> int:
    _check_numbers(ns)
    names = list(dict.fromkeys(ns.models))
    if len(names) != len(ns.models):
        raise ValueError("a MODEL is given twice")
    if ns.baseline is not None and ns.baseline not in names:
        names.insert(0, ns.baseline)
    if ns.out is not None and ns.out.exists() and not ns.out.is_dir():
        raise ValueError(f"--out {ns.out}: exists and is not a folder")
    device, dtype = _device_and_dtype(ns.device, ns.dtype)
    checkpoints = {name: open_checkpoint(resolve_model(name)) for name in names}
    tokenizer = check_same_tokenizer(checkpoints)
    for name, ck in checkpoints.items():
        if ns.window > ck.config.max_position_embeddings:
            raise ValueError(
                f"--window {ns.window} is longer than {name}'s context ({ck.config.max_position_embeddings})"
            )
    held = held_out(ns.text or default_text(), tokenizer, ns.tokens, ns.window, ns.last_word_items)
    bits = {name: linear_bits(ck) for name, ck in _progress(checkpoints.items(), "reading weights")}
    baseline = ns.baseline or choose_baseline(bits)
    started = time.perf_counter()
    results: dict[str, ModelResult] = {}
    base_topk: list[TopK] | None = None
    base_tally = Tally()
    for name in [baseline, *(n for n in names if n != baseline)]:
        model = load_model(checkpoints[name], dtype, device, packed_weights=ns.quantized_weights == "packed")
        result, topk, tally = evaluate_model(
            name, checkpoints[name], model, held, tokenizer, base_topk, bits[name], ns
        )
        if base_topk is None:
            base_topk, base_tally = topk, tally
        results[name] = result
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    ordered = [results[n] for n in names]
    meta = _meta(ns, held, baseline, base_tally, device, dtype, time.perf_counter() - started)
    print(eval_report.table(ordered, baseline))
    print(eval_report.footer(meta))
    if ns.out is not None:
        eval_report.write(ns.out, ordered, meta)
        print(f"wrote {ns.out / 'eval.json'} and {ns.out / 'eval.png'}", file=sys.stderr)
    return 0


def _check_numbers(ns: argparse.Namespace) -> None:
    if ns.window < 2:
        raise ValueError(f"--window must be at least 2 (one prediction), got {ns.window}")
    if ns.tokens < ns.window:
        raise ValueError(f"--tokens ({ns.tokens}) must hold at least one --window ({ns.window})")
    if ns.last_word_items < 0:
        raise ValueError(f"--last-word-items must be >= 0, got {ns.last_word_items}")
    if ns.kl_top_k < 1:
        raise ValueError(f"--kl-top-k must be at least 1, got {ns.kl_top_k}")


def check_same_tokenizer(checkpoints: dict[str, Checkpoint]):
    """The first model's tokenizer, once every other model's vocabulary (token -> id) and logit
    width are seen to be the same; a FormatError naming the two models otherwise."""
    (first, ck0), *rest = checkpoints.items()
    tok0 = ck0.tokenizer()
    vocab0 = tok0.hf.get_vocab(with_added_tokens=True)
    for name, ck in rest:
        vocab = ck.tokenizer().hf.get_vocab(with_added_tokens=True)
        if vocab != vocab0:
            differ = sorted(set(vocab.items()) ^ set(vocab0.items()), key=lambda kv: kv[1])[:3]
            raise FormatError(
                f"{name} and {first} have different tokenizers ({len(vocab)} vs {len(vocab0)} tokens; "
                f"first differences: {differ}); their predictions cannot be compared"
            )
        if ck.config.vocab_size != ck0.config.vocab_size:
            raise FormatError(
                f"{name} predicts {ck.config.vocab_size} tokens but {first} {ck0.config.vocab_size}; "
                "their predictions cannot be compared"
            )
    return tok0


def held_out(source: Path, tokenizer, tokens: int, window: int, n_items: int) -> Held:
    """The windows and last-word items of ``source``'s evaluation documents; a FormatError where
    they hold fewer than asked for."""
    docs = split_text(source).evaluation
    if not docs:
        raise FormatError(f"{source}: no held-out evaluation document (it needs at least 5 documents)")
    windows = token_rows(
        docs, lambda s: tokenizer.encode(s, add_special_tokens=False), tokens // window, window, source
    )
    items = last_word_items(docs, n_items)
    if len(items) < n_items:
        raise FormatError(
            f"{source}: its held-out documents hold {len(items)} paragraphs for last-word accuracy "
            f"(at least 50 words, ending in a word), not the {n_items} asked for (--last-word-items)"
        )
    return Held(Path(source), windows, items)


def choose_baseline(bits: dict[str, WeightBits]) -> str:
    """The model with the most bits per weight (the first of equals)."""
    return max(bits, key=lambda n: bits[n].per_weight)


def evaluate_model(
    name: str,
    checkpoint: Checkpoint,
    model,
    held: Held,
    tokenizer,
    base: list[TopK] | None,
    bits: WeightBits,
    ns: argparse.Namespace,
) -> tuple[ModelResult, list[TopK], Tally]:
    """Score one loaded model. Without ``base`` it is the baseline: it returns its own compressed
    distributions (and is scored against them: KL 0, top-1 agreement 1)."""
    start = time.perf_counter()
    tally, own = score_windows(model, held.windows, base, ns.kl_top_k, f"{name}: windows")
    right = last_word_correct(model, tokenizer, held.items, f"{name}: last words")
    result = ModelResult(
        model=name,
        path=str(checkpoint.path),
        bits_per_weight=bits.per_weight,
        linear_weights=bits.weights,
        perplexity=tally.perplexity,
        kl_divergence=tally.mean_kl,
        top1_agreement=tally.top1_agreement,
        last_word_correct=right,
        last_word_items=len(held.items),
        seconds=time.perf_counter() - start,
    )
    return result, own, tally


def score_windows(
    model, windows: list[list[int]], base: list[TopK] | None, top_k: int, desc: str = "windows"
) -> tuple[Tally, list[TopK]]:
    """Run each window as one sequence and score its predictions, against ``base`` (one TopK per
    window) where given; else against the model's own top ``top_k``, which it returns too."""
    tally, own = Tally(), []
    for i, window in enumerate(_progress(windows, desc)):
        (logits,) = forward_chunks(model, [[window]], block_size=16)
        logp = log_probs(logits[:-1])
        ref = compress(logp, top_k) if base is None else base[i]
        if base is None:
            own.append(ref)
        tally.add(logp, torch.tensor(window[1:]), ref)
        del logits, logp
    return tally, own


def last_word_correct(model, tokenizer, items: list[Item], desc: str) -> int:
    """How many ``items`` the model completes right (greedy, in batches)."""
    prompts, budgets = encode_items(tokenizer, items)
    stop = set(tokenizer.eos_token_ids)
    right = 0
    for idx in _progress(batches([len(p) for p in prompts]), desc):
        outs = greedy(model, [prompts[i] for i in idx], [budgets[i] for i in idx], stop)
        right += sum(correct(tokenizer, items[i], out) for i, out in zip(idx, outs, strict=True))
    return right


def _device_and_dtype(device: str | None, dtype: str) -> tuple[torch.device, torch.dtype]:
    from tessera.kernels import preferred_dtype
    from tessera.platform import KNOWN_DEVICES, current_platform

    if device is not None and device not in KNOWN_DEVICES:
        raise ValueError(f"--device {device!r} is not one of {', '.join(KNOWN_DEVICES)}")
    # ROCm is "cuda" to torch
    dev = torch.device("cuda" if device == "rocm" else device) if device else current_platform().device
    return dev, preferred_dtype(dev) if dtype == "auto" else _DTYPES[dtype]


def _progress(items, desc: str):
    from tqdm import tqdm

    items = list(items)
    return tqdm(items, desc=desc, leave=False, disable=None, file=sys.stderr)


def _meta(ns, held: Held, baseline: str, base: Tally, device, dtype, seconds: float) -> dict:
    return {
        "command": ["tessera", *ns.argv],
        "text": str(held.source),
        "windows": len(held.windows),
        "window": ns.window,
        "tokens": sum(map(len, held.windows)),
        "predictions": base.positions,
        "last_word_items": len(held.items),
        "baseline": baseline,
        "kl_top_k": ns.kl_top_k,
        "baseline_mass_outside_top_k": base.mean_baseline_tail,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "quantized_weights": ns.quantized_weights,
        "seconds": seconds,
    }
