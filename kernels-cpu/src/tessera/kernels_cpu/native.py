"""C kernels that need instructions Numba cannot emit (AVX512-BF16 dot products), built at first use
with the machine's C compiler for the machine's own CPU and cached on disk, like Numba's cache.

Where there is no compiler, or the CPU lacks the instructions, ``library()`` is None and the
callers keep their Numba/torch path. ``TESSERA_NATIVE=0`` turns the C kernels off.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

log = logging.getLogger(__name__)

SOURCES = ["attention_bf16.c", "elementwise_bf16.c", "qmatmul.c", "decoder_bf16.c", "moe.c", "pool.c"]
HEADERS = ["simd.h", "pool.h", "qmatmul.h"]
# -ffp-contract=off: no FMA the source does not write, so the arithmetic of a row is the source's
# in every layout and inlining context (batch invariance, csrc/attention_bf16.c)
CFLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-fno-math-errno", "-ffp-contract=off", "-fopenmp"]


def cache_dir() -> Path:
    if os.environ.get("TESSERA_CACHE_DIR"):
        return Path(os.environ["TESSERA_CACHE_DIR"]).expanduser() / "kernels_cpu"
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "tessera" / "kernels_cpu"


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU's model and flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(keep)))


def _compiler() -> str | None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    return cc


@cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels for this CPU, or None (the reason is logged once)."""
    if os.environ.get("TESSERA_NATIVE", "1") == "0":
        return None
    if platform.machine().lower() not in ("x86_64", "amd64"):
        log.info("tessera C kernels: x86-64 only; using the Numba/torch kernels")
        return None
    cc = _compiler()
    if cc is None:
        log.warning("tessera C kernels: no C compiler (cc/gcc/clang) found; using the Numba/torch kernels")
        return None
    src_dir = Path(__file__).parent / "csrc"
    sources = [src_dir / name for name in SOURCES]
    h = hashlib.sha256()
    for s in [*sources, *(src_dir / name for name in HEADERS)]:
        h.update(s.read_bytes())
    h.update(" ".join([cc, *CFLAGS]).encode())
    h.update(_cpu_signature().encode())
    out = cache_dir() / f"kernels-{h.hexdigest()[:16]}.so"
    try:
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
                tmp_out = Path(tmp) / out.name
                cmd = [cc, *CFLAGS, "-o", str(tmp_out), *map(str, sources), "-lpthread", "-lm"]
                r = subprocess.run(cmd, capture_output=True, text=True)
                if r.returncode != 0:
                    log.warning(
                        "tessera C kernels failed to build (%s); using the Numba/torch kernels",
                        r.stderr[-2000:],
                    )
                    return None
                os.replace(tmp_out, out)  # atomic: a concurrent process sees the whole file or none
        lib = ctypes.CDLL(str(out))
    except OSError as e:  # an unwritable cache folder, a library that does not load
        log.warning("tessera C kernels unavailable (%s); using the Numba/torch kernels", e)
        return None
    lib.tessera_attention_bf16_supported.restype = ctypes.c_int
    if not lib.tessera_attention_bf16_supported():
        log.info("tessera C kernels: this CPU lacks AVX512-BF16 or VNNI; using the Numba/torch kernels")
        return None
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.tessera_attention_bf16.argtypes = [p, p, p, p, p, p, i, p, i, i, i, i, i, ctypes.c_float, i, p, i]
    lib.tessera_attention_bf16.restype = i
    f = ctypes.c_float
    lib.tessera_rms_norm_bf16.argtypes = [p, p, p, p, p, i, i, f, i]
    lib.tessera_rotary_bf16.argtypes = [p, p, p, i, i, i, ctypes.c_int64, i]
    lib.tessera_silu_and_mul_bf16.argtypes = [p, p, i, i, i]
    lib.tessera_q_repack.argtypes = [i, p, i, i, p, p, p]
    lib.tessera_q_matmul.argtypes = [i, p, i, i, i, i, p, p, p, p, p, i, i]
    lib.tessera_q_matmul_ld.argtypes = [i, p, i, i, i, i, p, p, p, p, p, ctypes.c_int64, i, i]
    lib.tessera_q_matmul_parts.argtypes = [p, i, p, i, i, i, p, ctypes.c_int64, i, i]
    lib.tessera_q_gather_rows.argtypes = [i, p, p, p, i, i, p, i, p, i]
    lib.tessera_q_dequantize_t.argtypes = [i, p, p, p, i, i, p, i, i]
    lib.tessera_llama_layers_bf16.argtypes = [p, i, p, p, p, i]
    lib.tessera_moe.argtypes = [p, i, i, i, i, i, i, p, p, i, i, p, i, p, p, p, i]
    lib.tessera_moe_scratch_bytes.argtypes = [i, i, i, i, i, i]
    lib.tessera_moe_scratch_bytes.restype = ctypes.c_int64
    for fn in (
        lib.tessera_rms_norm_bf16,
        lib.tessera_rotary_bf16,
        lib.tessera_silu_and_mul_bf16,
        lib.tessera_q_repack,
        lib.tessera_q_matmul,
        lib.tessera_q_matmul_ld,
        lib.tessera_q_matmul_parts,
        lib.tessera_q_gather_rows,
        lib.tessera_q_dequantize_t,
        lib.tessera_llama_layers_bf16,
        lib.tessera_moe,
    ):
        fn.restype = i
    return lib
