"""POST /v1/completions: one or more prompts (text or token ids), n choices each, echo, logprobs."""

from __future__ import annotations

import contextlib
import time

import msgspec
from starlette.requests import Request

from ..outputs import RequestOutput
from .choices import engine_error, merged, prefetch, run_to_end, safe_delta, start_choices
from .errors import APIError
from .params import sampling_params
from .protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse
from .serving_engine import OpenAIServing
from .sse import sse_response


class ServingCompletion(OpenAIServing):
    async def create(self, request: Request, req: CompletionRequest, rid: str):
        self.check_model(req.model)
        if req.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        prompts = self._prompts(req.prompt)
        if req.kv_transfer_params is not None and len(prompts) > 1:
            raise APIError(400, "kv_transfer_params: a disaggregated request has one prompt", param="prompt")
        self.admit(len(prompts) * req.n)
        max_tokens = req.max_tokens if req.max_tokens is not None else 16
        jobs = []
        for k, prompt in enumerate(prompts):
            params = sampling_params(
                req,
                max_tokens=max_tokens,
                logprobs=req.logprobs,
                vocab_size=self.llm.vocab_size,
                limits=self.limits,
            )
            if req.echo and req.logprobs is not None:
                params = msgspec.structs.replace(params, prompt_logprobs=req.logprobs)
            prepared = await self.prepare(prompt, params, max_tokens_given=True, param="prompt")
            jobs.append((prepared, params, f"{rid}-{k}"))
        kvt = self.kv_transfer(req, jobs[0][1], jobs[0][0])
        self.admit(len(prompts) * req.n)
        gens, meta = [], []
        for prepared, params, sub in jobs:
            for g in start_choices(self.llm, prepared, params, sub, req, kv_transfer=kvt):
                gens.append(g)
                meta.append(prepared)
        if req.stream and kvt is not None:  # a consumer's pull may fail: say so before streaming
            gens = [await prefetch(gens[0])]
        name = f"cmpl-{rid}"
        prompt_tokens = sum(len(p.ids) for p, _, _ in jobs)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return sse_response(self._stream(name, gens, meta, jobs[0][1], req, prompt_tokens, include_usage))
        finals = await run_to_end(request, gens)
        choices = []
        for i, (f, p) in enumerate(zip(finals, meta, strict=True)):
            prefix = self._prompt_text(p) if req.echo else ""
            logprobs = None
            if req.logprobs is not None:
                logprobs = self._logprobs(f.logprobs or [], len(prefix))
                if req.echo:
                    logprobs = _concat(self._echo_logprobs(p.ids, f.prompt_logprobs), logprobs)
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
        return CompletionResponse(
            id=name,
            created=int(time.time()),
            model=self.model,
            choices=choices,
            usage=self.usage(prompt_tokens, finals, cached),
            kv_transfer_params=self.kv_transfer_answer(finals[0]) if kvt is not None else msgspec.UNSET,
        )

    def _prompts(self, prompts) -> list:
        if not prompts:
            raise APIError(400, "prompt is empty", param="prompt")
        if isinstance(prompts, str) or all(isinstance(p, int) for p in prompts):
            prompts = [prompts]
        elif not (all(isinstance(p, str) for p in prompts) or all(isinstance(p, list) for p in prompts)):
            raise APIError(
                400,
                "prompt must be a string, a list of strings, a list of token ids, or a list of lists of "
                "token ids",
                param="prompt",
            )
        if len(prompts) > self.limits.max_prompts:
            raise APIError(
                400, f"prompt holds {len(prompts)} prompts; at most {self.limits.max_prompts}", param="prompt"
            )
        return prompts

    def _prompt_text(self, p) -> str:
        return p.text if p.text is not None else self.llm.decode(p.ids)

    def _echo_logprobs(self, ids: list[int], prompt_logprobs) -> CompletionLogprobs:
        """The prompt's part of completions logprobs: the first token has none (nothing before it)."""
        first = self.llm.token_text(ids[0])
        block = self._logprobs(prompt_logprobs or [], len(first))
        return CompletionLogprobs(
            tokens=[first, *block.tokens],
            token_logprobs=[None, *block.token_logprobs],
            top_logprobs=[None, *block.top_logprobs],
            text_offset=[0, *block.text_offset],
        )

    def _logprobs(self, entries, offset: int) -> CompletionLogprobs:
        tokens, token_lps, tops, offsets = [], [], [], []
        for entry in entries:
            tok, lp = entry[0]
            text = self.llm.token_text(tok)
            tokens.append(text)
            token_lps.append(lp)
            tops.append({self.llm.token_text(i): v for i, v in entry[1:]} if len(entry) > 1 else None)
            offsets.append(offset)
            offset += len(text)
        return CompletionLogprobs(
            tokens=tokens, token_logprobs=token_lps, top_logprobs=tops, text_offset=offsets
        )

    async def _stream(self, name, gens, meta, params, req, prompt_tokens, include_usage):
        created = int(time.time())
        holdback = self.holdback(params)
        emitted = [0] * len(gens)
        lp_sent = [0] * len(gens)
        finals: list[RequestOutput | None] = [None] * len(gens)

        def chunk(choice: CompletionChoice) -> CompletionResponse:
            return CompletionResponse(id=name, created=created, model=self.model, choices=[choice])

        # the echoed prompt goes first; with logprobs it waits for the prompt's logprobs
        echo_pending = [req.echo and req.logprobs is not None] * len(gens)
        if req.echo and req.logprobs is None:
            for i, p in enumerate(meta):
                yield chunk(CompletionChoice(index=i, text=self._prompt_text(p)))
        # closed here, in this task, also when an error ends the stream early
        async with contextlib.aclosing(merged(gens)) as outs:
            async for i, out in outs:
                if out.finish_reason == "error":
                    raise engine_error(out)
                if echo_pending[i]:
                    echo_pending[i] = False
                    p = meta[i]
                    yield chunk(
                        CompletionChoice(
                            index=i,
                            text=self._prompt_text(p),
                            logprobs=self._echo_logprobs(p.ids, out.prompt_logprobs),
                        )
                    )
                delta = safe_delta(out, emitted, i, holdback)
                logprobs = None
                if req.logprobs is not None and out.logprobs:
                    logprobs = self._logprobs(out.logprobs[lp_sent[i] :], emitted[i] - len(delta))
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
                usage=self.usage(prompt_tokens, done, cached),
            )


def _concat(head: CompletionLogprobs, tail: CompletionLogprobs) -> CompletionLogprobs:
    """The prompt's logprobs then the completion's (whose offsets already count the prompt)."""
    return CompletionLogprobs(
        tokens=head.tokens + tail.tokens,
        token_logprobs=head.token_logprobs + tail.token_logprobs,
        top_logprobs=head.top_logprobs + tail.top_logprobs,
        text_offset=head.text_offset + tail.text_offset,
    )
