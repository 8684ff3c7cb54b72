"""Which layers share a block table: layers partitioned into groups of equal size, one kind of
attention per group.

All groups draw blocks from one pool. A block id belongs to one group at a time, and holds the
K/V of that group's layers: the j-th layer of every group writes physical tensor j, so the
runner allocates ``group_size`` tensors, not one per layer, and groups never collide. A model
whose layers all attend the same way has a single group of all its layers; Gemma 3 270M (18
layers, every sixth full, the rest sliding over 512 tokens) has one full group and five sliding
groups of 3 layers each, and its sliding groups hold only the blocks of their window.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class KVCacheSpec:
    """What one attention layer keeps: every token (``sliding_window`` None) or the last
    ``sliding_window`` tokens. The shape fields are for the runner; the block bookkeeping reads
    only the window."""

    sliding_window: int | None = None
    num_kv_heads: int = 0
    head_dim: int = 0

    def __post_init__(self) -> None:
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be at least 1, got {self.sliding_window}")

    @property
    def is_sliding(self) -> bool:
        return self.sliding_window is not None

    def max_blocks(self, num_tokens: int, block_size: int, tokens_per_step: int | None = None) -> int:
        """The most blocks one request of ``num_tokens`` tokens holds at once when a step
        computes at most ``tokens_per_step`` of them (None: all in one step). A sliding layer
        holds the window before the step's first token and the step's own tokens."""
        whole = cdiv(num_tokens, block_size)
        if self.sliding_window is None or tokens_per_step is None:
            return whole
        return min(whole, cdiv(self.sliding_window + tokens_per_step - 2, block_size) + 1)


@dataclass(frozen=True)
class KVCacheGroup:
    spec: KVCacheSpec
    layers: tuple[int, ...]  # model layer indices; layers[j] uses physical tensor j


@dataclass(frozen=True)
class KVCacheGroups:
    groups: tuple[KVCacheGroup, ...]
    group_size: int  # KV tensors the runner allocates: a block id is this many layers' pages

    def __len__(self) -> int:
        return len(self.groups)

    @property
    def specs(self) -> tuple[KVCacheSpec, ...]:
        return tuple(g.spec for g in self.groups)

    @property
    def num_layers(self) -> int:
        return sum(len(g.layers) for g in self.groups)

    def layer_slot(self, layer: int) -> tuple[int, int]:
        """(group, index within the group: the physical tensor) of a model layer."""
        for gi, g in enumerate(self.groups):
            if layer in g.layers:
                return gi, g.layers.index(layer)
        raise ValueError(f"layer {layer} is in no KV cache group (the model has {self.num_layers})")

    def blocks_for_context(
        self, num_tokens: int, block_size: int, tokens_per_step: int | None = None
    ) -> list[int]:
        """Per group, the most blocks one request of ``num_tokens`` tokens holds at once; their
        sum is what the pool must have for that request to run alone."""
        return [g.spec.max_blocks(num_tokens, block_size, tokens_per_step) for g in self.groups]


def group_layers(layer_specs: Sequence[KVCacheSpec]) -> KVCacheGroups:
    """Partition layers into groups of one spec each, all of one size (vLLM's rule: the fewest
    layers any spec has, or the most if the counts are within 25% of each other; a spec's last
    group may be short, its missing layers' pages unused). Full-attention groups come first."""
    if not layer_specs:
        raise ValueError("a model needs at least one layer with a KV cache")
    by_spec: dict[KVCacheSpec, list[int]] = {}
    for i, spec in enumerate(layer_specs):
        by_spec.setdefault(spec, []).append(i)
    counts = [len(layers) for layers in by_spec.values()]
    size = min(counts)
    if max(counts) < size * 1.25:
        size = max(counts)
    order = sorted(by_spec, key=lambda s: (s.is_sliding, s.sliding_window or 0, by_spec[s][0]))
    groups = tuple(
        KVCacheGroup(spec, tuple(by_spec[spec][k : k + size]))
        for spec in order
        for k in range(0, len(by_spec[spec]), size)
    )
    return KVCacheGroups(groups, size)
