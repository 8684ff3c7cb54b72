"""Write a copy of a GGUF file whose decoder-layer matrices are requantized to another scheme, to
give ``tessera eval`` variants of one model where only one checkpoint is at hand.

Each ``blk.N.*`` matrix is dequantized and requantized with the ``gguf`` package's own
(reference) code; every other tensor (embedding, output head, norms) and all metadata are copied
unchanged. From a Q4_1 file, F16 and F32 hold its weights as they are (up to fp16 rounding), and
Q8_0, Q5_0, Q4_0 re-round them: a second quantization on top of the first. ``--embedding F16``
also stores the token embedding (the output head when tied) in that scheme: with ``--scheme Q4_1``
from a Q4_1 file it gives the GGUF twin of a GPTQ checkpoint, which keeps its head in 16 bits.

    uv run python tools/eval/requantize_gguf.py SRC.gguf OUT.gguf --scheme Q8_0
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import gguf
import numpy as np
from tqdm import tqdm

T = gguf.GGMLQuantizationType
SCHEMES = {
    "F32": T.F32,
    "F16": T.F16,
    "Q8_0": T.Q8_0,
    "Q5_1": T.Q5_1,
    "Q5_0": T.Q5_0,
    "Q4_1": T.Q4_1,
    "Q4_0": T.Q4_0,
}
_LAYER_MATRIX = re.compile(r"blk\.\d+\..+\.weight")


def copy_metadata(reader: gguf.GGUFReader, writer: gguf.GGUFWriter) -> None:
    """Every key-value field but those the writer writes itself."""
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)


def requantized(t, qtype: T) -> tuple[np.ndarray, T]:
    """The tensor's data in ``qtype`` (from its dequantized float32 values) and its type."""
    values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
    if qtype == T.F32:
        return values, qtype
    if qtype == T.F16:
        return values.astype(np.float16), qtype
    return gguf.quants.quantize(values, qtype), qtype


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--scheme", required=True, choices=SCHEMES)
    p.add_argument("--embedding", choices=SCHEMES, help="also requantize token_embd (default: copy)")
    args = p.parse_args()
    if args.out.exists():
        raise SystemExit(f"requantize_gguf: {args.out} exists; not overwriting it")
    reader = gguf.GGUFReader(args.src)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(str(args.out), arch)
    copy_metadata(reader, writer)
    qtype = SCHEMES[args.scheme]
    for t in tqdm(reader.tensors, desc=f"to {args.scheme}", leave=False, disable=None):
        if _LAYER_MATRIX.fullmatch(t.name) and len(t.shape) == 2:
            data, kind = requantized(t, qtype)
        elif t.name == "token_embd.weight" and args.embedding:
            data, kind = requantized(t, SCHEMES[args.embedding])
        else:
            data, kind = t.data, t.tensor_type
        writer.add_tensor(t.name, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


if __name__ == "__main__":
    main()
