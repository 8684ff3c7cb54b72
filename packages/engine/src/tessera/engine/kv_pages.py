"""An engine's KV cache as pages a connector reads and writes: block ``b`` is page ``b`` of every
KV tensor. The connector sees only this object, so it can run wherever the tensors are (the
engine's process today, a worker of an executor later)."""

from __future__ import annotations

import math

import torch

from tessera.models import LayerKVCache

from .kv_wire import KVLayout


class KVPages:
    def __init__(self, caches: list[LayerKVCache]) -> None:
        if not caches:
            raise ValueError("a KV cache with no tensors has no pages")
        self.caches = caches
        _, _, block_size, heads, head_dim = caches[0].data.shape
        scales = caches[0].scales is not None
        per_block = sum(_page_nbytes(t) for c in caches for t in (c.data, c.scales) if t is not None)
        self.layout = KVLayout(
            block_size=block_size,
            num_tensors=len(caches),
            dtype=str(caches[0].data.dtype).removeprefix("torch."),
            num_kv_heads=heads,
            head_dim=head_dim,
            scales=scales,
            block_nbytes=per_block,
        )

    def _tensors(self):
        for c in self.caches:
            yield c.data
            if c.scales is not None:
                yield c.scales

    @torch.inference_mode()
    def read(self, block_ids: list[int]) -> list[memoryview]:
        """The blocks' bytes in wire order (kv_wire.py), as host buffers."""
        idx = torch.tensor(block_ids, dtype=torch.long, device=self.caches[0].data.device)
        out = []
        for t in self._tensors():
            rows = t[:, idx].to("cpu").contiguous()  # [2, n, block_size, heads(, head_dim)]
            out.append(memoryview(rows.view(torch.uint8).numpy()).cast("B"))
        return out

    @torch.inference_mode()
    def write(self, block_ids: list[int], data: torch.Tensor) -> None:
        """Store ``data`` (uint8 on the host, the blocks' bytes in wire order) into the pages."""
        n = len(block_ids)
        if data.numel() != n * self.layout.block_nbytes:
            raise ValueError(f"{data.numel()} bytes for {n} blocks of {self.layout.block_nbytes}")
        device = self.caches[0].data.device
        idx = torch.tensor(block_ids, dtype=torch.long, device=device)
        off = 0
        for t in self._tensors():
            shape = (2, n, *t.shape[2:])
            size = math.prod(shape) * t.element_size()
            t[:, idx] = data[off : off + size].view(t.dtype).view(shape).to(device)
            off += size
        if device.type == "cuda":  # the engine's next step reads these pages
            torch.cuda.current_stream(device).synchronize()


def _page_nbytes(t: torch.Tensor) -> int:
    return 2 * math.prod(t.shape[2:]) * t.element_size()
