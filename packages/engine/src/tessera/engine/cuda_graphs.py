"""CUDA graphs of the model forward for pure-decode batches, as vLLM captures them.

At load the runner captures one graph per batch size in ``CAPTURE_SIZES`` (capped by
max_num_seqs), largest first, all on one memory pool: a smaller graph's activations fit in what
the larger ones already reserved. A step in which every request runs exactly one token and whose
batch fits a captured size replays the graph of the next size up; the runner pads the batch with
rows that write to a KV slot no request owns and drops their outputs. Every other step (prefill,
mixed, larger batches, ``--enforce-eager``) runs eagerly.

The graph machinery (graph class, pool, capture context) is injected so that the control flow
is tested without a GPU.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Iterable

import torch

from tessera.kernels import backend, implementations

logger = logging.getLogger(__name__)

CAPTURE_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def capture_sizes(max_num_seqs: int, sizes: Iterable[int] = CAPTURE_SIZES) -> list[int]:
    """The batch sizes to capture, ascending: those the scheduler can fill (<= max_num_seqs)."""
    return sorted(s for s in set(sizes) if 1 <= s <= max_num_seqs)


def decode_batch_size(num_scheduled_tokens: Iterable[int]) -> int | None:
    """The batch size of a pure-decode step (every request runs exactly one token), else None."""
    n = 0
    for tokens in num_scheduled_tokens:
        if tokens != 1:
            return None
        n += 1
    return n or None


def padded_size(batch: int, sizes: list[int]) -> int | None:
    """The smallest captured size that holds ``batch`` rows (``sizes`` ascending), or None."""
    i = bisect.bisect_left(sizes, batch)
    return sizes[i] if i < len(sizes) else None


def graph_blocker(device_type: str) -> str | None:
    """Why graphs cannot be captured on ``device_type`` (None: try). The torch reference
    attention reads seq_lens on the host, a sync no graph can hold; a backend may also declare
    ``cuda_graphs: False`` in its capabilities. Whatever passes here is still captured under
    watch: a capture that raises, or a graph that replays differently, turns graphs off."""
    if device_type != "cuda":
        return f"CUDA graphs need a CUDA device, not {device_type!r}"
    if device_type not in implementations("paged_attention"):
        return "paged_attention on cuda is the torch reference, which syncs with the host"
    declared = backend(device_type)
    if declared is not None and declared[1].get("cuda_graphs") is False:
        return f"the kernel backend {declared[0]} declares its ops not capturable (cuda_graphs: False)"
    return None


def _torch_capture(graph, pool):
    return torch.cuda.graph(graph, pool=pool)


class DecodeGraphs:
    """One captured forward per batch size.

    ``prepare(size)`` writes a dummy batch of ``size`` rows into the static inputs (outside the
    capture: it copies from the host); ``forward(size)`` runs the model on the static inputs'
    first ``size`` rows and returns the hidden states, the graph's static output.
    """

    def __init__(
        self,
        sizes: list[int],
        prepare: Callable[[int], None],
        forward: Callable[[int], torch.Tensor],
        *,
        new_graph: Callable[[], object] | None = None,
        new_pool: Callable[[], object] | None = None,
        capture: Callable[[object, object], object] = _torch_capture,
        synchronize: Callable[[], None] | None = None,
        warmups: int = 1,
    ) -> None:
        self.sizes = sorted(sizes)
        self.prepare = prepare
        self.forward = forward
        self.new_graph = new_graph or torch.cuda.CUDAGraph
        self.new_pool = new_pool or torch.cuda.graph_pool_handle
        self.capture_context = capture
        self.synchronize = synchronize or torch.cuda.synchronize
        self.warmups = warmups
        self.graphs: dict[int, tuple[object, torch.Tensor]] = {}
        self.pool = None
        self.disabled_reason: str | None = None

    @property
    def captured_sizes(self) -> list[int]:
        return sorted(self.graphs)

    def capture_all(self) -> bool:
        """Capture every size, largest first, on one shared pool. If any capture fails (an op
        on the path syncs with the host, say) no graph is kept: every step runs eagerly, and
        ``disabled_reason`` says why."""
        self.pool = self.new_pool()
        try:
            for size in sorted(self.sizes, reverse=True):
                self.prepare(size)
                # eager runs first: kernels compile, autotune and allocate workspaces outside
                for _ in range(self.warmups):
                    self.forward(size)
                self.synchronize()
                graph = self.new_graph()
                with self.capture_context(graph, self.pool):
                    out = self.forward(size)
                self.graphs[size] = (graph, out)
            self.synchronize()
        except Exception as e:  # noqa: BLE001 (any failure means: no graphs, run eagerly)
            self.disable(f"capture failed: {type(e).__name__}: {e}")
            return False
        return True

    def verify(self, size: int, rtol: float = 2e-2, atol: float = 2e-2) -> bool:
        """Replays the graph of ``size`` on the padding batch and compares it with the same
        forward run eagerly; a graph that replays differently (an op whose work the capture
        missed) turns graphs off rather than give wrong tokens."""
        self.prepare(size)
        eager = self.forward(size).float().clone()
        replayed = self.replay(size).float()
        self.synchronize()
        if torch.allclose(replayed, eager, rtol=rtol, atol=atol):
            return True
        diff = (replayed - eager).abs().max().item()
        self.disable(f"the graph of batch size {size} replays differently from eager (max difference {diff})")
        return False

    def disable(self, reason: str) -> None:
        self.graphs.clear()
        self.pool = None
        self.disabled_reason = reason
        logger.warning("CUDA graphs off, every step runs eagerly: %s", reason)

    def size_for(self, num_scheduled_tokens: Iterable[int]) -> int | None:
        """The captured size a step replays, or None when it runs eagerly."""
        if not self.graphs:
            return None
        batch = decode_batch_size(num_scheduled_tokens)
        return None if batch is None else padded_size(batch, self.captured_sizes)

    def replay(self, size: int) -> torch.Tensor:
        """Replays the graph of ``size`` over the static inputs; its static output (valid until
        the next replay: the graphs share one pool)."""
        graph, out = self.graphs[size]
        graph.replay()
        return out
