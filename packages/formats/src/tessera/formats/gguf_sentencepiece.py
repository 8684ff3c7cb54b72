"""Gemma's SentencePiece vocabulary from a GGUF (``tokenizer.ggml.model`` = "llama"), rebuilt as a
``tokenizers`` BPE exactly as transformers rebuilds it (``GemmaTokenizer`` from its GGUF integration),
so both give the same ids for the same text."""

from __future__ import annotations

from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

# GGUF architectures whose "llama" vocabulary is Gemma's (no prefix space, byte fallback)
GEMMA_ARCHITECTURES = ("gemma", "gemma2", "gemma3")

_SPACE = "\u2581"  # SentencePiece's visible space
# GGUF token types (llama.cpp's llama_token_type)
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4


def respelled(tokens: list[str]) -> list[str]:
    """The vocabulary as the normalizer sees text: Gemma's GGUF stores its tokens of two or more
    spaces with real spaces, while every space of the text becomes "▁" before lookup."""
    return [_SPACE * len(t) if " " in t and not t.strip() else t for t in tokens]


def merges_from_vocab(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """The merges a vocabulary implies: every cut of a token into two tokens, best first.

    The file has no merges. Gemma's scores do not follow its merge order, the order of the tokens in
    the file does; among the cuts of one token the longer left piece comes first (transformers'
    ``generate_merges`` with positions as scores).
    """
    ranked = []
    for token, index in vocab.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((index, -cut, left, right))
    ranked.sort(key=lambda m: (m[0], m[1]))
    return [(left, right) for _, _, left, right in ranked]


def gemma_tokenizer(tokens: list[str], types: list[int], unk_token: str | None) -> HFTokenizer:
    """BPE with byte fallback over "▁"-joined text; control tokens special, user-defined ones whole."""
    vocab = {t: i for i, t in enumerate(respelled(tokens))}
    hf = HFTokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges_from_vocab(vocab),
            unk_token=unk_token,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    hf.normalizer = normalizers.Replace(" ", _SPACE)
    # transformers' GemmaTokenizer splits on spaces, which the normalizer has already replaced: the
    # split never fires, but keeping it keeps the two tokenizers the same object
    hf.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    hf.decoder = decoders.Sequence([decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    # a user-defined run of spaces ("  ") is not added whole: BPE reaches it as "▁▁", as in transformers
    hf.add_tokens(
        [
            AddedToken(token, special=kind == _TOKEN_CONTROL, normalized=False)
            for token, kind in zip(tokens, types, strict=True)
            if kind == _TOKEN_CONTROL or (kind == _TOKEN_USER_DEFINED and token in vocab)
        ]
    )
    return hf
