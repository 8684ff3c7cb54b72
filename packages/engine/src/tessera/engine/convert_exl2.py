"""``tessera convert --to exl2``: a mixed-bit EXL2 folder at a bits-per-weight budget, made the way
exllamav2's converter makes one (``conversion/measure.py``, ``optimize.py``, ``quantize.py``):

1. measurement: the decoder runs layer by layer on the calibration rows with its original weights
   (as exllamav2 measures), and every linear is quantized at every candidate setting
   (``formats.quantize.exl2_options.CANDIDATES``) by the GPTQ solver against its input Hessian;
   each candidate's error is the solver's relative output error
   ``trace((W-Q) H (W-Q)^T) / trace(W H W^T)``. exllamav2 instead measures whole attention or MLP
   blocks over combinations of settings on the layer's output; per-linear errors need one solve
   per (linear, setting) rather than one forward per combination, which is what a CPU affords.
   The result is ``measurement.json`` (exllamav2's shape, one entry per linear).
2. allocation: one setting per linear minimising the summed error weighted by each linear's
   parameter count, with the decoder's stored bits (exllamav2's count: integers, scales, group
   table, permutation, bias) at most ``bpw`` times its weights (``exl2_allocate``).
3. quantization: ``convert.convert`` again, with each linear's setting, the quantized layers'
   outputs feeding the next layer; the lm_head (untied, vocabulary a multiple of 32) at
   ``head_bits`` on the final norm's output; written with ``write_exl2_folder``.

The measurement pass is resumable like any conversion (its state folder is
``.DST.measure.convert-state``); a finished measurement waits in ``.DST.measurement.json`` until
the folder is written, so an interrupted quantization pass does not measure again.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tessera.formats import FormatError, open_checkpoint
from tessera.formats.exl2_write import exl2_parts, exl2_scale_grid, write_exl2_folder
from tessera.formats.quantize import HessianFactor, OutputError, QuantResult, factor_hessian, gptq_quantize
from tessera.formats.quantize.exl2_allocate import allocate
from tessera.formats.quantize.exl2_options import CANDIDATES, HEAD_OPTIONS, EXL2Option

from .convert import (
    _HF_CLASSES,
    Calibration,
    QuantizedLinear,
    _fingerprint,
    _hf_config,
    _plain_tensors,
    _staging,
    _storage_dtype,
    _write_side_files,
    calibration_rows,
    check_destination,
    convert,
    head_hessian,
)

MEASUREMENT_VERSION = 1
_ERRORS = "exl2_errors"  # the per-candidate errors of a linear, as a state tensor <linear>.exl2_errors


@dataclass(frozen=True)
class LinearShape:
    out: int
    inp: int
    bias: bool

    @property
    def numel(self) -> int:
        return self.out * self.inp


def linear_shapes(config) -> dict[str, LinearShape]:
    """The decoder's linears under their HF names, from the model config."""
    c = config
    h, q, kv, inter = (
        c.hidden_size,
        c.num_attention_heads * c.head_dim,
        c.num_key_value_heads * c.head_dim,
        c.intermediate_size,
    )
    per_layer = {
        "self_attn.q_proj": LinearShape(q, h, c.qkv_bias),
        "self_attn.k_proj": LinearShape(kv, h, c.qkv_bias),
        "self_attn.v_proj": LinearShape(kv, h, c.qkv_bias),
        "self_attn.o_proj": LinearShape(h, q, c.o_bias),
        "mlp.gate_proj": LinearShape(inter, h, c.mlp_bias),
        "mlp.up_proj": LinearShape(inter, h, c.mlp_bias),
        "mlp.down_proj": LinearShape(h, inter, c.mlp_bias),
    }
    return {f"model.layers.{i}.{k}": s for i in range(c.num_hidden_layers) for k, s in per_layer.items()}


def exl2_scales(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int):
    """The solver's ``ScaleFn`` for EXL2: a group's scales moved onto exllamav2's 4-bit grid
    under the group's fp16 maximum, so the weights are rounded with the scales that are stored."""
    levels, q_scale_max, exact = exl2_scale_grid(scale[:, None])
    return exact[:, 0], zero, (levels[:, 0], q_scale_max[0])


def quantize_exl2(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    option: EXL2Option,
    damp: float,
    factor: HessianFactor | None = None,
    error: OutputError | None = None,
) -> QuantResult:
    """GPTQ with act-order at ``option``'s groups and widths (most salient inputs in the widest).
    ``factor`` and ``error``: see ``gptq_quantize`` (the measurement shares them across candidates)."""
    sizes, bits = option.layout(weight.shape[1])
    return gptq_quantize(
        weight, hessian, group_bits=bits, group_size=sizes, sym=True, act_order=True, damp=damp,
        scale_fn=exl2_scales, factor=factor, error=error,
    )  # fmt: skip


@dataclass(frozen=True)
class MeasureTarget:
    """The measurement pass as a ``LayerQuantizer``: every candidate is solved, its error kept as
    the state tensor ``<linear>.exl2_errors``; the original weight goes on (error 0), as
    exllamav2 measures each layer on the unquantized model's states."""

    candidates: tuple[EXL2Option, ...]
    damp: float
    name: str = "exl2 measure"

    def options(self) -> dict:
        return {"candidates": [o.desc for o in self.candidates], "damp": self.damp}

    def check(self, config, src) -> None:
        """Nothing left: ``_check_inputs`` checked every candidate against its shape."""

    def quantize(self, name: str, weight: torch.Tensor, hessian: torch.Tensor) -> QuantizedLinear:
        # one Cholesky factor and one output energy for all candidates: they share W and H
        factor = factor_hessian(hessian, act_order=True, damp=self.damp)
        error = OutputError(weight, hessian)
        errors = [
            quantize_exl2(weight, hessian, o, self.damp, factor, error).output_error for o in self.candidates
        ]
        return QuantizedLinear({f"{name}.{_ERRORS}": torch.tensor(errors, dtype=torch.float64)}, weight, 0.0)

    def quantization_config(self) -> dict:
        return {}


@dataclass(frozen=True)
class EXL2Target:
    """The quantization pass: each linear at its allocated setting, stored as EXL2 parts."""

    plan: dict[str, EXL2Option]
    head: EXL2Option | None  # None: the lm_head stays as the source has it (tied or fp16)
    bpw: float
    head_bits: int
    calibration: dict
    damp: float
    name: str = "exl2"

    def options(self) -> dict:
        return {
            "plan": {n: o.desc for n, o in sorted(self.plan.items())},
            "head": None if self.head is None else self.head.desc,
            "damp": self.damp,
        }

    def check(self, config, src) -> None:
        """Nothing left: ``_check_inputs`` checked every setting of the plan against its shape."""

    def quantize(self, name: str, weight: torch.Tensor, hessian: torch.Tensor) -> QuantizedLinear:
        res = quantize_exl2(weight, hessian, self.plan[name], self.damp)
        parts = exl2_parts(res.groups)
        return QuantizedLinear(
            {f"{name}.{k}": v for k, v in parts.items()}, res.groups.dequantize(), res.output_error
        )

    def quantization_config(self) -> dict:
        from importlib.metadata import version

        cfg = {"quant_method": "exl2", "version": f"tessera:{version('tessera-engine')}", "bits": self.bpw}
        if self.head is not None:
            cfg["head_bits"] = self.head_bits
        return {**cfg, "calibration": self.calibration}


# -- measurement.json ----------------------------------------------------------------------------


def measurement_doc(
    shapes: dict[str, LinearShape],
    candidates: tuple[EXL2Option, ...],
    errors: dict[str, list[float]],
    about: dict,
) -> dict:
    """exllamav2's layout (``{"measurement": {module: [{"accuracy", "total_bits", <linear>: option}]}}``)
    with one module per linear; ``accuracy`` is ``1 - sqrt(error)`` (exllamav2's is one minus the
    output's relative Frobenius error); ``error`` and the ``tessera`` block are ours."""
    out = {}
    for name, s in shapes.items():
        short = name.rsplit(".", 1)[1]
        out[name] = [
            {
                "accuracy": 1 - math.sqrt(max(e, 0.0)),
                "total_bits": o.total_bits(s.out, s.inp, s.bias),
                short: o.to_dict(),
                "error": e,
            }
            for o, e in zip(candidates, errors[name], strict=True)
        ]
    return {
        "measurement": out,
        "tessera": {
            "version": MEASUREMENT_VERSION,
            "error": "relative output error trace((W-Q) H (W-Q)^T) / trace(W H W^T) of the GPTQ solver",
            "shapes": {n: [s.out, s.inp] for n, s in shapes.items()},
            **about,
        },
    }


def load_measurement(path: Path) -> dict:
    """A measurement.json's document; a FormatError where it is not one."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise FormatError(f"{path}: not a readable measurement.json ({e})") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("measurement"), dict):
        raise FormatError(f"{path}: no 'measurement' object")
    return doc


def measured_options(
    doc: dict, shapes: dict[str, LinearShape], path
) -> dict[str, list[tuple[EXL2Option, float]]]:
    """Per linear its measured (option, error) pairs from a measurement this converter wrote for
    a model of these shapes; a FormatError naming what does not fit."""
    meas = doc["measurement"]
    out = {}
    for name, s in shapes.items():
        entries = meas.get(name)
        if not isinstance(entries, list) or not entries:
            raise FormatError(f"{path}: no measurement of {name} (a measurement of another model?)")
        short = name.rsplit(".", 1)[1]
        got = []
        for k, entry in enumerate(entries):
            try:
                option = EXL2Option.from_dict(entry[short])
                option.check(s.out, s.inp)
                err = float(entry["error"])
            except (KeyError, TypeError, ValueError) as e:
                raise FormatError(f"{path}: {name} entry {k}: {e}") from e
            if not math.isfinite(err) or err < 0:
                raise FormatError(f"{path}: {name} entry {k}: error {err} is not a non-negative number")
            got.append((option, err))
        out[name] = got
    extra = sorted(set(meas) - set(shapes))
    if extra:
        raise FormatError(f"{path}: measures {extra[0]}, which this model does not have")
    return out


# -- the conversion ------------------------------------------------------------------------------


@dataclass
class EXL2Report:
    bpw: float  # the decoder's stored bits per weight
    measure_seconds: float  # 0 where a measurement was reused
    seconds: float
    measured: bool
    head: str  # what became of lm_head
    errors: dict[str, float] = field(default_factory=dict)
    plan: dict[str, str] = field(default_factory=dict)


def bpw_range(
    options: dict[str, list[tuple[EXL2Option, float]]], shapes: dict[str, LinearShape]
) -> tuple[float, float]:
    """The decoder's bits per weight with every linear at its smallest and at its largest option."""
    numel = sum(s.numel for s in shapes.values())
    bits = {
        n: [o.total_bits(shapes[n].out, shapes[n].inp, shapes[n].bias) for o, _ in opts]
        for n, opts in options.items()
    }
    return sum(min(b) for b in bits.values()) / numel, sum(max(b) for b in bits.values()) / numel


def plan_bits(options, shapes: dict[str, LinearShape], bpw: float) -> dict[str, int]:
    """Per linear the index of its option at ``bpw`` (see ``exl2_allocate``)."""
    numel = sum(s.numel for s in shapes.values())
    slots = {
        n: [(o.total_bits(shapes[n].out, shapes[n].inp, shapes[n].bias), e) for o, e in opts]
        for n, opts in options.items()
    }
    return allocate(slots, {n: float(shapes[n].numel) for n in slots}, math.floor(bpw * numel))


def _head_option(config, head_bits: int, log) -> EXL2Option | None:
    """The lm_head's setting. A head tied to the embeddings is written as its own quantized
    lm_head too (config.json then unties them): decode reads it every token, so at fp16 it would
    cost as many bytes as a 4-bit decoder of SmolLM2's size; the embedding table stays fp16."""
    if config.tie_word_embeddings:
        log(f"tessera: the tied lm_head is written as its own {head_bits}-bit lm_head (embeddings: fp16)")
    if config.vocab_size % 32:
        log(f"tessera: lm_head kept fp16: its {config.vocab_size} outputs are not a multiple of 32")
        return None
    return HEAD_OPTIONS[head_bits]


def _check_inputs(ck, src: Path, bpw: float, head_bits: int, options, shapes) -> None:
    if ck.config.architecture not in _HF_CLASSES:
        raise FormatError(
            f"{src}: converting architecture {ck.config.architecture!r} is not supported "
            f"(supported: {', '.join(_HF_CLASSES)})"
        )
    if head_bits not in HEAD_OPTIONS:
        raise ValueError(f"--head-bits {head_bits} is not one of {', '.join(map(str, HEAD_OPTIONS))}")
    for name, opts in options.items():
        s = shapes[name]
        for o, _ in opts:
            try:
                o.check(s.out, s.inp)
            except ValueError as e:
                raise FormatError(
                    f"{src}: {name} [{s.out}, {s.inp}] cannot be stored as {o.desc}: {e}"
                ) from e
    lo, hi = bpw_range(options, shapes)
    if not lo <= bpw <= hi:
        raise ValueError(
            f"--bpw {bpw}: this model's decoder can be stored at {lo:.3f} to {hi:.3f} bits per weight"
        )


def _measure(src: Path, dst: Path, cal: Calibration, shapes, damp: float, log) -> tuple[dict, float]:
    """The measurement pass (or the finished one waiting beside ``dst``): ``(doc, seconds)``."""
    target = MeasureTarget(CANDIDATES, damp)
    side = dst.parent / f".{dst.name}.measurement.json"
    fingerprint = _fingerprint(src, target, cal)
    try:
        saved = json.loads(side.read_text(encoding="utf-8"))
        if saved.get("tessera", {}).get("fingerprint") == fingerprint:
            log(f"tessera: reusing the finished measurement {side}")
            return saved, 0.0
    except (OSError, ValueError):
        pass
    t0 = time.perf_counter()
    about = {
        "source": str(src),
        "calibration": {"rows": cal.rows, "length": cal.row_length, "dataset": cal.path.name},
        "damp": damp,
        "fingerprint": fingerprint,
    }

    def collect(ck, model, _dst, _target, state) -> None:
        errors = {}
        for i in range(len(model.layer_specs)):
            for key, t in state.layer_tensors(i).items():
                errors[key.removesuffix(f".{_ERRORS}")] = t.tolist()
        doc = measurement_doc(shapes, CANDIDATES, errors, about)
        tmp = side.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, side)

    convert(src, dst.parent / f".{dst.name}.measure", target, cal, write=collect, log=log)
    return json.loads(side.read_text(encoding="utf-8")), time.perf_counter() - t0


def convert_exl2(
    src: Path,
    dst: Path,
    bpw: float,
    cal: Calibration,
    *,
    head_bits: int = 6,
    measurement: Path | None = None,
    measure_rows: int = 32,
    damp: float = 0.01,
    force: bool = False,
    resume: bool = False,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
) -> EXL2Report:
    """Convert ``src`` into an EXL2 folder at ``dst`` at ``bpw`` (see the module doc). Every input
    (destination, options, calibration text, measurement file) is checked before anything is
    written; ``measurement`` reuses a measurement.json instead of measuring. The measurement
    runs on the first ``measure_rows`` calibration rows (exllamav2 too measures on fewer rows
    than it quantizes with, 16 of 100 by default: the measurement solves every linear 12 times)."""
    t0 = time.perf_counter()
    src, dst = Path(src), Path(dst)
    if measure_rows <= 0:
        raise ValueError(f"--measure-rows {measure_rows} must be positive")
    check_destination(dst, force)
    ck = open_checkpoint(src)
    shapes = linear_shapes(ck.config)
    calibration_rows(ck, cal)
    doc = load_measurement(measurement) if measurement is not None else None
    measured = measured_options(doc, shapes, measurement) if doc is not None else None
    _check_inputs(
        ck, src, bpw, head_bits, measured or {n: [(o, 0.0) for o in CANDIDATES] for n in shapes}, shapes
    )
    head = _head_option(ck.config, head_bits, log)

    measure_seconds = 0.0
    if doc is None:
        measure_cal = Calibration(cal.path, min(cal.rows, measure_rows), cal.row_length)
        doc, measure_seconds = _measure(src, dst, measure_cal, shapes, damp, log)
        measured = measured_options(doc, shapes, "the measurement")
    pick = plan_bits(measured, shapes, bpw)
    plan = {n: measured[n][k][0] for n, k in pick.items()}
    cal_info = {"rows": cal.rows, "length": cal.row_length, "dataset": cal.path.name}
    target = EXL2Target(plan, head, bpw, head_bits, cal_info, damp)

    def write(ck, model, dst, target, state) -> None:
        _write_exl2(ck, model, dst, target, state, doc)

    report = convert(src, dst, target, cal, force=force, resume=resume, log=log, write=write)
    (dst.parent / f".{dst.name}.measurement.json").unlink(missing_ok=True)
    numel = sum(s.numel for s in shapes.values())
    stored = sum(plan[n].total_bits(s.out, s.inp, s.bias) for n, s in shapes.items())
    return EXL2Report(
        bpw=stored / numel,
        measure_seconds=measure_seconds,
        seconds=time.perf_counter() - t0,
        measured=measurement is None,
        head=(head.desc if head else "fp16") + (", untied" if ck.config.tie_word_embeddings and head else ""),
        errors=report.errors,
        plan={n: o.desc for n, o in plan.items()},
    )


def _head_parts(model, state, head: EXL2Option, damp: float) -> dict[str, torch.Tensor]:
    """lm_head quantized on the final norm's output of the last layer's (quantized) states."""
    res = quantize_exl2(model.lm_head.weight.float().contiguous(), head_hessian(model, state), head, damp)
    return {f"lm_head.{k}": v for k, v in exl2_parts(res.groups).items()}


def _write_exl2(ck, model, dst: Path, target: EXL2Target, state, measurement: dict) -> None:
    """The EXL2 folder: the source's own unquantized tensors, every layer's EXL2 parts, the
    quantized lm_head where there is one, config.json signed, measurement.json, tokenizer files."""
    dtype = _storage_dtype(ck)
    tensors = _plain_tensors(model, dtype)
    for i in range(len(model.layer_specs)):
        tensors.update(state.layer_tensors(i))
    untie = False
    if target.head is not None:
        tensors.pop("lm_head.weight", None)
        tensors.update(_head_parts(model, state, target.head, target.damp))
        untie = ck.config.tie_word_embeddings
    qcfg = target.quantization_config()
    with tempfile.TemporaryDirectory() as side, _staging(dst) as tmp:
        _write_side_files(ck, Path(side))
        extra = {p.name: p for p in Path(side).iterdir()}
        mode = tmp.stat().st_mode
        hf_config = _hf_config(ck, dtype, qcfg)
        if untie:
            hf_config["tie_word_embeddings"] = False
        write_exl2_folder(tmp, hf_config, tensors, qcfg, measurement, extra)
        # the writer's staging folder is private and safetensors writes 0600: keep ordinary modes
        os.chmod(tmp, mode)
        for f in tmp.iterdir():
            os.chmod(f, mode & 0o666)
