"""Prompt lookup ("ngram" in vLLM's speculative config): draft tokens copied from the request's own
context, with no model."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from . import native
from .proposer import Drafts, ProposalRequest

_INT32 = np.iinfo(np.int32)


class NgramProposer:
    """Proposes up to ``k`` tokens per request by finding an earlier occurrence, in the request's
    prompt and output so far, of its last ``n`` tokens, and copying what followed it.

    The rule: the largest ``n`` in ``[prompt_lookup_min, prompt_lookup_max]`` whose last-``n``-token
    suffix occurs earlier in the context (a longer match predicts better); among the occurrences
    of that ``n``-gram, the earliest; the proposal is the up to ``k`` tokens after it, fewer where
    the context ends first; none when no ``n >= prompt_lookup_min`` matches.

    Why the earliest occurrence: it is what vLLM's ``ngram`` method takes (its KMP pass keeps the
    leftmost of equally long matches) and what prompt-lookup decoding (llama-cpp-python's
    ``LlamaPromptLookupDecoding``, the original prompt-lookup-decoding code) takes, scanning left to
    right, so acceptance rates compare with theirs; the earliest occurrence usually lies in the
    prompt, the text that an editing or summarising answer copies from; and it lies furthest from
    the end of the context, so its continuation is least often cut short of ``k`` tokens (in a
    run of period ``p < k`` the latest occurrence leaves only ``p`` tokens to copy).

    Compiled C (csrc/ngram.c), built at first use: one Knuth-Morris-Pratt pass over the reversed
    context, O(context) time and O(prompt_lookup_max) memory per request. The library is built when
    the proposer is made, so a machine without a C compiler fails at start, with the reason.
    """

    forward_seconds = 0.0  # it runs no model: a drafted token costs only its verification

    def __init__(self, prompt_lookup_min: int, prompt_lookup_max: int, num_speculative_tokens: int) -> None:
        if not (isinstance(prompt_lookup_min, int) and prompt_lookup_min >= 1):
            raise ValueError(f"prompt_lookup_min must be an integer >= 1, got {prompt_lookup_min!r}")
        if not (isinstance(prompt_lookup_max, int) and prompt_lookup_max >= prompt_lookup_min):
            raise ValueError(
                f"prompt_lookup_max must be an integer >= prompt_lookup_min ({prompt_lookup_min}), "
                f"got {prompt_lookup_max!r}"
            )
        if not (isinstance(num_speculative_tokens, int) and num_speculative_tokens >= 1):
            raise ValueError(
                f"num_speculative_tokens must be an integer >= 1, got {num_speculative_tokens!r}"
            )
        self.prompt_lookup_min = prompt_lookup_min
        self.prompt_lookup_max = prompt_lookup_max
        self.k = num_speculative_tokens
        self._ffi, self._lib = native.library()
        self._out = np.empty((0, 0), dtype=np.int32)  # grown as needed, reused across calls
        self._counts = np.empty(0, dtype=np.int32)

    def propose(self, token_ids: Sequence[int] | np.ndarray, k: int | None = None) -> list[int]:
        """Draft tokens for one request from its context ``token_ids`` (prompt and output so far);
        at most ``k`` (default: num_speculative_tokens)."""
        k = self.k if k is None else _check_k(k)
        tokens = np.ascontiguousarray(_as_int32(np.asarray(token_ids), "token_ids"))
        if tokens.ndim != 1:
            raise ValueError(f"token_ids must be one sequence of token ids, got shape {tokens.shape}")
        out = np.empty(k, dtype=np.int32)
        n = self._lib.tessera_ngram_propose(
            self._ptr("int32_t *", tokens),
            tokens.shape[0],
            self.prompt_lookup_min,
            self.prompt_lookup_max,
            k,
            self._ptr("int32_t *", out),
        )
        if n < 0:
            raise MemoryError("the n-gram proposer could not allocate its scratch")
        return out[:n].tolist()

    def propose_batch(
        self,
        token_ids: np.ndarray | Sequence[Sequence[int]],
        num_tokens: Sequence[int] | np.ndarray | None = None,
        k: int | Sequence[int] | np.ndarray | None = None,
    ) -> list[list[int]]:
        """Draft tokens for many requests in one call.

        ``token_ids``: a ``[requests, capacity]`` array whose row ``i`` holds request ``i``'s
        context in its first ``num_tokens[i]`` entries (as a runner keeps them; int32 is read in
        place), or a list of per-request sequences (``num_tokens`` then defaults to their lengths).
        ``k``: the most tokens to propose, one for all or one per request (0 proposes none).
        """
        if isinstance(token_ids, np.ndarray):
            tokens = _as_int32(token_ids, "token_ids")
            if tokens.ndim != 2:
                raise ValueError(f"token_ids must be [requests, capacity], got shape {tokens.shape}")
            if num_tokens is None:
                raise ValueError("num_tokens is needed with a [requests, capacity] array of token ids")
        else:
            seqs = [np.asarray(s) for s in token_ids]
            lengths = [s.shape[0] for s in seqs]
            tokens = np.zeros((len(seqs), max(lengths, default=0)), dtype=np.int32)
            for row, s in zip(tokens, seqs, strict=True):
                row[: s.shape[0]] = _as_int32(s, "token_ids")
            num_tokens = lengths if num_tokens is None else num_tokens
        if tokens.strides[1] != tokens.itemsize:
            tokens = np.ascontiguousarray(tokens)
        n_req = tokens.shape[0]
        lens = np.ascontiguousarray(num_tokens, dtype=np.int64)
        if lens.shape != (n_req,):
            raise ValueError(f"num_tokens must hold one count per request ({n_req}), got shape {lens.shape}")
        if n_req and (lens.min() < 0 or lens.max() > tokens.shape[1]):
            raise ValueError(f"num_tokens must be within 0..{tokens.shape[1]} (the array's capacity)")
        if k is None or np.ndim(k) == 0:
            ks = np.full(n_req, self.k if k is None else _check_k(k), dtype=np.int32)
        else:
            ks = np.ascontiguousarray(k, dtype=np.int32)
            if ks.shape != (n_req,) or (n_req and ks.min() < 0):
                raise ValueError(f"k must be one integer >= 0 per request ({n_req}), got {k!r}")
        k_max = int(ks.max()) if n_req else 0
        if self._out.shape[0] < n_req or self._out.shape[1] < k_max:
            self._out = np.empty((max(n_req, self._out.shape[0]), max(k_max, self._out.shape[1])), np.int32)
            self._counts = np.empty(self._out.shape[0], dtype=np.int32)
        rc = self._lib.tessera_ngram_propose_batch(
            self._ptr("int32_t *", tokens),
            tokens.strides[0] // tokens.itemsize,
            self._ptr("int64_t *", lens),
            n_req,
            self.prompt_lookup_min,
            self.prompt_lookup_max,
            self._ptr("int32_t *", ks),
            self._ptr("int32_t *", self._out),
            self._out.shape[1],
            self._ptr("int32_t *", self._counts),
        )
        if rc != 0:
            raise MemoryError("the n-gram proposer could not allocate its scratch")
        return [self._out[i, : self._counts[i]].tolist() for i in range(n_req)]

    def draft(self, requests: Sequence[ProposalRequest], ks: Sequence[int]) -> Drafts:
        """The engine's Proposer interface: ``propose_batch`` over the requests' contexts with
        one k per request."""
        if not any(ks):
            return Drafts([[] for _ in ks])
        contexts = [r.token_ids for r in requests]
        return Drafts(self.propose_batch(contexts, k=np.asarray(ks, dtype=np.int32)))

    def catch_up_tokens(self, request: ProposalRequest) -> int:
        return 0  # no state: every lookup reads the whole context anyway

    def release(self, request_ids: Iterable[str]) -> None:
        """Nothing is kept per request."""

    def measure(self, block_table: Sequence[int], num_slots: int, repeats: int) -> None:
        """It runs no model: nothing to time."""

    def _ptr(self, ctype: str, array: np.ndarray):
        return self._ffi.cast(ctype, array.ctypes.data)


def _check_k(k) -> int:
    if not (isinstance(k, int | np.integer) and k >= 0):
        raise ValueError(f"k must be an integer >= 0, got {k!r}")
    return int(k)


def _as_int32(a: np.ndarray, name: str) -> np.ndarray:
    """``a`` as int32 (itself when it already is); ValueError for what is not a token id."""
    if a.dtype == np.int32:
        return a
    if a.size == 0:
        return a.astype(np.int32)
    if a.dtype.kind not in "iu":
        raise ValueError(f"{name} must be integer token ids, got dtype {a.dtype}")
    if a.min() < _INT32.min or a.max() > _INT32.max:
        raise ValueError(f"{name} holds values outside int32, which are no token ids")
    return a.astype(np.int32)
