"""POST /v1/chat/completions: messages through the chat template, n choices, streamed or whole."""

from __future__ import annotations

import contextlib
import json
import time

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from ..outputs import RequestOutput
from .choices import engine_error, merged, prefetch, run_to_end, safe_delta, start_choices
from .errors import APIError, quote
from .params import sampling_params
from .protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    TokenLogprob,
    TopLogprob,
)
from .serving_engine import OpenAIServing
from .sse import sse_response
from .tool_choice import ToolPlan, plan_tools
from .tool_output import ToolCallStream, finish_reason, tool_message
from .tool_parsers import ToolOutputReader, template_knows_tools, tool_parser
from .tool_prompt import template_inputs

ROLES = ("system", "developer", "user", "assistant", "tool")
# parts a text-only model can't take: refused, never silently dropped
_MEDIA_PARTS = {"image_url": "image", "input_audio": "audio", "video_url": "video", "file": "file"}


class ServingChat(OpenAIServing):
    def __init__(
        self, llm, model, limits, *, tool_call_parser: str = "auto", enable_auto_tool_choice: bool = True
    ) -> None:
        super().__init__(llm, model, limits)
        # a vision-language model: an image part becomes its image token in the prompt text
        mm = llm.llm.multimodal
        self.image_token = llm.tokenizer.hf.id_to_token(mm.image_token_id) if mm is not None else None
        video = mm.video_token_id if mm is not None and mm.video_processor is not None else None
        self.video_token = llm.tokenizer.hf.id_to_token(video) if video is not None else None
        template = llm.tokenizer.chat_template
        self.tool_parser = tool_parser(tool_call_parser, template)
        self.template_knows_tools = template_knows_tools(template)
        self.auto_tool_choice = enable_auto_tool_choice

    async def create(self, request: Request, req: ChatCompletionRequest, rid: str) -> Response:
        self.check_model(req.model)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
        self.admit(req.n)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        tools = plan_tools(req, self.limits, auto_enabled=self.auto_tool_choice)
        images: list[str] = []
        videos: list[str] = []
        ids = await self.chat_ids(
            req.messages, req.add_generation_prompt, tools=tools.tools, images=images, videos=videos
        )
        params = sampling_params(
            req,
            max_tokens=max_tokens if max_tokens is not None else self.room(ids),
            logprobs=logprobs,
            vocab_size=self.llm.vocab_size,
            limits=self.limits,
            logprobs_param="top_logprobs",
            structured=tools.constraint,
        )
        try:
            media = {"image": images} if images else {}
            media |= {"video": videos} if videos else {}
            prompt = {"prompt_token_ids": ids, "multi_modal_data": media} if media else ids
            prepared = await self.prepare(
                prompt, params, max_tokens_given=max_tokens is not None, param="messages"
            )
        except APIError as e:  # the grammar came from a tool's parameters
            if tools.constraint is not None and e.param == "response_format":
                e.param = "tools"
            raise
        kvt = self.kv_transfer(req, params, prepared)
        self.admit(req.n)  # again: others may have queued while this one was tokenized
        gens = start_choices(self.llm, prepared, params, rid, req, kv_transfer=kvt)
        name = f"chatcmpl-{rid}"
        if req.stream and kvt is not None:  # a consumer's pull may fail: say so before streaming
            gens = [await prefetch(gens[0])]
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return sse_response(self._stream(name, gens, params, len(ids), include_usage, tools))
        finals = await run_to_end(request, gens)
        reader = self.tool_reader(tools)
        choices = []
        for i, f in enumerate(finals):
            message, finish = AssistantMessage(content=f.text), f.finish_reason
            if reader is not None:
                message, finish = tool_message(f.text, f.finish_reason, reader, tools.parallel)
            choices.append(
                ChatChoice(
                    index=i,
                    message=message,
                    logprobs=ChatLogprobs(content=self._logprobs(f.logprobs or [])) if req.logprobs else None,
                    finish_reason=finish,
                    stop_reason=f.stop_reason,
                )
            )
        return ChatCompletionResponse(
            id=name,
            created=int(time.time()),
            model=self.model,
            choices=choices,
            usage=self.usage(len(ids), finals, finals[0].num_cached_tokens),
            kv_transfer_params=self.kv_transfer_answer(finals[0]) if kvt is not None else msgspec.UNSET,
        )

    # -- messages -------------------------------------------------------------------------------

    def plain_messages(
        self, messages, images: list[str] | None = None, videos: list[str] | None = None
    ) -> list[dict]:
        """The messages as the template takes them (text parts joined; for a vision-language
        model, with ``images``, an image part as its image token and its URL appended to
        ``images``); APIError(400) naming the first message that is malformed."""
        if not messages:
            raise APIError(400, "messages must hold at least one message", param="messages")
        if len(messages) > self.limits.max_messages:
            raise APIError(
                400, f"messages holds more than {self.limits.max_messages} messages", param="messages"
            )
        plain = []
        for i, m in enumerate(messages):
            where = f"messages[{i}]"
            if m.role not in ROLES:
                raise APIError(
                    400,
                    f"{where}.role is {quote(m.role)}, which is not one of {', '.join(ROLES)}",
                    param=f"{where}.role",
                )
            content = m.content
            if isinstance(content, list):
                texts = []
                for j, part in enumerate(content):
                    stand_in = self._media_part(part, f"{where}.content[{j}]", images, videos)
                    if stand_in is not None:
                        texts.append(stand_in)
                        continue
                    if part.type != "text" or not isinstance(part.text, str):
                        raise APIError(
                            400,
                            f"{where}.content[{j}] must be a text part ({{'type': 'text', 'text': ...}}), "
                            f"got type {quote(part.type)}",
                            param=f"{where}.content",
                        )
                    texts.append(part.text)
                content = "".join(texts)
            has_tool_calls = bool(getattr(m, "tool_calls", None))
            if content is None and not (m.role == "assistant" and has_tool_calls):
                raise APIError(400, f"{where} has no content", param=f"{where}.content")
            if m.role == "tool" and not getattr(m, "tool_call_id", None):
                raise APIError(
                    400, f"{where} is a tool message without tool_call_id", param=f"{where}.tool_call_id"
                )
            role = "system" if m.role == "developer" else m.role
            entry = {"role": role, "content": content if content is not None else ""}
            if has_tool_calls:
                entry["tool_calls"] = m.tool_calls
            if m.tool_call_id is not None:
                entry["tool_call_id"] = m.tool_call_id
            plain.append(entry)
        return plain

    def _media_part(self, part, at: str, images: list | None, videos: list | None) -> str | None:
        """The prompt text standing for a media part this model and endpoint take (its URL
        appended to ``images`` or ``videos``); None for any other part; APIError(400) for media
        they do not take."""
        token, sink = {"image_url": (self.image_token, images), "video_url": (self.video_token, videos)}.get(
            part.type, (None, None)
        )
        param = at.rsplit("[", 1)[0]
        if token is not None and sink is not None:
            url = getattr(part, part.type)
            if url is None or not url.url:
                raise APIError(400, f"{at} is a {part.type} part without {part.type}.url", param=param)
            sink.append(url.url)
            return token + "\n"
        if part.type not in _MEDIA_PARTS:
            return None
        if token is not None:
            raise APIError(400, f"{at} is an {part.type} part: this endpoint takes text only", param=param)
        takes = (
            "text only"
            if self.image_token is None
            else "images"
            if self.video_token is None
            else "images and video"
        )
        raise APIError(
            400,
            f"{at} is an {part.type} part: the model {self.model!r} takes {takes}, so "
            f"{_MEDIA_PARTS[part.type]} inputs are not supported",
            param=param,
        )

    async def chat_ids(
        self,
        messages,
        add_generation_prompt: bool,
        tools: list[dict] | None = None,
        images: list[str] | None = None,
        videos: list[str] | None = None,
        **context,
    ) -> list[int]:
        """Token ids of chat messages (and the tools the prompt shows) through the model's
        template, rendered off the event loop; image URLs go to ``images`` (where given)."""
        plain, extra = template_inputs(
            self.plain_messages(messages, images, videos),
            tools or [],
            self.tool_parser,
            self.template_knows_tools,
        )
        context |= extra
        chars = sum(len(m["content"]) + len(json.dumps(m.get("tool_calls", ""))) for m in plain)
        try:
            self.llm.check_prompt_size(chars + len(json.dumps(extra)))
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from e
        try:
            return await self.llm.encode_chat(plain, add_generation_prompt=add_generation_prompt, **context)
        except ValueError as e:
            raise APIError(400, f"cannot apply the chat template: {e}", param="messages") from e

    # -- outputs --------------------------------------------------------------------------------

    def tool_reader(self, tools: ToolPlan) -> ToolOutputReader | None:
        """What reads calls out of the output: the constrained output's reader, the server's
        parser for "auto", none when no tools are in play."""
        return tools.reader or (self.tool_parser if tools.choice == "auto" else None)

    def _logprobs(self, entries) -> list[TokenLogprob]:
        out = []
        for entry in entries:
            tok, lp = entry[0]
            text = self.llm.token_text(tok)
            tops = []
            for i, v in entry[1:]:
                t = self.llm.token_text(i)
                tops.append(TopLogprob(token=t, logprob=v, bytes=list(t.encode())))
            out.append(TokenLogprob(token=text, logprob=lp, bytes=list(text.encode()), top_logprobs=tops))
        return out

    async def _stream(self, name, gens, params, prompt_len, include_usage, tools: ToolPlan):
        created = int(time.time())
        reader = self.tool_reader(tools)
        calls = [ToolCallStream(reader, tools.parallel) if reader else None for _ in gens]
        holdback = self.holdback(params)
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
        # closed here, in this task, also when an error ends the stream early
        async with contextlib.aclosing(merged(gens)) as outs:
            async for i, out in outs:
                if out.finish_reason == "error":
                    raise engine_error(out)
                delta = safe_delta(out, emitted, i, holdback)
                logprobs = None
                if params.logprobs is not None and out.logprobs:
                    logprobs = ChatLogprobs(content=self._logprobs(out.logprobs[lp_sent[i] :]))
                    lp_sent[i] = len(out.logprobs)
                if calls[i] is not None:  # text that may start a call is held back until it is known
                    deltas = calls[i].deltas(delta, out.finished)
                    if out.finished:
                        finals[i] = out
                        finish = finish_reason(out.finish_reason, calls[i].has_calls)
                        last = deltas.pop() if deltas else ChatDelta()
                    for d in deltas:
                        yield chunk(i, d, None, logprobs)
                        logprobs = None
                    if out.finished:
                        yield chunk(i, last, finish, logprobs, out.stop_reason)
                    elif logprobs:
                        yield chunk(i, ChatDelta(), None, logprobs)
                elif out.finished:
                    finals[i] = out
                    yield chunk(
                        i, ChatDelta(content=delta or None), out.finish_reason, logprobs, out.stop_reason
                    )
                elif delta or logprobs:
                    yield chunk(i, ChatDelta(content=delta), None, logprobs)
        if include_usage:
            done = [f for f in finals if f is not None]
            yield ChatCompletionChunk(
                id=name,
                created=created,
                model=self.model,
                choices=[],
                usage=self.usage(prompt_len, done, done[0].num_cached_tokens if done else 0),
            )
