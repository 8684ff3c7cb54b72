"""Collective ops of the tensor-parallel ranks: the sum of row-parallel layers' partial products,
and the gathering of a vocabulary-parallel LM head's logits.

Their reference is torch.distributed itself, which serves every device through the backend the
process group was made with (gloo on CPU, NCCL on CUDA and ROCm): a kernel backend may register
its own (an all-reduce over NVLink, say). With one rank the models never call them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .registry import reference

_group = None  # None: the default (world) process group


def set_tensor_parallel_group(group) -> None:
    """The process group the collectives run over; None (the default) is the world group, where
    every process is one tensor-parallel rank."""
    global _group
    _group = group


def tensor_parallel_group():
    return _group


@reference("all_reduce")
def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """``x`` summed over the tensor-parallel ranks, in place; returns ``x``."""
    if x.is_contiguous():
        dist.all_reduce(x, group=_group)
    else:  # the collectives take dense tensors
        dense = x.contiguous()
        dist.all_reduce(dense, group=_group)
        x.copy_(dense)
    return x


@reference("all_gather")
def all_gather(x: torch.Tensor, dim: int = -1, sizes: list[int] | None = None) -> torch.Tensor:
    """The ranks' ``x`` concatenated along ``dim`` in rank order. ``sizes`` gives each rank's
    length along ``dim`` where they differ (None: all as long as this rank's); shorter parts
    travel padded to the longest and are cut after."""
    ranks, me = dist.get_world_size(_group), dist.get_rank(_group)
    dim = dim % x.dim()
    sizes = [x.shape[dim]] * ranks if sizes is None else list(sizes)
    if len(sizes) != ranks or sizes[me] != x.shape[dim]:
        raise ValueError(
            f"all_gather of sizes {sizes} over {ranks} ranks: rank {me} holds {x.shape[dim]} along dim {dim}"
        )
    longest = max(sizes)
    if x.shape[dim] < longest:
        pad = list(x.shape)
        pad[dim] = longest - x.shape[dim]
        x = torch.cat([x, x.new_zeros(pad)], dim)
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(ranks)]
    dist.all_gather(parts, x, group=_group)
    if longest == min(sizes):
        return torch.cat(parts, dim)
    return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, sizes, strict=True)], dim)
