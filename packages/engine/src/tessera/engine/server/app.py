"""Starlette app of the OpenAI-compatible API over an AsyncLLM."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator

import anyio
import msgspec
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from tessera.sampling import SamplingParams, StructuredOutput

from ..async_llm import AsyncLLM
from ..outputs import RequestOutput
from .metrics import Metrics
from .protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorBody,
    ErrorResponse,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    TokenizeRequest,
    TokenizeResponse,
    TokenLogprob,
    TopLogprob,
    Usage,
)

_encode = msgspec.json.Encoder().encode
logger = logging.getLogger(__name__)


_ENGINE_FAILED = {
    "error": {
        "message": "the engine failed on this request",
        "type": "server_error",
        "param": None,
        "code": None,
    }
}


def _safe_delta(out: RequestOutput, emitted: list[int], i: int, holdback: int) -> str:
    """New text of choice i that can't be taken back: while the request runs, the last
    ``holdback`` characters may yet turn out to start a stop string and be cut."""
    safe = out.text if out.finished else out.text[: max(emitted[i], len(out.text) - holdback)]
    delta = safe[emitted[i] :]
    emitted[i] = max(emitted[i], len(safe))
    return delta


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self, headers: dict | None = None) -> Response:
        body = ErrorResponse(ErrorBody(self.message, self.type, self.param, self.code))
        return Response(
            _encode(body), status_code=self.status, media_type="application/json", headers=headers
        )


def json_response(obj, headers: dict | None = None) -> Response:
    return Response(_encode(obj), media_type="application/json", headers=headers)


_PATH = re.compile(r"at `\$\.([\w\.\[\]]+)`")
_FIELD = re.compile(r"^(\w+) must be")


async def parse(request: Request, kind: type):
    body = await request.body()
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as e:
        m = _PATH.search(str(e))
        raise APIError(400, f"invalid request: {e}", param=m.group(1) if m else None) from e
    except msgspec.DecodeError as e:
        raise APIError(400, f"the body is not valid JSON: {e}") from e


class Server:
    def __init__(self, llm: AsyncLLM, served_model: str, api_key: str | None = None) -> None:
        self.llm = llm
        self.model = served_model
        self.api_key = api_key
        self.metrics = Metrics(llm.stats)
        llm._on_finish = self.metrics.on_finish
        self.created = int(time.time())

    # -- common -------------------------------------------------------------------------------

    def check_auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        if request.headers.get("authorization", "") != f"Bearer {self.api_key}":
            raise APIError(
                401,
                "invalid or missing API key (send Authorization: Bearer <key>)",
                "authentication_error",
                code="invalid_api_key",
            )

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model:
            raise APIError(
                404,
                f"the model `{name}` does not exist (this server serves `{self.model}`)",
                "not_found_error",
                param="model",
                code="model_not_found",
            )

    def sampling_params(self, req, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        structured = self.structured_output(req)
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        try:
            bias = {int(k): float(v) for k, v in (req.logit_bias or {}).items()}
        except ValueError as e:
            raise APIError(400, "logit_bias keys must be token ids", param="logit_bias") from e
        kwargs = dict(
            n=req.n,
            max_tokens=max_tokens,
            seed=req.seed,
            stop=stop,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            logit_bias=bias,
            min_tokens=req.min_tokens,
            stop_token_ids=list(req.stop_token_ids or []),
            include_stop_str_in_output=req.include_stop_str_in_output,
            ignore_eos=req.ignore_eos,
            skip_special_tokens=req.skip_special_tokens,
            logprobs=logprobs,
            structured=structured,
        )
        for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
            if getattr(req, name) is not None:
                kwargs[name] = getattr(req, name)
        try:
            params = SamplingParams(**kwargs)
            params.check_vocab(self.llm.llm.config.vocab_size)
        except ValueError as e:
            m = _FIELD.match(str(e))
            raise APIError(400, str(e), param=m.group(1) if m else None) from e
        return params

    @staticmethod
    def structured_output(req) -> StructuredOutput | None:
        """OpenAI's response_format, or vLLM's guided_* extras, as one constraint."""
        specs = []
        rf = req.response_format
        if rf is not None and rf.type == "json_object":
            specs.append(("response_format", StructuredOutput(json_object=True)))
        elif rf is not None and rf.type == "json_schema":
            schema = (rf.json_schema or {}).get("schema")
            if not isinstance(schema, dict):
                raise APIError(
                    400,
                    "response_format.json_schema.schema must be a JSON schema object",
                    param="response_format",
                )
            specs.append(("response_format", StructuredOutput(json_schema=json.dumps(schema))))
        elif rf is not None and rf.type != "text":
            raise APIError(
                400,
                f"response_format type {rf.type!r} is not one of text, json_object, json_schema",
                param="response_format",
            )
        if req.guided_json is not None:
            schema = req.guided_json if isinstance(req.guided_json, str) else json.dumps(req.guided_json)
            specs.append(("guided_json", StructuredOutput(json_schema=schema)))
        if req.guided_regex is not None:
            specs.append(("guided_regex", StructuredOutput(regex=req.guided_regex)))
        if req.guided_choice is not None:
            specs.append(("guided_choice", StructuredOutput(choice=req.guided_choice)))
        if len(specs) > 1:
            raise APIError(
                400,
                f"give one structured output constraint, not {', '.join(n for n, _ in specs)}",
                param=specs[1][0],
            )
        return specs[0][1] if specs else None

    def prepare(self, prompt, params: SamplingParams, max_tokens_given: bool, param: str):
        try:
            text, ids = self.llm.prepare(prompt, params)
        except ValueError as e:
            is_grammar = params.structured is not None and "structured output" in str(e)
            raise APIError(400, str(e), param="response_format" if is_grammar else param) from e
        limit = self.llm.max_model_len
        if max_tokens_given and len(ids) + params.max_tokens > limit:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{len(ids) + params.max_tokens} tokens ({len(ids)} in the messages, "
                f"{params.max_tokens} in the completion). Please reduce the length of the messages or "
                "completion.",
                param="max_tokens",
            )
        return text, ids

    # -- running n choices ----------------------------------------------------------------------

    def _choices(self, prompt, prepared, params: SamplingParams, rid: str, req) -> list[AsyncIterator]:
        gens = []
        for i in range(params.n):
            p = (
                params
                if params.n == 1
                else msgspec.structs.replace(
                    params, n=1, seed=None if params.seed is None else params.seed + i
                )
            )
            gens.append(
                self.llm.generate(
                    prompt,
                    p,
                    request_id=f"{rid}-{i}",
                    priority=req.priority,
                    cache_salt=req.cache_salt,
                    prepared=prepared,
                )
            )
        return gens

    async def _finals(self, request: Request, gens) -> list[RequestOutput]:
        """Run all choices to the end; a client that goes away aborts them."""
        finals: list[RequestOutput | None] = [None] * len(gens)

        async def consume(i, gen):
            async for out in gen:
                finals[i] = out

        async with anyio.create_task_group() as tg:

            async def watch():
                while True:
                    if await request.is_disconnected():
                        tg.cancel_scope.cancel()
                        return
                    await anyio.sleep(0.25)

            async def run_all():
                async with anyio.create_task_group() as inner:
                    for i, g in enumerate(gens):
                        inner.start_soon(consume, i, g)
                tg.cancel_scope.cancel()

            tg.start_soon(watch)
            tg.start_soon(run_all)
        if any(f is None for f in finals):
            raise APIError(499, "client disconnected")
        for f in finals:
            if f.finish_reason == "error":
                raise APIError(
                    500,
                    f"the engine failed on this request{': ' + f.stop_reason if f.stop_reason else ''}",
                    "server_error",
                )
        return finals

    @staticmethod
    async def _merged(gens) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(choice index, output) from all choices as they come."""
        send, recv = anyio.create_memory_object_stream(1024)

        async def pump(i, gen):
            async for out in gen:
                await send.send((i, out))

        async with anyio.create_task_group() as tg:

            async def run_all():
                async with send, anyio.create_task_group() as inner:
                    for i, g in enumerate(gens):
                        inner.start_soon(pump, i, g)

            tg.start_soon(run_all)
            async with recv:
                async for item in recv:
                    yield item

    def _token_text(self, token: int) -> str:
        return self.llm.tokenizer.hf.decode([token], skip_special_tokens=False)

    def _usage(self, prompt_len: int, finals: list[RequestOutput], cached: int) -> Usage:
        completion = sum(len(f.token_ids) for f in finals)
        return Usage(
            prompt_tokens=prompt_len,
            completion_tokens=completion,
            total_tokens=prompt_len + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
        )

    # -- endpoints ------------------------------------------------------------------------------

    async def chat(self, request: Request) -> Response:
        req: ChatCompletionRequest = await parse(request, ChatCompletionRequest)
        self.check_model(req.model)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        ids = self.chat_ids(req.messages, req.add_generation_prompt)
        params = self.sampling_params(
            req, max_tokens if max_tokens is not None else self._room(ids), logprobs
        )
        prepared = self.prepare(ids, params, max_tokens is not None, "messages")
        rid = request.state.request_id
        gens = self._choices(ids, prepared, params, rid, req)
        name = f"chatcmpl-{rid}"
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return self._sse(self._chat_stream(name, gens, params, len(ids), include_usage))
        finals = await self._finals(request, gens)
        choices = [
            ChatChoice(
                index=i,
                message=AssistantMessage(content=f.text),
                logprobs=ChatLogprobs(content=self._chat_logprobs(f.logprobs or []))
                if req.logprobs
                else None,
                finish_reason=f.finish_reason,
                stop_reason=f.stop_reason,
            )
            for i, f in enumerate(finals)
        ]
        return json_response(
            ChatCompletionResponse(
                id=name,
                created=int(time.time()),
                model=self.model,
                choices=choices,
                usage=self._usage(len(ids), finals, finals[0].num_cached_tokens),
            )
        )

    def chat_ids(self, messages, add_generation_prompt: bool) -> list[int]:
        """Token ids of chat messages through the model's template (text parts joined)."""
        plain = []
        for m in messages:
            content = m.content
            if isinstance(content, list):
                content = "".join(p.text or "" for p in content if p.type == "text")
            plain.append({"role": m.role, "content": content or ""})
        try:
            return self.llm.tokenizer.encode_chat(plain, add_generation_prompt=add_generation_prompt)
        except ValueError as e:
            raise APIError(400, f"cannot apply the chat template: {e}", param="messages") from e

    def _room(self, ids: list[int]) -> int:
        return max(1, self.llm.max_model_len - len(ids))

    def _chat_logprobs(self, entries) -> list[TokenLogprob]:
        out = []
        for entry in entries:
            tok, lp = entry[0]
            text = self._token_text(tok)
            tops = []
            for i, v in entry[1:]:
                t = self._token_text(i)
                tops.append(TopLogprob(token=t, logprob=v, bytes=list(t.encode())))
            out.append(TokenLogprob(token=text, logprob=lp, bytes=list(text.encode()), top_logprobs=tops))
        return out

    async def _chat_stream(self, name, gens, params, prompt_len, include_usage):
        created = int(time.time())
        holdback = max((len(s) for s in params.stop), default=1) - 1
        emitted = [0] * len(gens)
        lp_sent = [0] * len(gens)
        finals: list[RequestOutput | None] = [None] * len(gens)

        def chunk(i, delta, finish=None, logprobs=None, stop_reason=None):
            choice = ChatChunkChoice(
                index=i, delta=delta, logprobs=logprobs, finish_reason=finish, stop_reason=stop_reason
            )
            return ChatCompletionChunk(id=name, created=created, model=self.model, choices=[choice])

        for i in range(len(gens)):
            yield chunk(i, ChatDelta(role="assistant", content=""))
        async for i, out in self._merged(gens):
            if out.finish_reason == "error":
                yield _ENGINE_FAILED
                return
            delta = _safe_delta(out, emitted, i, holdback)
            logprobs = None
            if params.logprobs is not None and out.logprobs:
                logprobs = ChatLogprobs(content=self._chat_logprobs(out.logprobs[lp_sent[i] :]))
                lp_sent[i] = len(out.logprobs)
            if out.finished:
                finals[i] = out
                yield chunk(i, ChatDelta(content=delta or None), out.finish_reason, logprobs, out.stop_reason)
            elif delta or logprobs:
                yield chunk(i, ChatDelta(content=delta), None, logprobs)
        if include_usage:
            done = [f for f in finals if f is not None]
            yield ChatCompletionChunk(
                id=name,
                created=created,
                model=self.model,
                choices=[],
                usage=self._usage(prompt_len, done, done[0].num_cached_tokens if done else 0),
            )

    def _sse(self, events) -> StreamingResponse:
        async def body():
            try:
                async for event in events:
                    yield b"data: " + _encode(event) + b"\n\n"
                yield b"data: [DONE]\n\n"
            except APIError as e:
                yield (
                    b"data: "
                    + _encode(ErrorResponse(ErrorBody(e.message, e.type, e.param, e.code)))
                    + b"\n\n"
                )

        return StreamingResponse(
            body(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def completions(self, request: Request) -> Response:
        req: CompletionRequest = await parse(request, CompletionRequest)
        self.check_model(req.model)
        if req.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        prompts = req.prompt
        if not prompts:
            raise APIError(400, "prompt is empty", param="prompt")
        if isinstance(prompts, str) or all(isinstance(p, int) for p in prompts):
            prompts = [prompts]
        elif not (all(isinstance(p, str) for p in prompts) or all(isinstance(p, list) for p in prompts)):
            raise APIError(
                400,
                "prompt must be a string, a list of strings, a list of token ids, or a list of "
                "lists of token ids",
                param="prompt",
            )
        rid = request.state.request_id
        max_tokens = req.max_tokens if req.max_tokens is not None else 16
        jobs = []
        for k, prompt in enumerate(prompts):
            params = self.sampling_params(req, max_tokens, req.logprobs)
            if req.echo and req.logprobs is not None:
                params = msgspec.structs.replace(params, prompt_logprobs=req.logprobs)
            prepared = self.prepare(prompt, params, True, "prompt")
            jobs.append((prompt, prepared, params, f"{rid}-{k}"))
        gens, meta = [], []
        for prompt, prepared, params, sub in jobs:
            for g in self._choices(prompt, prepared, params, sub, req):
                gens.append(g)
                meta.append(prepared)
        name = f"cmpl-{rid}"
        prompt_tokens = sum(len(p[1]) for _, p, _, _ in jobs)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return self._sse(
                self._completion_stream(name, gens, meta, jobs[0][2], req, prompt_tokens, include_usage)
            )
        finals = await self._finals(request, gens)
        choices = []
        for i, (f, (text, ids)) in enumerate(zip(finals, meta, strict=True)):
            prefix = self._prompt_text(text, ids) if req.echo else ""
            logprobs = None
            if req.logprobs is not None:
                logprobs = self._completion_logprobs(f.logprobs or [], len(prefix))
                if req.echo:
                    logprobs = self._merge_logprobs(self._echo_logprobs(ids, f.prompt_logprobs), logprobs)
            choices.append(
                CompletionChoice(
                    index=i,
                    text=prefix + f.text,
                    logprobs=logprobs,
                    finish_reason=f.finish_reason,
                    stop_reason=f.stop_reason,
                )
            )
        cached = sum(f.num_cached_tokens for f in finals[:: max(1, req.n)])
        return json_response(
            CompletionResponse(
                id=name,
                created=int(time.time()),
                model=self.model,
                choices=choices,
                usage=self._usage(prompt_tokens, finals, cached),
            )
        )

    def _prompt_text(self, text: str | None, ids: list[int]) -> str:
        return text if text is not None else self.llm.tokenizer.decode(ids)

    def _echo_logprobs(self, ids: list[int], prompt_logprobs) -> CompletionLogprobs:
        """The prompt's part of completions logprobs: the first token has none (nothing before it)."""
        first = self._token_text(ids[0])
        block = self._completion_logprobs(prompt_logprobs or [], len(first))
        return CompletionLogprobs(
            tokens=[first, *block.tokens],
            token_logprobs=[None, *block.token_logprobs],
            top_logprobs=[None, *block.top_logprobs],
            text_offset=[0, *block.text_offset],
        )

    @staticmethod
    def _merge_logprobs(head: CompletionLogprobs, tail: CompletionLogprobs) -> CompletionLogprobs:
        """The prompt's logprobs then the completion's (whose offsets already count the prompt)."""
        return CompletionLogprobs(
            tokens=head.tokens + tail.tokens,
            token_logprobs=head.token_logprobs + tail.token_logprobs,
            top_logprobs=head.top_logprobs + tail.top_logprobs,
            text_offset=head.text_offset + tail.text_offset,
        )

    def _completion_logprobs(self, entries, offset: int) -> CompletionLogprobs:
        tokens, token_lps, tops, offsets = [], [], [], []
        for entry in entries:
            tok, lp = entry[0]
            text = self._token_text(tok)
            tokens.append(text)
            token_lps.append(lp)
            tops.append({self._token_text(i): v for i, v in entry[1:]} if len(entry) > 1 else None)
            offsets.append(offset)
            offset += len(text)
        return CompletionLogprobs(
            tokens=tokens, token_logprobs=token_lps, top_logprobs=tops, text_offset=offsets
        )

    async def _completion_stream(self, name, gens, meta, params, req, prompt_tokens, include_usage):
        created = int(time.time())
        holdback = max((len(s) for s in params.stop), default=1) - 1
        emitted = [0] * len(gens)
        lp_sent = [0] * len(gens)
        finals: list[RequestOutput | None] = [None] * len(gens)

        def chunk(choice: CompletionChoice) -> CompletionResponse:
            return CompletionResponse(id=name, created=created, model=self.model, choices=[choice])

        # the echoed prompt goes first; with logprobs it waits for the prompt's logprobs
        echo_pending = [req.echo and req.logprobs is not None] * len(gens)
        if req.echo and req.logprobs is None:
            for i, (text, ids) in enumerate(meta):
                yield chunk(CompletionChoice(index=i, text=self._prompt_text(text, ids)))
        async for i, out in self._merged(gens):
            if out.finish_reason == "error":
                yield _ENGINE_FAILED
                return
            if echo_pending[i]:
                echo_pending[i] = False
                text, ids = meta[i]
                yield chunk(
                    CompletionChoice(
                        index=i,
                        text=self._prompt_text(text, ids),
                        logprobs=self._echo_logprobs(ids, out.prompt_logprobs),
                    )
                )
            delta = _safe_delta(out, emitted, i, holdback)
            logprobs = None
            if req.logprobs is not None and out.logprobs:
                logprobs = self._completion_logprobs(out.logprobs[lp_sent[i] :], emitted[i] - len(delta))
                lp_sent[i] = len(out.logprobs)
            if out.finished:
                finals[i] = out
            if delta or out.finished or logprobs:
                yield chunk(
                    CompletionChoice(
                        index=i,
                        text=delta,
                        logprobs=logprobs,
                        finish_reason=out.finish_reason,
                        stop_reason=out.stop_reason,
                    )
                )
        if include_usage:
            done = [f for f in finals if f is not None]
            cached = sum(f.num_cached_tokens for f in done[:: max(1, req.n)])
            yield CompletionResponse(
                id=name,
                created=created,
                model=self.model,
                choices=[],
                usage=self._usage(prompt_tokens, done, cached),
            )

    async def models(self, request: Request) -> Response:
        card = ModelCard(id=self.model, created=self.created, max_model_len=self.llm.max_model_len)
        return json_response(ModelList(data=[card]))

    async def health(self, request: Request) -> Response:
        return Response(status_code=200)

    async def metrics_endpoint(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def tokenize(self, request: Request) -> Response:
        req: TokenizeRequest = await parse(request, TokenizeRequest)
        self.check_model(req.model)
        tok = self.llm.tokenizer
        if req.messages is not None:
            ids = self.chat_ids(req.messages, req.add_generation_prompt)
        elif req.prompt is not None:
            ids = tok.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        else:
            raise APIError(400, "give prompt or messages", param="prompt")
        return json_response(
            TokenizeResponse(tokens=ids, count=len(ids), max_model_len=self.llm.max_model_len)
        )

    async def detokenize(self, request: Request) -> Response:
        req: DetokenizeRequest = await parse(request, DetokenizeRequest)
        self.check_model(req.model)
        vocab = self.llm.llm.config.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(
                400, f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param="tokens"
            )
        return json_response(
            DetokenizeResponse(prompt=self.llm.tokenizer.decode(req.tokens, skip_special_tokens=False))
        )


def build_app(llm: AsyncLLM, served_model: str, api_key: str | None = None, on_ready=None) -> Starlette:
    server = Server(llm, served_model, api_key)
    protected = {"chat", "completions", "models", "tokenize", "detokenize"}

    def endpoint(name: str, handler):
        async def run(request: Request) -> Response:
            rid = request.headers.get("x-request-id") or uuid.uuid4().hex
            request.state.request_id = re.sub(r"[^\w\-.]", "_", rid)[:128]
            headers = {"X-Request-Id": rid}
            try:
                if name in protected:
                    server.check_auth(request)
                response = await handler(request)
            except APIError as e:
                server.metrics.rejected.labels(str(e.status)).inc()
                return e.response(headers)
            except Exception as e:  # a bug of ours: still an OpenAI-shaped answer, and keep serving
                logger.exception("request %s failed", rid)
                server.metrics.rejected.labels("500").inc()
                return APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error").response(
                    headers
                )
            response.headers["X-Request-Id"] = rid
            return response

        return run

    @contextlib.asynccontextmanager
    async def lifespan(app):
        async with anyio.create_task_group() as tg:
            tg.start_soon(llm.run)
            if on_ready is not None:
                on_ready()
            yield
            tg.cancel_scope.cancel()

    routes = [
        Route("/v1/chat/completions", endpoint("chat", server.chat), methods=["POST"]),
        Route("/v1/completions", endpoint("completions", server.completions), methods=["POST"]),
        Route("/v1/models", endpoint("models", server.models), methods=["GET"]),
        Route("/tokenize", endpoint("tokenize", server.tokenize), methods=["POST"]),
        Route("/detokenize", endpoint("detokenize", server.detokenize), methods=["POST"]),
        Route("/health", endpoint("health", server.health), methods=["GET"]),
        Route("/metrics", endpoint("metrics", server.metrics_endpoint), methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.server = server
    return app
