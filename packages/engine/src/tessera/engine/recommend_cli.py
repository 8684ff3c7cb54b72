"""The ``tessera recommend`` command line (the measurements are in ``recommend``)."""

from __future__ import annotations

import argparse
import json
import sys

from .args import parse_size


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a .gguf file, an HF folder (GPTQ/AWQ/EXL2 too), or a known short name")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument(
        "--memory", type=parse_size, help="bytes the model may use, e.g. 24GiB (default: free now)"
    )
    p.add_argument("--context", type=int, default=4096, help="tokens per sequence (default: %(default)s)")
    p.add_argument("--batch", type=int, default=1, help="sequences at once (default: %(default)s)")
    p.add_argument(
        "--variant", action="append", default=[], metavar="MODEL",
        help="a converted variant of the model that exists (repeatable): measured as loaded",
    )  # fmt: skip
    p.add_argument("--eval", metavar="EVAL_JSON", help="tessera eval's eval.json: quality per variant")
    p.add_argument(
        "--candidates", choices=["all", "given"], default="all",
        help="all: the EXL2/GPTQ/GGUF ladder too; given: only the model and --variant files",
    )  # fmt: skip
    p.add_argument(
        "--verify", action="store_true",
        help="run the recommended variant (it must exist as a file) in a fresh process at --context and "
        "--batch and compare its peak memory with the prediction",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="one JSON object instead of the table")


def run(ns: argparse.Namespace) -> int:
    from tqdm import tqdm

    from . import recommend as r

    if ns.context < 1 or ns.batch < 1:
        raise ValueError(f"--context ({ns.context}) and --batch ({ns.batch}) must be at least 1")
    bar = tqdm(total=0, desc="measuring candidates", leave=False, disable=None, file=sys.stderr)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    rec = r.recommend(
        ns.model, ns.device, ns.memory, ns.context, ns.batch, ns.variant, r.load_evals(ns.eval),
        candidates=ns.candidates, progress=progress,
    )  # fmt: skip
    bar.close()
    out = rec.to_json()
    if ns.verify:
        if rec.choice is None:
            raise ValueError("nothing fits, so there is nothing to verify")
        out["verify"] = r.verify(rec, rec.choice)
    if ns.json:
        print(json.dumps(out))
        return 0
    print(r.table(rec))
    if ns.verify:
        v = out["verify"]
        print(
            f"check: {v['variant']} ({v['kv']} cache) ran {rec.batch} x {rec.context} tokens: peak "
            f"{v['peak'] / 2**30:.3f} GiB measured, {v['predicted'] / 2**30:.3f} GiB predicted "
            f"({v['error']:+.1%})"
        )
    return 0
