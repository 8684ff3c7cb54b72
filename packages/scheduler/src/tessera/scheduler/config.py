from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SchedulerConfig:
    max_model_len: int
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True
    policy: str = "fcfs"  # "fcfs" | "priority"
    # slots reserved past each running request's scheduled tokens for K/V a proposer writes after
    # the step (a draft model's: its k draft positions); never at the cost of a preemption
    num_lookahead_tokens: int = 0
    # encoder input tokens (images' placeholder tokens) one step may encode; None: as many as
    # max_num_batched_tokens (vLLM's max_num_encoder_input_tokens)
    max_num_encoder_input_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.policy not in ("fcfs", "priority"):
            raise ValueError(f"policy must be 'fcfs' or 'priority', got {self.policy!r}")
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_num_encoder_input_tokens is not None and self.max_num_encoder_input_tokens < 1:
            raise ValueError(
                f"max_num_encoder_input_tokens must be at least 1, got {self.max_num_encoder_input_tokens}"
            )
        if self.num_lookahead_tokens < 0:
            raise ValueError(f"num_lookahead_tokens must be at least 0, got {self.num_lookahead_tokens}")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"without chunked prefill max_num_batched_tokens ({self.max_num_batched_tokens}) "
                f"must be at least max_model_len ({self.max_model_len})"
            )

    @property
    def encoder_budget(self) -> int:
        """Encoder input tokens one step may encode."""
        return self.max_num_encoder_input_tokens or self.max_num_batched_tokens
