"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"): quantize ``W [out, in]`` one input column at a time, each column's
rounding error spread over the columns not yet quantized through the inverse Hessian of the
layer's inputs, so that the layer's output on the calibration inputs moves as little as possible.

The mechanism follows the paper's Algorithm 1 as GPTQModel and exllamav2 run it:

- ``H = 2 X^T X / n`` of the layer's calibration inputs; an input no row ever activated
  (``H[i, i] == 0``) carries no signal: its weights become 0 and its diagonal 1.
- act-order: the columns are visited by descending ``diag(H)`` (the inputs that carry most
  energy first, while many columns are still left to absorb their error).
- damping: ``H + damp * mean(diag(H)) * I``, raised step by step until Cholesky succeeds.
- ``U`` = the upper Cholesky factor of ``H^-1``; row i of U is the update direction of
  column i and ``U[i, i]`` its scale (the paper's ``[H_F^-1]_qq`` in Cholesky form).
- lazy batches: inside a block of columns the update is applied column by column; the rest of
  the matrix gets the block's errors in one matmul at its end.
- groups: a group's scale and zero are found when its first column is reached, from the
  weights as they are then (with the errors of every earlier column already added). Blocks are
  cut at group boundaries, so a group's weights are always fully updated when it starts
  (GPTQModel reads a group that starts inside a block from the not-yet-updated matrix; with a
  group size that is a multiple of the block size the two are the same).

Groups run along the *stored* (visiting) order, so with act-order a group is a set of inputs of
similar salience, and ``group_bits`` may give each group its own width (EXL2: the first, most
salient groups get more bits).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import pairwise

import torch

from ..grouped import GroupQuant

# scale_fn(x [out, size], scale [out], zero [out], bits) -> (scale, zero) or (scale, zero, meta):
# moves a group's scales (and zeros) onto the grid they will be stored on, before its columns
# are rounded; ``x`` is the group's weights as they are when the group starts. Whatever ``meta``
# it returns is kept per group in QuantResult.scale_meta (EXL2 keeps its scale integers there).
ScaleFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], tuple]

_DAMP_STEP = 0.01  # added to the damping fraction each time Cholesky fails (as GPTQModel does)


@dataclass(frozen=True)
class QuantResult:
    """The quantized matrix and how far it moved.

    ``proxy_loss``: the GPTQ objective the solver minimises column by column, the sum over all
    weights of ``(w - q)^2 / U[i, i]^2`` (GPTQModel logs half of it divided by the sample count).
    ``output_error``: ``trace((W-Q) H (W-Q)^T) / trace(W H W^T)``, the output's squared error on
    the calibration inputs relative to the output's energy, with the undamped H."""

    groups: GroupQuant
    proxy_loss: float
    output_error: float
    damp: float  # the damping fraction that made H invertible
    scale_meta: tuple = ()  # per group, the third value scale_fn returned (where it did)


def group_sizes(n_in: int, group_size: int | Sequence[int], groups: int | None) -> list[int]:
    """Sizes of the groups along the stored order: ``group_size`` -1 is one group over every
    input, an int cuts equal groups (the last one shorter where it does not divide), a sequence
    gives every group's size. ``groups``: how many groups ``group_bits`` names (None: any)."""
    if isinstance(group_size, int):
        if group_size == -1:
            sizes = [n_in]
        elif group_size <= 0:
            raise ValueError(f"group_size {group_size} is not a positive size or -1")
        else:
            sizes = [min(group_size, n_in - a) for a in range(0, n_in, group_size)]
    else:
        sizes = [int(s) for s in group_size]
        if any(s <= 0 for s in sizes) or sum(sizes) != n_in:
            raise ValueError(f"group sizes {sizes[:4]}... do not cut {n_in} inputs into positive parts")
    if groups is not None and groups != len(sizes):
        raise ValueError(f"group_bits names {groups} groups, but the group sizes make {len(sizes)}")
    return sizes


def _blocks(starts: list[int], block: int) -> list[tuple[int, int]]:
    """Column ranges for the lazy updates: at most ``block`` columns, cut at group boundaries
    (a group longer than ``block`` is cut into blocks of its own)."""
    out: list[tuple[int, int]] = []
    open_at = 0
    for a, b in pairwise(starts):
        if b - a > block:
            if open_at < a:
                out.append((open_at, a))
            out.extend((k, min(k + block, b)) for k in range(a, b, block))
            open_at = b
        elif b - open_at > block:
            out.append((open_at, a))
            open_at = a
    if open_at < starts[-1]:
        out.append((open_at, starts[-1]))
    return out


def _find_params(x: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output row of ``x [out, size]``: min-max scale and zero over a range that includes 0.
    Symmetric: the range is ``[-amax, amax]`` with the zero at the middle code ``2**(bits-1)``.
    A row of zeros gets the range [-1, 1] so its scale stays finite."""
    maxq = (1 << bits) - 1
    xmin = x.min(dim=1).values.clamp(max=0)
    xmax = x.max(dim=1).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(xmax, -xmin)
        xmin = -xmax
    flat = (xmin == 0) & (xmax == 0)
    xmin = torch.where(flat, -1.0, xmin)
    xmax = torch.where(flat, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    if sym:
        zero = torch.full_like(scale, float(1 << (bits - 1)))
    else:
        zero = torch.round(-xmin / scale)
    return scale, zero


@dataclass(frozen=True)
class HessianFactor:
    """What the solver derives from ``H`` alone, for quantizing one weight many ways (EXL2's
    measurement solves every candidate setting against one Hessian): the dead inputs
    (``diag H == 0``), the act-order permutation (descending ``diag H``; None without act-order),
    ``U`` (upper Cholesky factor of the damped inverse, permuted) and the damping used."""

    dead: torch.Tensor
    perm: torch.Tensor | None
    u: torch.Tensor
    damp: float
    requested_damp: float

    @property
    def act_order(self) -> bool:
        return self.perm is not None


def factor_hessian(H: torch.Tensor, *, act_order: bool, damp: float = 0.01) -> HessianFactor:
    """``H``'s ``HessianFactor``: the float64 Cholesky work of ``gptq_quantize``, done once."""
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"H must be square, not {list(H.shape)}")
    if not H.isfinite().all():
        raise ValueError("H must be finite")
    if not 0 <= damp < 1:
        raise ValueError(f"damp {damp} is not a fraction in [0, 1)")
    h = H.detach().float().clone()
    dead = h.diagonal() == 0
    h.diagonal().masked_fill_(dead, 1.0)
    perm = torch.argsort(h.diagonal(), descending=True, stable=True) if act_order else None
    if perm is not None:
        h = h[perm][:, perm]
    u, used = _inverse_factor(h, damp)
    return HessianFactor(dead, perm, u, used, damp)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """The column loop is a chain of small ops on ``[out]`` vectors: waking a second thread for
    each costs more than it saves (measured 3-10x slower with 2 threads on 2 busy cores,
    SmolLM2's shapes), so it runs on one; the Cholesky work and the output error, large float64
    products, keep the caller's threads."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _inverse_factor(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """``U`` (upper Cholesky factor of ``(H + d * mean(diag H) * I)^-1``) and the fraction ``d``
    used: ``damp``, raised by 0.01 until the factorisation succeeds. Computed in float64."""
    h64 = h.double()
    mean = h64.diagonal().mean()
    eye = torch.eye(h.shape[0], dtype=torch.float64, device=h.device)
    d = damp
    while d < 1.0:
        lower, info = torch.linalg.cholesky_ex(h64 + d * mean * eye)
        if info.item() == 0:
            inv = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            if info.item() == 0 and upper.isfinite().all():
                return upper.float(), d
        d += _DAMP_STEP
    raise ValueError(f"the Hessian stays singular with up to {d - _DAMP_STEP:.2f} of its mean diagonal added")


def _check(w: torch.Tensor, h: torch.Tensor, bits: list[int], damp: float, block: int) -> None:
    if w.dim() != 2:
        raise ValueError(f"W must be [out, in], not {list(w.shape)}")
    if tuple(h.shape) != (w.shape[1], w.shape[1]):
        raise ValueError(f"H must be [{w.shape[1]}, {w.shape[1]}] for W {list(w.shape)}, not {list(h.shape)}")
    if not (w.isfinite().all() and h.isfinite().all()):
        raise ValueError("W and H must be finite")
    if any(not 1 <= b <= 8 for b in bits):
        raise ValueError(f"bit widths {sorted(set(bits))} outside 1..8")
    if not 0 <= damp < 1:
        raise ValueError(f"damp {damp} is not a fraction in [0, 1)")
    if block <= 0:
        raise ValueError(f"block {block} is not positive")


@torch.inference_mode()
def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    *,
    group_bits: int | Sequence[int],
    group_size: int | Sequence[int],
    sym: bool,
    act_order: bool,
    damp: float = 0.01,
    block: int = 128,
    scale_fn: ScaleFn | None = None,
    factor: HessianFactor | None = None,
    error: OutputError | None = None,
) -> QuantResult:
    """Quantize ``W [out, in]`` against ``H [in, in]`` (``2 X^T X / n`` of its inputs).

    ``group_bits``: one width for every group (GPTQ), or one per group in stored order (EXL2).
    ``group_size``: see ``group_sizes``. ``sym``: zero fixed at the middle code. ``act_order``:
    visit (and store) the inputs by descending ``diag(H)``. ``damp``: fraction of the mean
    diagonal added to H. ``block``: columns per lazy batch. ``scale_fn``: see ``ScaleFn``.
    ``factor``: ``factor_hessian(H, act_order=act_order, damp=damp)`` when the caller quantizes
    one weight several ways; ``error``: ``OutputError(W, H)`` likewise. The result is the same
    with or without them.
    """
    n_out, n_in = W.shape
    per_group = None if isinstance(group_bits, int) else [int(b) for b in group_bits]
    sizes = group_sizes(n_in, group_size, None if per_group is None else len(per_group))
    bits = per_group if per_group is not None else [int(group_bits)] * len(sizes)
    _check(W, H, bits, damp, block)
    starts = [0]
    for s in sizes:
        starts.append(starts[-1] + s)

    if factor is None:
        factor = factor_hessian(H, act_order=act_order, damp=damp)
    elif factor.act_order != act_order or factor.requested_damp != damp or factor.u.shape[0] != n_in:
        raise ValueError("factor was made for another act_order, damp or input size")
    w = W.detach().float().clone()
    w[:, factor.dead] = 0
    perm, u = factor.perm, factor.u
    if perm is not None:
        w = w[:, perm]

    q_int = torch.zeros((n_out, n_in), dtype=torch.uint8, device=w.device)
    deq = torch.zeros_like(w)
    scale = torch.zeros((n_out, len(sizes)), dtype=torch.float32, device=w.device)
    zero = torch.zeros_like(scale)
    meta: list = []
    loss = torch.zeros((), dtype=torch.float64, device=w.device)
    with _one_thread():
        _solve(w, u, starts, bits, sym, scale_fn, block, q_int, deq, scale, zero, meta, loss)
    groups = GroupQuant(
        (n_out, n_in), q_int, scale, zero, tuple(starts), tuple(bits), None if perm is None else perm.clone()
    )
    if error is None:
        error = OutputError(W, H)
    return QuantResult(
        groups,
        proxy_loss=float(loss),
        output_error=error(groups.dequantize()),
        damp=factor.damp,
        scale_meta=tuple(meta) if scale_fn is not None else (),
    )


def _solve(w, u, starts, bits, sym, scale_fn, block, q_int, deq, scale, zero, meta, loss) -> None:
    """The column loop over ``w`` (permuted), writing codes, dequantized columns, group scales and
    zeros, scale metadata and the proxy loss into the given buffers."""
    group_at = {a: g for g, a in enumerate(starts[:-1])}
    g = -1
    for i1, i2 in _blocks(starts, block):
        w1 = w[:, i1:i2].clone()
        u1 = u[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            col = i1 + i
            if col in group_at:
                g = group_at[col]
                b = starts[g + 1]  # a group that runs past the block started it (see _blocks)
                x = torch.cat([w1[:, i : b - i1], w[:, i2:b]], dim=1) if b > i2 else w1[:, i : b - i1]
                s, z, m = _group_params(x, bits[g], sym, scale_fn)
                scale[:, g], zero[:, g] = s, z
                meta.append(m)
            s, z = scale[:, g], zero[:, g]
            maxq = (1 << bits[g]) - 1
            col_w = w1[:, i]
            q = torch.clamp(torch.round(col_w / s) + z, 0, maxq)
            q_int[:, col] = q.to(torch.uint8)
            deq[:, col] = s * (q - z)
            d = u1[i, i]
            e = (col_w - deq[:, col]) / d
            loss += (e.double() ** 2).sum()
            w1[:, i:] -= e[:, None] * u1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ u[i1:i2, i2:]


def _group_params(x: torch.Tensor, bits: int, sym: bool, scale_fn: ScaleFn | None):
    """A group's (scale, zero, meta): min-max, then ``scale_fn`` where given; checked usable."""
    s, z = _find_params(x, bits, sym)
    m = None
    if scale_fn is not None:
        out = scale_fn(x, s, z, bits)
        s, z = out[0].float(), out[1].float()
        m = out[2] if len(out) > 2 else None
        if not (s.isfinite().all() and (s > 0).all()):
            raise ValueError("scale_fn returned a scale that is not finite and positive")
        if not ((z >= 0).all() and (z <= (1 << bits) - 1).all() and torch.equal(z, z.round())):
            raise ValueError(f"scale_fn returned a zero that is not an integer code of {bits} bits")
    return s, z, m


class OutputError:
    """``Q -> trace((W-Q) H (W-Q)^T) / trace(W H W^T)`` in float64 for one ``W`` and ``H``: the
    squared error of the layer's output on the calibration inputs relative to the output's own
    energy, with ``W``'s energy computed once (a measurement scores many ``Q`` of one weight)."""

    def __init__(self, W: torch.Tensor, H: torch.Tensor) -> None:
        self.w, self.h = W.detach().double(), H.detach().double()
        self.energy = ((self.w @ self.h) * self.w).sum()

    def __call__(self, Q: torch.Tensor) -> float:
        e = self.w - Q.double()
        num = ((e @ self.h) * e).sum()
        return float(num / self.energy) if self.energy > 0 else float(num)


def relative_output_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """``trace((W-Q) H (W-Q)^T) / trace(W H W^T)`` (see ``OutputError``)."""
    return OutputError(W, H)(Q)


def fp16_scales(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int):
    """A ``ScaleFn`` for checkpoints that store scales as float16 (GPTQ): the solver rounds with
    the scale the file will hold, so the written weights are the ones whose error it spread."""
    tiny = torch.finfo(torch.float16).tiny
    return scale.clamp(min=tiny).half().float(), zero
