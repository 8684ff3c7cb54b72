"""What the kernels of a device can do, as the engine asks it: no package names a backend."""

from __future__ import annotations

import torch

from .registry import backend


def preferred_dtype(device: torch.device | str) -> torch.dtype:
    """The compute dtype the device's kernels run fastest in: the declared backend's choice,
    else bf16 on accelerators and fp32 on CPUs (torch's reference ops are slower in bf16)."""
    kind = torch.device(device).type
    declared = backend(kind)
    if declared is not None and "preferred_dtype" in declared[1]:
        return declared[1]["preferred_dtype"]
    return torch.float32 if kind == "cpu" else torch.bfloat16
