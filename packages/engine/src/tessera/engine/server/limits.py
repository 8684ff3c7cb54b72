"""What one request may ask of the server, checked before any work starts."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerLimits:
    # 32 MiB: far above any text prompt that fits a context (the prompt-length bound refuses those
    # sooner), room for a few base64 images later; a body is cut off as soon as it passes this
    max_request_body_size: int = 32 * 2**20
    # choices per prompt: each is a sequence in the running batch, so 16 keeps one request to
    # 1/16 of the default 256-sequence batch (OpenAI allows 128; vLLM has no cap and stalls)
    max_n: int = 16
    # prompts in one /v1/completions request
    max_prompts: int = 256
    # sequences admitted but not yet running; beyond it a 503 with Retry-After
    max_waiting_requests: int = 1024
    # seconds running requests get to finish after SIGTERM before they are aborted
    shutdown_timeout: float = 30.0
    # sizes of the small fields, as OpenAI and vLLM bound them
    max_stop: int = 16
    max_stop_chars: int = 1024
    max_logit_bias: int = 1024
    max_stop_token_ids: int = 1024
    max_messages: int = 4096
    max_schema_depth: int = 64
    max_choice_options: int = 4096
