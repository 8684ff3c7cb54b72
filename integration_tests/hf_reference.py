"""transformers as the reference the integration tests compare with."""

from __future__ import annotations

import torch


def hf_greedy(hf, ids: list[int], n: int) -> list[int]:
    """Exactly ``n`` greedy tokens after ``ids`` (no stop at EOS)."""
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([ids]),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(ids) :].tolist()
