"""Token embeddings, the LM head (tied to them or not), and RMSNorm weights."""

from __future__ import annotations

from dataclasses import replace

import torch

from tessera.formats import QuantizedTensor
from tessera.kernels import ops

from .linear import LoadOptions, prepare_stacked
from .parallel import NO_TP, TPInfo, narrow_rows, to_dense


class VocabEmbedding:
    """``[vocab, hidden]`` rows looked up by token id. Each rank holds a run of rows
    (``TPInfo.sizes``: the vocabulary need not split evenly); the ranks' lookups (zero outside
    their rows) are summed."""

    def __init__(self, vocab_size: int, hidden: int, tp: TPInfo = NO_TP) -> None:
        self.vocab_size, self.hidden, self.tp = vocab_size, hidden, tp
        self.sizes = tp.sizes(vocab_size)
        self.start, self.rows = tp.uneven_part(vocab_size)
        self.weight = None  # a tensor, or a packed weight with rows(ids, dtype) when tied
        self._loaded = None
        self.head_source = None  # the loaded table, until a tied head of fewer rows took its own

    def weight_shape(self) -> tuple[int, int]:
        return (self.vocab_size, self.hidden)

    def load_weight(self, tensor, shard=None) -> None:
        self._loaded = narrow_rows(tensor, self.start, self.rows)

    def finish(self, opts: LoadOptions, keep_packed: bool) -> None:
        """``keep_packed``: the table is also the LM head, and the backend may keep it packed
        (rows are dequantized as they are looked up)."""
        w, self._loaded = self._loaded, None
        own_head = keep_packed and opts.lm_head_rows is not None
        if own_head:  # a tied head of fewer rows: it prepares them itself; lookups keep the table
            self.head_source, opts = w, replace(opts, quantize=None)
        else:  # the table is the head (tied), or lookups only: the head's precision either way
            opts = replace(opts, quantize=head_scheme(w, opts))
        if keep_packed and opts.packed_weights and (isinstance(w, QuantizedTensor) or opts.quantize):
            self.weight = prepare_stacked([w], opts)
        else:
            self.weight = to_dense(w, opts.dtype, opts.device)

    def forward(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        local = ids - self.start if self.tp.size > 1 else ids
        if self.tp.size > 1:
            outside = (local < 0) | (local >= self.rows)
            local = local.masked_fill(outside, 0)
        w = self.weight
        x = w[local] if isinstance(w, torch.Tensor) else w.rows(local, dtype)
        if self.tp.size > 1:
            x = ops.all_reduce(x.masked_fill(outside[:, None], 0))
        return x


class LMHead:
    """Logits ``hidden @ W.T`` in fp32; ``W`` is its own weight or the embedding table. With
    several ranks each computes the logits of its vocabulary rows and they are gathered.

    With ``LoadOptions.lm_head_rows`` it keeps those rows only (``vocab_rows``): ``forward``
    gives their logits, ``expand`` puts them in their columns of the whole vocabulary (-inf
    elsewhere). A speculative draft scores the tokens it may propose at a fraction of the bytes.
    ``include(ids, owner)`` adds rows for tokens outside them (a draft's context: the prompt's own
    words and names, whatever its language), up to ``max_context_rows``, dequantized once from
    the loaded weight (kept for that: for a GGUF file a view of its mapped bytes). A row lives
    while a request (``owner``) that included it does: ``forget(owners)`` lets its rows go, dropped
    once they are half of the context rows, or when new ones would pass the cap (where the live
    requests alone pass it, every context row goes and they come back as their tokens do)."""

    max_context_rows = 4096

    def __init__(self, embedding: VocabEmbedding, tied: bool) -> None:
        self.embedding, self.tied = embedding, tied
        self.weight = None
        self._loaded = None
        self.vocab_rows: torch.Tensor | None = None
        self._source = None  # the loaded weight of a cut head: where context rows come from
        self._kept: set[int] = set()
        self._context: set[int] = set()  # token ids of the rows in _context_w
        self._refs: dict[int, int] = {}  # context token -> requests holding it
        self._owned: dict[object, set[int]] = {}  # request -> the context tokens it holds
        self._context_w: torch.Tensor | None = None
        self._context_ids: torch.Tensor | None = None
        self._dtype = torch.float32

    def load_weight(self, tensor, shard=None) -> None:
        e = self.embedding
        self._loaded = narrow_rows(tensor, e.start, e.rows)

    def finish(self, opts: LoadOptions) -> None:
        rows = opts.lm_head_rows
        if rows is not None:
            e = self.embedding
            if e.tp.size > 1:
                raise ValueError("an LM head of a subset of the vocabulary runs on one rank only")
            source = e.head_source if self.tied else self._loaded
            e.head_source = self._loaded = None
            index = torch.tensor(rows, dtype=torch.int64)
            if index.numel() == 0 or index.min() < 0 or index.max() >= e.vocab_size:
                raise ValueError(f"LM head rows must be token ids in 0..{e.vocab_size - 1}")
            opts = replace(opts, quantize=head_scheme(source, opts))
            self.weight = prepare_stacked([_select_rows(source, index)], opts)
            self.vocab_rows = index.to(opts.device)
            self._source, self._kept, self._dtype = source, set(index.tolist()), opts.dtype
        elif self.tied:
            self.weight = self.embedding.weight
        else:
            opts = replace(opts, quantize=head_scheme(self._loaded, opts))
            self.weight, self._loaded = prepare_stacked([self._loaded], opts), None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = ops.linear(hidden, self.weight, out_dtype=torch.float32)
        if self.embedding.tp.size > 1:
            logits = ops.all_gather(logits, -1, self.embedding.sizes)
        if self._context_w is not None:
            extra = ops.linear(hidden, self._context_w, out_dtype=torch.float32)
            logits = torch.cat([logits, extra], dim=-1)
        return logits

    def expand(self, logits: torch.Tensor) -> torch.Tensor:
        """``forward``'s logits (after any soft-capping) in the whole vocabulary's columns."""
        if self.vocab_rows is None:
            return logits
        full = logits.new_full((logits.shape[0], self.embedding.vocab_size), float("-inf"))
        n = self.vocab_rows.numel()
        full[:, self.vocab_rows] = logits[:, :n]
        if self._context_ids is not None:
            full[:, self._context_ids] = logits[:, n:]
        return full

    def include(self, token_ids, owner=None) -> None:
        """Score these tokens too, where the head was cut without them; held by ``owner`` (a
        request) until ``forget``, or by none (dropped at the next clean-up)."""
        if self.vocab_rows is None:
            return
        vocab = self.embedding.vocab_size
        toks = [t for t in dict.fromkeys(int(t) for t in token_ids) if 0 <= t < vocab and t not in self._kept]
        if owner is not None:
            mine = self._owned.setdefault(owner, set())
            for t in toks:
                if t not in mine:
                    mine.add(t)
                    self._refs[t] = self._refs.get(t, 0) + 1
        new = [t for t in toks if t not in self._context][: self.max_context_rows]
        if not new:
            return
        if len(self._context) + len(new) > self.max_context_rows:
            self._drop_unheld()
            if len(self._context) + len(new) > self.max_context_rows:
                self._context, self._context_w, self._context_ids = set(), None, None
        device = self.vocab_rows.device
        rows = _select_rows(self._source, torch.tensor(new, dtype=torch.int64))
        if not isinstance(rows, torch.Tensor):
            rows = rows.dequantize(torch.float32)
        rows = rows.to(device, self._dtype)
        ids = torch.tensor(new, dtype=torch.int64, device=device)
        if self._context_w is None:
            self._context_w, self._context_ids = rows, ids
        else:
            self._context_w = torch.cat([self._context_w, rows])
            self._context_ids = torch.cat([self._context_ids, ids])
        self._context.update(new)

    def forget(self, owners) -> None:
        """These requests hold their context rows no more; the rows no request holds are
        dropped once they are half of them."""
        freed = False
        for owner in owners:
            for t in self._owned.pop(owner, ()):
                n = self._refs.pop(t) - 1
                if n:
                    self._refs[t] = n
                freed = True
        # every step releases its finished requests (most steps none): count only after a change
        if freed and 2 * sum(t in self._refs for t in self._context) < len(self._context):
            self._drop_unheld()

    @property
    def context_rows(self) -> int:
        return len(self._context)

    def _drop_unheld(self) -> None:
        if self._context_ids is None:
            return
        ids = self._context_ids.tolist()
        keep = [i for i, t in enumerate(ids) if t in self._refs]
        if len(keep) == len(ids):
            return
        if not keep:
            self._context, self._context_w, self._context_ids = set(), None, None
            return
        index = torch.tensor(keep, dtype=torch.int64, device=self._context_ids.device)
        self._context_w = self._context_w.index_select(0, index)
        self._context_ids = self._context_ids.index_select(0, index)
        self._context = {ids[i] for i in keep}


def head_scheme(weight, opts: LoadOptions) -> str | None:
    """What ``LoadOptions.quantize`` makes of an LM head (or a table tied to it): its precision
    counts more than a layer's (every logit reads it; ExLlamaV2 gives it 6 bits for that), so a
    head stored quantized stays as stored, and a dense one becomes Q8_0."""
    if opts.quantize is None or not isinstance(weight, torch.Tensor):
        return None
    return "Q8_0"


def _select_rows(weight, index: torch.Tensor):
    """Rows ``index`` of a loaded weight: packed GGUF rows move whole; GPTQ/AWQ/EXL2 (whose
    groups may be ordered by act-order) through their dequantized values."""
    if isinstance(weight, QuantizedTensor):
        return QuantizedTensor(
            weight.scheme, weight.rows()[index].contiguous(), (len(index), weight.shape[1])
        )
    if isinstance(weight, torch.Tensor):
        return weight[index]
    return weight.dequantize(torch.float32)[index]


class RMSNorm:
    """``(w + offset) * x / rms(x)``; Gemma stores ``w`` for a ``(1 + w)`` scale (offset 1)."""

    def __init__(self, hidden: int, eps: float, offset: float = 0.0) -> None:
        self.hidden, self.eps, self.offset = hidden, eps, offset
        self.weight: torch.Tensor | None = None
        self._offset_applied = False

    def weight_shape(self) -> tuple[int]:
        return (self.hidden,)

    def load_weight(self, tensor, shard=None) -> None:
        self.weight, self._offset_applied = tensor, False

    def load_weight_with_offset(self, tensor, shard=None) -> None:
        """A weight that already holds ``w + offset`` (llama.cpp's converter adds Gemma's 1)."""
        self.weight, self._offset_applied = tensor, True

    def finish(self, opts: LoadOptions) -> None:
        w = to_dense(self.weight, torch.float32, opts.device)
        self.weight = (w if self._offset_applied else w + self.offset).to(opts.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return ops.fused_add_rms_norm(x, residual, self.weight, self.eps)
