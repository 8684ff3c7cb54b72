"""``tessera convert --to exl2``'s options and run (the conversion is in ``convert_exl2``)."""

from __future__ import annotations

import argparse
import json
import sys

from .args import parse_size


def add_args(conv: argparse.ArgumentParser) -> None:
    """EXL2's options on ``tessera convert``'s parser (calibration, rows, damping, force and
    resume are shared with GPTQ)."""
    g = conv.add_argument_group("--to exl2")
    g.add_argument("--bpw", type=float, help="bits per weight of the decoder's linears, e.g. 4.25")
    g.add_argument("--head-bits", type=int, help="lm_head: 2, 3, 4, 5, 6 or 8 (default: 6)")
    g.add_argument("--measurement", metavar="FILE", help="reuse a measurement.json instead of measuring")
    g.add_argument(
        "--measure-rows", type=int, default=32,
        help="calibration rows the measurement runs on (at most --rows; default: %(default)s)",
    )  # fmt: skip
    g.add_argument(
        "--fit-memory", type=parse_size, metavar="SIZE",
        help="instead of --bpw: the largest bpw whose model and cache fit SIZE at --context (e.g. 2GiB)",
    )  # fmt: skip
    g.add_argument("--context", type=int, help="with --fit-memory: tokens per sequence")
    g.add_argument("--batch", type=int, default=1, help="with --fit-memory: sequences (default: %(default)s)")
    g.add_argument(
        "--device", default="cpu", help="with --fit-memory: cpu, cuda or cuda:N (default: %(default)s)"
    )


def _bpw(ns: argparse.Namespace) -> float:
    """``--bpw``, or the one ``--fit-memory`` picks (printed)."""
    if (ns.bpw is None) == (ns.fit_memory is None):
        raise ValueError("--to exl2 needs exactly one of --bpw and --fit-memory")
    if ns.bpw is not None:
        return ns.bpw
    if ns.context is None or ns.context < 1 or ns.batch < 1:
        raise ValueError("--fit-memory needs --context (and --batch) of at least 1")
    from .recommend import exl2_bpw_for

    bpw, kv = exl2_bpw_for(ns.src, ns.device, ns.fit_memory, ns.context, ns.batch)
    print(
        f"tessera: --fit-memory {ns.fit_memory / 2**30:.2f} GiB at {ns.context} tokens x {ns.batch} on "
        f"{ns.device}: {bpw} bpw (KV cache: {kv})",
        file=sys.stderr,
    )
    return bpw


def run(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from tessera.formats.calibration import default_text

    from .convert import Calibration
    from .convert_exl2 import convert_exl2
    from .model_source import resolve_model

    bpw = _bpw(ns)
    cal = Calibration(Path(ns.calibration) if ns.calibration else default_text(), ns.rows, ns.row_length)
    report = convert_exl2(
        resolve_model(ns.src), Path(ns.dst), bpw, cal, head_bits=6 if ns.head_bits is None else ns.head_bits,
        measurement=Path(ns.measurement) if ns.measurement else None, measure_rows=ns.measure_rows,
        damp=ns.damp, force=ns.force, resume=ns.resume,
    )  # fmt: skip
    errors = sorted(report.errors.values())
    print(
        json.dumps(
            {
                "destination": ns.dst,
                "target_bpw": bpw,
                "decoder_bpw": round(report.bpw, 4),
                "lm_head": report.head,
                "measured": report.measured,
                "measure_seconds": round(report.measure_seconds, 1),
                "seconds": round(report.seconds, 1),
                "median_relative_output_error": errors[len(errors) // 2] if errors else None,
                "max_relative_output_error": errors[-1] if errors else None,
            }
        )
    )
    return 0
