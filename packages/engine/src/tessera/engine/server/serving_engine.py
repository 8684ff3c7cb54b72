"""What the chat and completion endpoints share: the model check, admission (backpressure),
preparing a prompt off the event loop, usage."""

from __future__ import annotations

import msgspec

from tessera.sampling import SamplingParams
from tessera.scheduler import KVTransferParams

from ..async_llm import AsyncLLM, Prepared
from ..kv_connector import check_kv_transfer
from ..outputs import RequestOutput
from .errors import APIError, overloaded, quote
from .limits import ServerLimits
from .protocol import PromptTokensDetails, Usage


class OpenAIServing:
    def __init__(self, llm: AsyncLLM, model: str, limits: ServerLimits) -> None:
        self.llm = llm
        self.model = model
        self.limits = limits

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model:
            raise APIError(
                404,
                f"the model {quote(name)} does not exist (this server serves {self.model!r})",
                "not_found_error",
                param="model",
                code="model_not_found",
            )

    def admit(self, sequences: int) -> None:
        """Refuse (503, Retry-After) a request whose sequences would overfill the waiting queue."""
        cap = self.limits.max_waiting_requests
        if sequences > cap:
            raise APIError(
                400,
                f"the request asks for {sequences} sequences (prompts x n); this server queues at most {cap}",
                param="n",
            )
        waiting = self.llm.num_waiting()
        if waiting + sequences > cap:
            raise overloaded(f"the server is busy: {waiting} waiting (at most {cap}); retry later")

    async def prepare(
        self, prompt, params: SamplingParams, *, max_tokens_given: bool, param: str
    ) -> Prepared:
        """The prompt tokenized and checked (in a worker thread); APIError(400) naming the problem."""
        try:
            prepared = await self.llm.prepare(prompt, params)
        except ValueError as e:
            is_grammar = params.structured is not None and "structured output" in str(e)
            raise APIError(400, str(e), param="response_format" if is_grammar else param) from e
        except RecursionError as e:  # a grammar nested too deep for the compiler
            raise APIError(400, "the structured output constraint is nested too deeply", param=param) from e
        n, limit = len(prepared.ids), self.llm.max_model_len
        if max_tokens_given and n + params.max_tokens > limit:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{n + params.max_tokens} tokens ({n} in the messages, {params.max_tokens} in the "
                "completion). Please reduce the length of the messages or completion.",
                param="max_tokens",
            )
        return prepared

    def kv_transfer(self, req, params: SamplingParams, prepared: Prepared) -> KVTransferParams | None:
        """The request's kv_transfer_params (disaggregated serving), checked against its prompt and
        this server's role; None for an ordinary request; APIError(400) naming the problem."""
        if req.kv_transfer_params is None:
            return None
        try:
            kvt = msgspec.convert(req.kv_transfer_params, KVTransferParams)
        except msgspec.ValidationError as e:
            raise APIError(400, f"invalid kv_transfer_params: {e}", param="kv_transfer_params") from e
        if not (kvt.do_remote_decode or kvt.do_remote_prefill):
            return None
        if kvt.do_remote_decode and req.stream:
            raise APIError(
                400,
                "kv_transfer_params.do_remote_decode: a producer's answer is not streamed",
                param="stream",
            )
        try:
            check_kv_transfer(self.llm.llm.kv_connector, prepared.ids, params, kvt, self.llm.vocab_size)
        except ValueError as e:
            raise APIError(400, str(e), param="kv_transfer_params") from e
        return kvt

    def kv_transfer_answer(self, final: RequestOutput) -> dict | msgspec.UnsetType:
        """A producer's answer: where its prompt's K/V waits for a consumer. None where the request
        ended on its one token for another reason than length (a stop token or string): the answer
        is complete, and its blocks are given back now."""
        kvt = final.kv_transfer_params
        if kvt is None:
            return msgspec.UNSET
        if final.finish_reason != "length":
            self.llm.llm.kv_connector.release(kvt.remote_request_id)
            return msgspec.UNSET
        return msgspec.to_builtins(kvt)

    def room(self, ids: list[int]) -> int:
        return max(1, self.llm.max_model_len - len(ids))

    @staticmethod
    def usage(prompt_len: int, finals: list[RequestOutput], cached: int) -> Usage:
        completion = sum(len(f.token_ids) for f in finals)
        return Usage(
            prompt_tokens=prompt_len,
            completion_tokens=completion,
            total_tokens=prompt_len + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
        )

    @staticmethod
    def holdback(params: SamplingParams) -> int:
        return max((len(s) for s in params.stop), default=1) - 1
