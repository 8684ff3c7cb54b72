"""Weight containers that every backend's ``linear`` understands."""

from __future__ import annotations

import torch


class RowStack:
    """Weights stacked by output rows that cannot be one tensor: projections fused into one
    matmul (q|k|v, gate|up) whose checkpoint tensors use different quantization schemes (a
    GGUF Q4_K_M file keeps some v projections in Q6_K and the q and k ones in Q4_K). Each part
    is what the backend's ``prepare_linear_weight`` made of it; the product is the parts'
    products side by side."""

    def __init__(self, parts: list) -> None:
        if not parts or len({p.shape[1] for p in parts}) != 1:
            raise ValueError("a row stack needs parts with the same number of inputs")
        self.parts = list(parts)
        self.shape = (sum(p.shape[0] for p in parts), parts[0].shape[1])

    @property
    def device(self) -> torch.device:
        return self.parts[0].device

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.cat(
            [p.to(dtype) if isinstance(p, torch.Tensor) else p.dequantize(dtype) for p in self.parts]
        )


class InputSegments:
    """A weight whose inputs are permuted, then cut into ranges each packed its own way: GPTQ
    with act-order and EXL2 (mixed bit widths along the inputs) as GGUF blocks.

    ``y = sum_s x[:, perm][:, k0_s:k1_s] @ W_s.T``: ``perm`` (int64 ``[in]``, or None for the
    identity) picks the stored order of the inputs; ``parts`` are ``(k0, k1, weight)`` with
    each weight ``[out, k1 - k0]`` as the backend's ``prepare_linear_weight`` made it, the
    ranges in order and covering all inputs. Backends gather the input columns once per step
    (the permutation moves activations, never the packed weights) and sum the parts' products
    in fp32."""

    def __init__(self, perm: torch.Tensor | None, parts: list) -> None:
        if not parts:
            raise ValueError("input segments need at least one part")
        n_out = parts[0][2].shape[0]
        k = 0
        for k0, k1, w in parts:
            if k0 != k or k1 <= k0 or tuple(w.shape) != (n_out, k1 - k0):
                raise ValueError(f"segment ({k0}, {k1}) of shape {tuple(w.shape)} does not follow input {k}")
            k = k1
        if perm is not None and tuple(perm.shape) != (k,):
            raise ValueError(f"a permutation of {tuple(perm.shape)} for {k} inputs")
        self.perm = perm
        self.parts = list(parts)
        self.shape = (n_out, k)

    @property
    def device(self) -> torch.device:
        return self.parts[0][2].device

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``[out, in]`` in input order."""
        stored = torch.cat(
            [w.to(dtype) if isinstance(w, torch.Tensor) else w.dequantize(dtype) for _, _, w in self.parts],
            dim=1,
        )
        if self.perm is None:
            return stored
        return torch.empty_like(stored).index_copy_(1, self.perm.to(stored.device), stored)


def segments_linear(linear, x: torch.Tensor, weight: InputSegments, bias, out_dtype) -> torch.Tensor:
    """``linear(x, weight, bias, out_dtype)`` for ``InputSegments`` through a backend's own
    ``linear`` for each part: the inputs gathered once, the parts' fp32 products summed in
    order (the same order at every batch size)."""
    xp = x if weight.perm is None else x.index_select(-1, weight.perm)
    out = None
    for k0, k1, w in weight.parts:
        y = linear(xp[..., k0:k1], w, None, torch.float32)
        out = y if out is None else out.add_(y)
    if bias is not None:
        out += bias
    return out.to(out_dtype or x.dtype)
