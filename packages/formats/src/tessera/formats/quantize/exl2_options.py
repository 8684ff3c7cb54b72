"""EXL2 candidate settings for one linear, as exllamav2's ``conversion/qparams.py`` describes them:
a list of bit widths (widest first), the proportion of the inputs each covers and the group size
of each, 4-bit scales. With act-order the first groups hold the most salient inputs, so a mix
like ``[5, 4]`` at ``[0.1, 0.9]`` spends its extra bit where the Hessian carries most energy.

``layout`` cuts a matrix's inputs into groups the way exllamav2's ``AdaptiveGPTQ.configure`` and
``quantize`` do (``ceil(min(in * p, left) / size)`` groups per width, the last one clipped at the
end), and ``total_bits`` counts what exllamav2's ``QParams.total_bits`` counts: the packed
integers, 16 bits of ``q_scale_max`` and 32 of ``q_groups`` per group, ``scale_bits`` per group and
output (``q_scale``), 32 per input (``q_invperm``), 16 per bias element.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..exl2 import EXL2_BITS, MAX_INPUTS, group_step


@dataclass(frozen=True)
class EXL2Option:
    """One setting: ``bits[i]`` covers about ``bits_prop[i]`` of the inputs in groups of
    ``group_size[i]``; scales are ``scale_bits`` wide (exllamav2 always uses 4)."""

    group_size: tuple[int, ...]
    bits: tuple[int, ...]
    bits_prop: tuple[float, ...]
    scale_bits: int = 4

    def __post_init__(self) -> None:
        n = len(self.bits)
        if n == 0 or len(self.group_size) != n or len(self.bits_prop) != n:
            raise ValueError(f"{self}: bits, bits_prop and group_size must be equally long and not empty")
        if any(b not in EXL2_BITS for b in self.bits) or list(self.bits) != sorted(self.bits, reverse=True):
            raise ValueError(f"bits {list(self.bits)}: EXL2 widths {EXL2_BITS}, widest first")
        if len(set(self.bits)) != n:
            raise ValueError(f"bits {list(self.bits)} name a width twice")
        if any(g <= 0 or g % group_step(b) for g, b in zip(self.group_size, self.bits, strict=True)):
            raise ValueError(f"group sizes {list(self.group_size)} are not multiples of 32 (16 at 2 bits)")
        if any(p <= 0 for p in self.bits_prop) or abs(sum(self.bits_prop) - 1) > 1e-6:
            raise ValueError(f"bits_prop {list(self.bits_prop)} are not positive fractions summing to 1")
        if self.scale_bits != 4:
            raise ValueError(f"scale_bits {self.scale_bits}: EXL2 stores 4-bit scales")

    @staticmethod
    def uniform(group_size: int, bits: list[int], bits_prop: list[float]) -> EXL2Option:
        """exllamav2's ``QParams(group_size, bits, bits_prop, 4)`` with one size for every width."""
        return EXL2Option((group_size,) * len(bits), tuple(bits), tuple(bits_prop))

    @property
    def desc(self) -> str:
        """exllamav2's description, e.g. ``0.1:5b_32g/0.9:4b_32g s4``."""
        parts = [f"{p}:{b}b_{g}g" for g, b, p in zip(self.group_size, self.bits, self.bits_prop, strict=True)]
        return "/".join(parts) + f" s{self.scale_bits}"

    def to_dict(self) -> dict:
        """As exllamav2's ``QParams.get_dict`` (group size keyed by width) for measurement.json."""
        return {
            "group_size": {str(b): g for b, g in zip(self.bits, self.group_size, strict=True)},
            "bits": list(self.bits),
            "bits_prop": list(self.bits_prop),
            "scale_bits": self.scale_bits,
        }

    @staticmethod
    def from_dict(d: dict) -> EXL2Option:
        """The inverse of ``to_dict`` (also takes one group size for every width, as exllamav2
        does); a ValueError naming what is wrong."""
        if not isinstance(d, dict) or not {"group_size", "bits", "bits_prop"} <= d.keys():
            raise ValueError(f"{d!r} is not an option with group_size, bits and bits_prop")
        bits, props, gs = d["bits"], d["bits_prop"], d["group_size"]
        if not isinstance(bits, list) or not isinstance(props, list):
            raise ValueError(f"{d!r}: bits and bits_prop must be lists")
        try:
            sizes = [int(gs[str(b)]) for b in bits] if isinstance(gs, dict) else [int(gs)] * len(bits)
            return EXL2Option(
                tuple(sizes),
                tuple(int(b) for b in bits),
                tuple(float(p) for p in props),
                d.get("scale_bits", 4),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"{d!r}: group_size does not give a size for every width ({e})") from e

    def layout(self, n_in: int) -> tuple[list[int], list[int]]:
        """(group sizes, group bits) along the stored input order of a matrix with ``n_in`` inputs."""
        counts, left = [], n_in
        for g, p in zip(self.group_size, self.bits_prop, strict=True):
            k = max(0, math.ceil(min(n_in * p, left) / g))
            counts.append(k)
            left -= k * g
        sizes, bits, a = [], [], 0
        for g, b, k in zip(self.group_size, self.bits, counts, strict=True):
            for _ in range(k):
                if a < n_in:
                    sizes.append(min(g, n_in - a))
                    bits.append(b)
                    a += sizes[-1]
        if a != n_in:
            raise ValueError(f"{self.desc}: its groups cover {a} of {n_in} inputs")
        return sizes, bits

    def check(self, n_out: int, n_in: int) -> None:
        """A ValueError where exllamav2 could not store a ``[n_out, n_in]`` matrix this way."""
        if n_out % 32:
            raise ValueError(f"{n_out} outputs: EXL2 stores outputs in multiples of 32")
        if n_in > MAX_INPUTS:
            raise ValueError(f"{n_in} inputs: EXL2 permutations hold at most {MAX_INPUTS}")
        for size, b in zip(*self.layout(n_in), strict=True):
            if size % group_step(b):
                raise ValueError(
                    f"{n_in} inputs: a {b}-bit group of {size} is not a multiple of {group_step(b)}"
                )

    def total_bits(self, n_out: int, n_in: int, bias: bool = False) -> int:
        """Bits stored for a ``[n_out, n_in]`` weight (and its fp16 bias) in this setting."""
        sizes, bits = self.layout(n_in)
        groups = len(sizes)
        total = sum(s * b for s, b in zip(sizes, bits, strict=True)) * n_out  # q_weight
        total += groups * (16 + 32)  # q_scale_max, q_groups
        total += groups * n_out * self.scale_bits  # q_scale
        total += n_in * 32  # q_invperm
        return total + (16 * n_out if bias else 0)

    def bpw(self, n_out: int, n_in: int) -> float:
        return self.total_bits(n_out, n_in) / (n_out * n_in)


_U = EXL2Option.uniform
# The settings a decoder linear may get: a subset of exllamav2's qparams_attn / qparams_mlp lists
# (about 2.2 to 8 bpw at 576-1536 inputs), one list for every linear so that a measurement pass
# solves 12 GPTQ problems per linear.
CANDIDATES: tuple[EXL2Option, ...] = (
    _U(64, [3, 2], [0.05, 0.95]),
    _U(64, [3, 2], [0.25, 0.75]),
    _U(128, [4, 3], [0.1, 0.9]),
    _U(32, [4, 3], [0.25, 0.75]),
    _U(128, [4], [1.0]),
    _U(32, [5, 4], [0.1, 0.9]),
    _U(32, [5, 4], [0.25, 0.75]),
    _U(64, [5], [1.0]),
    _U(32, [6, 5], [0.1, 0.9]),
    _U(128, [6], [1.0]),
    _U(128, [8, 6], [0.1, 0.9]),
    _U(128, [8], [1.0]),
)

# lm_head by --head-bits, as exllamav2's qparams_headoptions
HEAD_OPTIONS: dict[int, EXL2Option] = {
    2: _U(32, [4, 2], [0.3, 0.7]),
    3: _U(32, [4, 3], [0.15, 0.85]),
    4: _U(32, [6, 4], [0.15, 0.85]),
    5: _U(128, [6, 5], [0.15, 0.85]),
    6: _U(128, [8, 6], [0.15, 0.85]),
    8: _U(128, [8], [1.0]),
}
