"""The draft model of speculative decoding as tessera.spec_decode runs it: a model of the
registry with K/V tensors of its own, paged like the target's so that the target's block tables
address them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from tessera.models import CausalLM, LayerKVCache, build_attention_metadata


class DraftRunner:
    """Implements ``tessera.spec_decode.DraftModel``. One K/V tensor per draft layer, of
    ``num_blocks`` pages of ``block_size`` slots (the target's pool): block id b of the target's
    full-attention group is page b here too."""

    def __init__(
        self,
        model: CausalLM,
        num_blocks: int,
        block_size: int,
        kv_dtype: torch.dtype,
        batch_invariant: bool = True,
    ) -> None:
        self.model = model
        self.device = model.device
        self.block_size = block_size
        self.batch_invariant = batch_invariant
        self.vocab_size = model.config.vocab_size
        head = getattr(model, "lm_head", None)  # cut to part of the vocabulary (draft_vocab_size)?
        self.head = head if getattr(head, "vocab_rows", None) is not None else None
        self.kv_caches = [
            LayerKVCache.allocate(num_blocks, block_size, s.num_kv_heads, s.head_dim, kv_dtype, self.device)
            for s in model.kv_cache_spec()
        ]

    @torch.inference_mode()
    def logits(
        self,
        token_ids: Sequence[int],
        query_lens: Sequence[int],
        seq_lens: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        owners: Sequence[object] | None = None,
    ) -> torch.Tensor:
        positions, metas = build_attention_metadata(
            list(query_lens),
            list(seq_lens),
            [[list(t) for t in block_tables]],
            self.block_size,
            self.device,
            self.batch_invariant,
        )
        if self.head is not None:  # a cut head scores the context's tokens too
            if owners is None:
                self.head.include(token_ids)
            else:
                start = 0
                for owner, n in zip(owners, query_lens, strict=True):
                    self.head.include(token_ids[start : start + n], owner)
                    start += n
        hidden = self.model.forward(
            torch.tensor(token_ids, dtype=torch.int64, device=self.device),
            positions,
            self.kv_caches,
            metas[0],
        )
        last = torch.tensor(query_lens, device=self.device).cumsum(0) - 1
        logits = self.model.compute_logits(hidden[last] if len(last) < hidden.shape[0] else hidden)
        return logits

    def forget(self, owners: Sequence[object]) -> None:
        """These requests are done: a cut head's context rows they held may go."""
        if self.head is not None:
            self.head.forget(owners)


def check_draft_vocabulary(tokenizer, config, draft_checkpoint, name: str) -> None:
    """ValueError unless the draft reads and writes the target's tokens: the same tokenizer
    vocabulary (every token's text and id, added tokens included) and as many logit columns.
    Reads metadata only, before any weight is loaded."""
    draft_tok = draft_checkpoint.tokenizer()
    ours = tokenizer.hf.get_vocab(with_added_tokens=True)
    theirs = draft_tok.hf.get_vocab(with_added_tokens=True)
    if ours != theirs:
        only_target = sorted(ours.keys() - theirs.keys(), key=ours.get)
        only_draft = sorted(theirs.keys() - ours.keys(), key=theirs.get)
        moved = sorted((t for t in ours.keys() & theirs.keys() if ours[t] != theirs[t]), key=ours.get)
        detail = []
        if only_target:
            detail.append(f"{len(only_target)} tokens only in the target (first {only_target[0]!r})")
        if only_draft:
            detail.append(f"{len(only_draft)} only in the draft (first {only_draft[0]!r})")
        if moved:
            t = moved[0]
            detail.append(f"{len(moved)} with other ids (first {t!r}: {ours[t]} vs {theirs[t]})")
        raise ValueError(
            f"speculative_config.model {name!r} has another vocabulary than the target "
            f"({len(theirs)} tokens vs {len(ours)}: {'; '.join(detail)}): a draft model must share "
            "the target's tokenizer"
        )
    if draft_checkpoint.config.vocab_size != config.vocab_size:
        raise ValueError(
            f"speculative_config.model {name!r} has {draft_checkpoint.config.vocab_size} logit columns, "
            f"the target {config.vocab_size}: a draft model must score the target's whole vocabulary"
        )


def draft_load_options(spec, draft_checkpoint) -> dict:
    """``load_model``'s keyword arguments for the draft: its weights re-quantized
    (``quantization``), its LM head cut to the tokens it may propose (``draft_vocab_size``: the
    most frequent in the corpus, and every special token, end-of-sequence ones included)."""
    from tessera.spec_decode import native as spec_native
    from tessera.spec_decode.draft_vocab import cached_frequent_tokens, default_corpus, read_corpus

    out: dict = {}
    if spec.quantization is not None:
        out["quantize"] = spec.quantization.upper()
    vocab = draft_checkpoint.config.vocab_size
    if spec.draft_vocab_size is not None and spec.draft_vocab_size < vocab:
        tok = draft_checkpoint.tokenizer()
        texts = read_corpus(spec.draft_vocab_corpus) if spec.draft_vocab_corpus else default_corpus()

        def encode(batch: list[str]) -> list[list[int]]:
            return [e.ids for e in tok.hf.encode_batch(batch, add_special_tokens=False)]

        keep = set(tok.hf.get_added_tokens_decoder()) | set(tok.eos_token_ids)
        out["lm_head_rows"] = cached_frequent_tokens(
            encode,
            vocab,
            spec.draft_vocab_size,
            texts,
            keep,
            tokenizer_key=tok.hf.to_str(),
            cache_dir=spec_native.cache_dir(),
        )
    return out


def checkpoint_bytes(checkpoint) -> int:
    """Bytes of a checkpoint's weight files on disk (a GGUF file, an HF folder's tensors)."""
    path = Path(checkpoint.path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf"))
