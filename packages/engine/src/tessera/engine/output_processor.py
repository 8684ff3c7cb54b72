"""Turns engine-core outputs (token ids) into RequestOutputs (text, stop strings)."""

from __future__ import annotations

from tessera.formats import Tokenizer
from tessera.sampling import SamplingParams
from tessera.scheduler import EngineCoreOutput

from .detokenizer import IncrementalDetokenizer
from .outputs import RequestOutput


class _RequestState:
    def __init__(self, out: RequestOutput, detok: IncrementalDetokenizer) -> None:
        self.out = out
        self.detok = detok


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._states: dict[str, _RequestState] = {}

    def add_request(
        self, request_id: str, prompt: str | None, prompt_ids: list[int], params: SamplingParams
    ) -> None:
        detok = IncrementalDetokenizer(
            self.tokenizer,
            prompt_ids,
            skip_special_tokens=params.skip_special_tokens,
            stop=params.stop,
            include_stop_str_in_output=params.include_stop_str_in_output,
        )
        out = RequestOutput(request_id=request_id, prompt=prompt, prompt_token_ids=list(prompt_ids))
        self._states[request_id] = _RequestState(out, detok)

    def abort(self, request_id: str) -> RequestOutput | None:
        st = self._states.pop(request_id, None)
        if st is None:
            return None
        st.out.finish_reason = "abort"
        st.out.delta_text = ""
        return st.out

    def process(self, outputs: list[EngineCoreOutput]) -> tuple[list[RequestOutput], list[str]]:
        """RequestOutputs that changed, and ids the scheduler must stop (a stop string matched)."""
        changed, to_stop = [], []
        for eco in outputs:
            st = self._states.get(eco.request_id)
            if st is None:
                continue
            out = st.out
            new, delta = _add_tokens(st.detok, eco.new_token_ids)
            out.token_ids.extend(new)
            out.num_cached_tokens = eco.num_cached_tokens
            if eco.prompt_logprobs is not None:
                out.prompt_logprobs = list(eco.prompt_logprobs)
            if eco.logprobs is not None:
                out.logprobs = (out.logprobs or []) + list(eco.logprobs[: len(new)])
            out.delta_text = delta
            if eco.kv_transfer_params is not None or eco.kv_transfer_failure is not None:
                out.kv_transfer_params = eco.kv_transfer_params
                out.kv_transfer_failure = eco.kv_transfer_failure
            out.text = st.detok.text
            if st.detok.stopped_by is not None and eco.finish_reason is None:
                out.finish_reason, out.stop_reason = "stop", st.detok.stopped_by
                to_stop.append(eco.request_id)
            elif eco.finish_reason is not None:
                out.finish_reason = eco.finish_reason
                out.stop_reason = st.detok.stopped_by or eco.stop_reason
            if out.finish_reason is not None:
                del self._states[eco.request_id]
            changed.append(out)
        return changed, to_stop


def _add_tokens(detok: IncrementalDetokenizer, new: list[int]) -> tuple[list[int], str]:
    """The tokens of a step (several after a speculative verification) up to the one that
    completes a stop string, and their text."""
    if not detok.stop or len(new) <= 1:
        return new, detok.add_tokens(new)
    delta = ""
    for i, token in enumerate(new):
        delta += detok.add_tokens([token])
        if detok.stopped_by is not None:
            return new[: i + 1], delta
    return new, delta
