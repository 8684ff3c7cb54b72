"""Last-word accuracy, LAMBADA-style, on held-out paragraphs: can the model complete a
paragraph's final word from the text before it?

Items: every line (paragraph) of the evaluation documents, in order, that has at least 50
words and ends in a word of letters only (Unicode letters), optionally followed by one ``.``,
``!`` or ``?``. The context is the paragraph up to that word, without the space before it
(the model has to produce the space, as it would in running text); the target is the word.

Scoring: the context is encoded as a text of its own (with the special tokens the tokenizer
adds to one, e.g. BOS); the model generates greedily ``len(encode(" " + target)) + 1`` tokens
(the word's own tokens and one more, so that a longer word is seen to go on), stopping early at
an end-of-sequence token. The item is correct when the decoded continuation's first word (the
first run of letters after any leading whitespace) equals the target exactly, case included:
"Paris." and " Paris," match "Paris"; "Parisian" and "paris" do not.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from tessera.models import build_attention_metadata
from tessera.models.kv_cache import LayerKVCache

MIN_WORDS = 50
_LAST_WORD = re.compile(r"(.*\S)\s+([^\W\d_]+)[.!?]?")
_FIRST_WORD = re.compile(r"\s*([^\W\d_]+)")
_BATCH_TOKENS = 4096  # prompt tokens per forward step: bounds the activations, not the result


@dataclass(frozen=True)
class Item:
    context: str
    target: str


def last_word_items(documents: list[str], limit: int) -> list[Item]:
    """The first ``limit`` items of ``documents`` (fewer where they hold fewer)."""
    items: list[Item] = []
    for doc in documents:
        for line in doc.splitlines():
            if len(items) >= limit:
                return items
            line = line.strip()
            m = _LAST_WORD.fullmatch(line)
            if m and len(line.split()) >= MIN_WORDS:
                items.append(Item(m.group(1), m.group(2)))
    return items


def first_word(text: str) -> str:
    """The first run of letters of ``text`` after leading whitespace ("" if it starts otherwise)."""
    m = _FIRST_WORD.match(text)
    return m.group(1) if m else ""


@torch.inference_mode()
def greedy(
    model, prompts: list[list[int]], new_tokens: list[int], stop: set[int], block_size: int = 16
) -> list[list[int]]:
    """Greedy continuations of ``prompts`` (each at most its ``new_tokens``, ending early after a
    ``stop`` token), all prompts in one ragged batch over a paged cache."""
    lengths = [len(p) + n for p, n in zip(prompts, new_tokens, strict=True)]
    tables, n_blocks = [], 0
    for length in lengths:
        blocks = -(-length // block_size)
        tables.append(list(range(n_blocks, n_blocks + blocks)))
        n_blocks += blocks
    cache = [
        LayerKVCache.allocate(n_blocks, block_size, s.num_kv_heads, s.head_dim, model.dtype, model.device)
        for s in model.kv_cache_spec()
    ]
    out: list[list[int]] = [[] for _ in prompts]
    feed = [list(p) for p in prompts]
    done = [0] * len(prompts)
    while any(feed):
        counts = [len(f) for f in feed]
        done = [d + c for d, c in zip(done, counts, strict=True)]
        positions, metas = build_attention_metadata(counts, done, [tables], block_size, model.device)
        ids = torch.tensor([t for f in feed for t in f], device=model.device)
        hidden = model.forward(ids, positions, cache, metas[0])
        active = [i for i, c in enumerate(counts) if c]
        ends = torch.tensor(counts).cumsum(0)[active] - 1
        chosen = model.compute_logits(hidden[ends.to(model.device)]).argmax(-1).tolist()
        feed = [[] for _ in prompts]
        for i, tok in zip(active, chosen, strict=True):
            out[i].append(tok)
            if len(out[i]) < new_tokens[i] and tok not in stop:
                feed[i] = [tok]
    return out


def batches(lengths: list[int], budget: int = _BATCH_TOKENS) -> list[range]:
    """Consecutive index ranges whose lengths sum to at most ``budget`` (or one item alone)."""
    out, start, total = [], 0, 0
    for i, n in enumerate(lengths):
        if i > start and total + n > budget:
            out.append(range(start, i))
            start, total = i, 0
        total += n
    if start < len(lengths):
        out.append(range(start, len(lengths)))
    return out


def encode_items(tokenizer, items: list[Item]) -> tuple[list[list[int]], list[int]]:
    """Each item's context tokens and its generation budget (the target's tokens plus one)."""
    prompts = [tokenizer.encode(it.context) for it in items]
    budgets = [len(tokenizer.encode(" " + it.target, add_special_tokens=False)) + 1 for it in items]
    return prompts, budgets


def correct(tokenizer, item: Item, generated: list[int]) -> bool:
    return first_word(tokenizer.decode(generated)) == item.target
