"""Incremental detokenization that never emits half of a multi-byte character, and stop
strings found across token boundaries."""

from __future__ import annotations

from tessera.formats import Tokenizer

# Context tokens decoded ahead of the new ones, so tokenizers that drop a leading space at the
# start of a decode (SentencePiece) still give the right text.
_CONTEXT = 5


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: list[int],
        *,
        skip_special_tokens: bool = True,
        stop: list[str] | tuple[str, ...] = (),
        include_stop_str_in_output: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_token_ids[-_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""
        self.stop = list(stop)
        self.include_stop = include_stop_str_in_output
        self.stopped_by: str | None = None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add_tokens(self, new_ids: list[int]) -> str:
        """Append tokens; return the text they complete (possibly empty)."""
        if self.stopped_by is not None:
            return ""
        self.ids.extend(new_ids)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""  # an incomplete UTF-8 sequence: wait for the next token
        delta = full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._append(delta)

    def _append(self, delta: str) -> str:
        before = len(self.text)
        self.text += delta
        if self.stop:
            longest = max(len(s) for s in self.stop)
            search_from = max(0, before - longest + 1)
            hits = [(self.text.find(s, search_from), s) for s in self.stop]
            hits = [(i, s) for i, s in hits if i >= 0]
            if hits:
                at, s = min(hits)
                self.stopped_by = s
                self.text = self.text[: at + len(s) if self.include_stop else at]
                return self.text[before:] if len(self.text) > before else ""
        return delta
