"""GGUF variants of a model for quantization comparisons: its weights dequantized to F16 (the
baseline every variant is measured against), and llama.cpp's own quantizations of that F16 file.

    uv run --with llama-cpp-python==0.3.36 python tools/eval/gguf_variants.py SRC.gguf OUT_DIR \\
        [--types Q4_K_M Q4_K_S Q5_K_M Q6_K Q8_0]

Writes ``OUT_DIR/<stem>.F16.gguf`` (every tensor of SRC dequantized with the gguf package and
stored as F16, except 1-D tensors kept F32; all metadata copied) and, for each type,
``OUT_DIR/<stem>.<TYPE>.gguf`` made by llama.cpp's ``llama_model_quantize`` from the F16 file:
the quantizer nobody here wrote, with its own per-tensor type rules (Q4_K_M keeps some
v/down projections in Q6_K, and so on). A variant that exists is kept.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

# llama.cpp's file types (llama.h: enum llama_ftype)
FTYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16,
          "Q5_K_M": 17, "Q6_K": 18, "Q3_K_M": 12}  # fmt: skip


def dequantize_to_f16(src: Path, dst: Path) -> None:
    """SRC's tensors dequantized (gguf.quants) into an F16 GGUF with SRC's metadata."""
    import gguf

    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(dst, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        if name == "general.file_type":
            writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY and len(field.types) > 1 else None
        writer.add_key_value(name, field.contents(), vtype, sub)
    tensors = []
    for t in tqdm(reader.tensors, desc=f"dequantizing {src.name}", disable=None, file=sys.stderr):
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        shape = [int(d) for d in reversed(t.shape)]
        arr = values.reshape(shape).astype(np.float32 if len(shape) == 1 else np.float16)
        tensors.append((t.name, arr))
    for name, arr in tensors:
        writer.add_tensor(name, arr)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=True)
    writer.close()


def llama_cpp_quantize(f16: Path, dst: Path, ftype: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[ftype]
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(f16).encode(), str(dst).encode(), params)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize {ftype} failed ({rc})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--types", nargs="*", default=["Q4_K_M"], choices=sorted(FTYPES))
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    stem = a.src.name.split(".")[0]
    f16 = a.out / f"{stem}.F16.gguf"
    if not f16.exists():
        tmp = f16.with_suffix(".tmp")
        dequantize_to_f16(a.src, tmp)
        tmp.rename(f16)
    print(f16)
    for t in a.types:
        dst = a.out / f"{stem}.{t}.gguf"
        if not dst.exists():
            llama_cpp_quantize(f16, dst.with_suffix(".tmp"), t)
            dst.with_suffix(".tmp").rename(dst)
        print(dst)


if __name__ == "__main__":
    main()
