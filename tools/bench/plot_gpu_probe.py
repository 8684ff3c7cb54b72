"""Plot the probe stage of tools/gpu_check.py: each few-token kernel's bandwidth at Llama-3-8B's
shapes against cuBLAS on the same matrix in bf16 and the measured copy bandwidth.

    uv run python tools/bench/plot_gpu_probe.py docs/gpu/2026-12-04-s4-native.json docs/gpu-gemv.png

(Kernels the result lacks get no bar: the first GPU run had no ``native``.)
"""

from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("result", help="gpu_check.json with a probe stage")
    p.add_argument("out", help="the PNG to write")
    a = p.parse_args()
    r = json.loads(open(a.result).read())
    rows = [x for x in r["probe"]["kernels"] if x["tokens"] == 1]
    shapes = list(dict.fromkeys(x["shape"] for x in rows))

    def best(shape, kind):
        got = [x["tb_s"] for x in rows if x["shape"] == shape and x["kernel"] == kind]
        return max(got) if got else 0.0

    kinds = [
        ("dot", "Triton tl.dot, tokens padded to 16"),
        ("words", "Triton by packed words"),
        ("native", "CUDA C++ int8 dot products (csrc/qgemv.cu), with x's quantization"),
        ("cublas_bf16", "cuBLAS on the bf16 matrix (2 bytes a weight)"),
    ]
    kinds = [k for k in kinds if any(x["kernel"] == k[0] for x in rows)]
    fig, ax = plt.subplots(figsize=(9.5, 4.4))
    width = 0.8 / len(kinds)
    for i, (kind, label) in enumerate(kinds):
        xs = [j + (i - (len(kinds) - 1) / 2) * width for j in range(len(shapes))]
        ax.bar(xs, [best(s, kind) for s in shapes], width, label=label)
    copy = r["machine"].get("copy_tb_s")
    if copy:
        ax.axhline(copy, color="k", ls="--", lw=1, label=f"device copy, measured ({copy} TB/s)")
    first = {s: next(x for x in rows if x["shape"] == s) for s in shapes}
    labels = [f"{s}\n{first[s]['n']}x{first[s]['k']} {first[s]['scheme']}" for s in shapes]
    ax.set_xticks(range(len(shapes)), labels)
    ax.set_ylabel("bytes of the matrix read per second (TB/s)")
    ax.set_ylim(0, 1.45 * max([copy or 0.0] + [x["tb_s"] for x in rows]))  # room for the legend
    ax.set_title(
        f"One-token quantized linear on {r['machine'].get('gpu', 'the GPU')}, best tile of each kernel"
    )
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(a.out, dpi=120)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
