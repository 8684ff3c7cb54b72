"""Request and response bodies of the OpenAI-compatible API, as msgspec Structs.

Field names and shapes are OpenAI's; the extras vLLM accepts in ``extra_body`` are fields too.
"""

from __future__ import annotations

from typing import Any

import msgspec


class StreamOptions(msgspec.Struct, forbid_unknown_fields=False):
    include_usage: bool = False


class ResponseFormat(msgspec.Struct, forbid_unknown_fields=False):
    type: str
    json_schema: dict | None = None


class _SamplingFields(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None
    # vLLM's extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    priority: int = 0
    cache_salt: str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_json: Any = None
    # disaggregated prefill/decode (vLLM's field): {"do_remote_decode": true} to a producer, the
    # producer's answer's kv_transfer_params to a consumer
    kv_transfer_params: dict | None = None


class ImageURL(msgspec.Struct, forbid_unknown_fields=False):
    url: str
    detail: str | None = None  # "auto" | "low" | "high": accepted; the processor decides the size


class VideoURL(msgspec.Struct, forbid_unknown_fields=False):
    url: str


class ContentPart(msgspec.Struct, forbid_unknown_fields=False):
    type: str
    text: str | None = None
    image_url: ImageURL | None = None
    video_url: VideoURL | None = None


class FunctionCall(msgspec.Struct, forbid_unknown_fields=False):
    name: str
    arguments: str | dict  # OpenAI sends a JSON string; a decoded object is taken too


class ToolCall(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    """A call an assistant message made earlier in the conversation."""

    id: str | None = None
    type: str = "function"
    function: FunctionCall


class ChatMessage(msgspec.Struct, forbid_unknown_fields=False):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant messages
    tool_call_id: str | None = None  # tool messages: the call this is the result of


class FunctionDefinition(msgspec.Struct, forbid_unknown_fields=False):
    name: str
    description: str | None = None
    parameters: Any = None  # a JSON schema object; checked by hand so the error names the tool
    strict: bool | None = None


class Tool(msgspec.Struct, forbid_unknown_fields=False):
    type: str
    function: FunctionDefinition


class NamedFunction(msgspec.Struct, forbid_unknown_fields=False):
    name: str


class NamedToolChoice(msgspec.Struct, forbid_unknown_fields=False):
    type: str
    function: NamedFunction


class ChatCompletionRequest(_SamplingFields, kw_only=True):
    messages: list[ChatMessage]
    tools: list[Tool] | None = None
    tool_choice: str | NamedToolChoice | None = None  # none | auto | required | a named function
    parallel_tool_calls: bool = True
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True


class CompletionRequest(_SamplingFields, kw_only=True):
    prompt: str | list[str | int | list[int]]  # text, texts, token ids, or lists of token ids
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None


class TokenizeRequest(msgspec.Struct, forbid_unknown_fields=False):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(msgspec.Struct, forbid_unknown_fields=False):
    tokens: list[int]
    model: str | None = None


class ErrorBody(msgspec.Struct):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(msgspec.Struct):
    error: ErrorBody


# -- responses -----------------------------------------------------------------------------------


class _Out(msgspec.Struct, kw_only=True):
    pass


class PromptTokensDetails(_Out, kw_only=True):
    cached_tokens: int = 0


class Usage(_Out, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class TopLogprob(_Out, kw_only=True):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(_Out, kw_only=True):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Out, kw_only=True):
    content: list[TokenLogprob]


class FunctionCallOut(_Out, kw_only=True):
    name: str
    arguments: str  # JSON text


class ToolCallOut(_Out, kw_only=True):
    id: str
    type: str = "function"
    function: FunctionCallOut


class AssistantMessage(_Out, kw_only=True):
    role: str = "assistant"
    content: str | None  # null when the answer is tool calls only
    tool_calls: list[ToolCallOut] | msgspec.UnsetType = msgspec.UNSET  # left out when there are none


class ChatChoice(_Out, kw_only=True):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None
    stop_reason: int | str | None = None


class ChatCompletionResponse(_Out, kw_only=True):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    kv_transfer_params: dict | msgspec.UnsetType = msgspec.UNSET  # a producer's: where the K/V waits


class FunctionCallDelta(msgspec.Struct, kw_only=True, omit_defaults=True):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A call's first delta carries id, type and name (and arguments ""); later ones only
    fragments of the arguments."""

    index: int
    id: str | None = None
    type: str | None = None
    function: FunctionCallDelta


class ChatDelta(msgspec.Struct, kw_only=True, omit_defaults=True):
    role: str | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(_Out, kw_only=True):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(_Out, kw_only=True):
    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(_Out, kw_only=True):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(_Out, kw_only=True):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(_Out, kw_only=True):
    """A whole completion, or one streamed chunk of it (then ``usage`` is only on the last)."""

    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    kv_transfer_params: dict | msgspec.UnsetType = msgspec.UNSET  # a producer's: where the K/V waits


class ModelCard(_Out, kw_only=True):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "tessera"
    max_model_len: int


class ModelList(_Out, kw_only=True):
    object: str = "list"
    data: list[ModelCard]


class TokenizeResponse(_Out, kw_only=True):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(_Out, kw_only=True):
    prompt: str
