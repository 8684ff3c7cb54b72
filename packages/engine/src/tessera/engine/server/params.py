"""From an OpenAI request body to SamplingParams: every size bounded, every error naming its field."""

from __future__ import annotations

import json
import re

from tessera.sampling import SamplingParams, StructuredOutput

from .errors import APIError, quote
from .limits import ServerLimits

_FIELD = re.compile(r"^(\w+) must be")


def json_depth(value, limit: int) -> int:
    """Nesting depth of a decoded JSON value, counted without recursion and stopping past ``limit``."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict | list):
            deepest = max(deepest, d)
            if deepest > limit:
                return deepest
            stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return deepest


def _check_schema(schema, limits: ServerLimits, param: str) -> None:
    if json_depth(schema, limits.max_schema_depth) > limits.max_schema_depth:
        raise APIError(
            400, f"the JSON schema is nested deeper than {limits.max_schema_depth} levels", param=param
        )


def structured_output(req, limits: ServerLimits) -> StructuredOutput | None:
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
        _check_schema(schema, limits, "response_format")
        specs.append(("response_format", StructuredOutput(json_schema=json.dumps(schema))))
    elif rf is not None and rf.type != "text":
        raise APIError(
            400,
            f"response_format type {quote(rf.type)} is not one of text, json_object, json_schema",
            param="response_format",
        )
    if req.guided_json is not None:
        schema = req.guided_json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except (json.JSONDecodeError, RecursionError) as e:
                raise APIError(400, f"guided_json is not a JSON schema: {e}", param="guided_json") from e
        _check_schema(schema, limits, "guided_json")
        specs.append(("guided_json", StructuredOutput(json_schema=json.dumps(schema))))
    if req.guided_regex is not None:
        specs.append(("guided_regex", StructuredOutput(regex=req.guided_regex)))
    if req.guided_choice is not None:
        if len(req.guided_choice) > limits.max_choice_options:
            raise APIError(
                400, f"guided_choice has more than {limits.max_choice_options} options", param="guided_choice"
            )
        specs.append(("guided_choice", StructuredOutput(choice=req.guided_choice)))
    if len(specs) > 1:
        raise APIError(
            400,
            f"give one structured output constraint, not {', '.join(n for n, _ in specs)}",
            param=specs[1][0],
        )
    return specs[0][1] if specs else None


def check_sizes(req, limits: ServerLimits) -> None:
    """Counts a client could make huge, refused before anything is built from them."""
    if req.n > limits.max_n:
        raise APIError(
            400, f"n must be at most {limits.max_n} (this server's --max-n), got {req.n}", param="n"
        )
    stop = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    if len(stop) > limits.max_stop or any(len(s) > limits.max_stop_chars for s in stop):
        raise APIError(
            400,
            f"stop takes at most {limits.max_stop} strings of at most {limits.max_stop_chars} characters",
            param="stop",
        )
    if len(req.logit_bias or {}) > limits.max_logit_bias:
        raise APIError(400, f"logit_bias takes at most {limits.max_logit_bias} entries", param="logit_bias")
    if len(req.stop_token_ids or []) > limits.max_stop_token_ids:
        raise APIError(
            400, f"stop_token_ids takes at most {limits.max_stop_token_ids} ids", param="stop_token_ids"
        )


def sampling_params(
    req,
    *,
    max_tokens: int | None,
    logprobs: int | None,
    vocab_size: int,
    limits: ServerLimits,
    logprobs_param: str = "logprobs",
    structured: StructuredOutput | None = None,
) -> SamplingParams:
    """The request's SamplingParams; APIError(400) naming the field that is wrong."""
    check_sizes(req, limits)
    if structured is None:
        structured = structured_output(req, limits)
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    bias = {}
    for k, v in (req.logit_bias or {}).items():
        try:
            bias[int(k)] = float(v)
        except ValueError as e:
            raise APIError(400, f"logit_bias key {quote(k)} is not a token id", param="logit_bias") from e
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
    except ValueError as e:
        m = _FIELD.match(str(e))
        field = m.group(1) if m else None
        raise APIError(400, str(e), param=logprobs_param if field == "logprobs" else field) from e
    try:
        params.check_vocab(vocab_size)
    except ValueError as e:
        token = next(
            (
                name
                for name, ids in (("logit_bias", bias), ("stop_token_ids", params.stop_token_ids))
                if any(t >= vocab_size for t in ids)
            ),
            None,
        )
        raise APIError(400, str(e), param=token) from e
    return params
