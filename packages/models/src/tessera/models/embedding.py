"""Token embeddings, the LM head (tied to them or not), and RMSNorm weights."""

from __future__ import annotations

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

    def weight_shape(self) -> tuple[int, int]:
        return (self.vocab_size, self.hidden)

    def load_weight(self, tensor, shard=None) -> None:
        self._loaded = narrow_rows(tensor, self.start, self.rows)

    def finish(self, opts: LoadOptions, keep_packed: bool) -> None:
        """``keep_packed``: the table is also the LM head, and the backend may keep it packed
        (rows are dequantized as they are looked up)."""
        w, self._loaded = self._loaded, None
        if isinstance(w, QuantizedTensor) and keep_packed and opts.packed_weights:
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
    several ranks each computes the logits of its vocabulary rows and they are gathered."""

    def __init__(self, embedding: VocabEmbedding, tied: bool) -> None:
        self.embedding, self.tied = embedding, tied
        self.weight = None
        self._loaded = None

    def load_weight(self, tensor, shard=None) -> None:
        e = self.embedding
        self._loaded = narrow_rows(tensor, e.start, e.rows)

    def finish(self, opts: LoadOptions) -> None:
        if self.tied:
            self.weight = self.embedding.weight
        else:
            self.weight, self._loaded = prepare_stacked([self._loaded], opts), None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = ops.linear(hidden, self.weight, out_dtype=torch.float32)
        if self.embedding.tp.size > 1:
            logits = ops.all_gather(logits, -1, self.embedding.sizes)
        return logits


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
