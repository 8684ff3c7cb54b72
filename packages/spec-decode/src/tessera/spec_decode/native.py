"""The C of csrc/, built at first use with the machine's C compiler, cached on disk and loaded
with cffi: the same scheme as tessera-kernels-cpu's native.py (which this package may not import:
spec_decode depends on sampling and kernels only), without -march=native, since this code needs
no vector instructions.

The library's file name hashes the sources, the compiler and the flags, so a change to any of
them builds a new one; it is written under a temporary name and renamed into place, so processes
starting together never load half a file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

CSRC = Path(__file__).parent / "csrc"
SOURCES = ["ngram.c"]
CFLAGS = ["-O2", "-shared", "-fPIC", "-std=c11"]
CDEF = """
int tessera_ngram_propose(const int32_t* tokens, int64_t len, int min_n, int max_n, int k, int32_t* out);
int tessera_ngram_propose_batch(const int32_t* tokens, int64_t stride, const int64_t* lens, int64_t n_req,
                                int min_n, int max_n, const int32_t* k, int32_t* out, int64_t out_stride,
                                int32_t* counts);
"""


class NativeBuildError(RuntimeError):
    """The C library could not be built or loaded; the message says why."""


def cache_dir() -> Path:
    if os.environ.get("TESSERA_CACHE_DIR"):
        return Path(os.environ["TESSERA_CACHE_DIR"]).expanduser() / "spec_decode"
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "tessera" / "spec_decode"


@cache
def library():
    """``(ffi, lib)`` of the compiled C; NativeBuildError naming the reason where it cannot be had."""
    import cffi

    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise NativeBuildError(
            "the n-gram proposer is C built at first use, and no C compiler (cc, gcc, clang or $CC) was found"
        )
    sources = [CSRC / name for name in SOURCES]
    h = hashlib.sha256()
    for s in sources:
        h.update(s.read_bytes())
    h.update(" ".join([cc, *CFLAGS]).encode())
    out = cache_dir() / f"spec_decode-{h.hexdigest()[:16]}.so"
    try:
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
                tmp_out = Path(tmp) / out.name
                cmd = [cc, *CFLAGS, "-o", str(tmp_out), *map(str, sources)]
                r = subprocess.run(cmd, capture_output=True, text=True)
                if r.returncode != 0:
                    raise NativeBuildError(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
                os.replace(tmp_out, out)  # atomic: a concurrent process sees the whole file or none
        ffi = cffi.FFI()
        ffi.cdef(CDEF)
        return ffi, ffi.dlopen(str(out))
    except OSError as e:  # an unwritable cache folder, a library that does not load
        raise NativeBuildError(f"the n-gram proposer's C library is unavailable: {e}") from e
