"""The CUDA C++ kernels of csrc/, built at first use with nvcc (hipcc under ROCm) for the GPU in
the machine and cached on disk, loaded with cffi.

The library's file name hashes the sources, the compiler and its version, the flags and the
target architecture, so a change to any of them builds a new one; it is written under a temporary
name and renamed into place, so processes starting together never load half a file. Where there
is no compiler, the build fails or the library cannot run on this GPU, ``library()`` is None (the
reason logged once) and the callers use the torch reference. ``TESSERA_NATIVE=0`` turns the
compiled kernels off, as for kernels-cpu.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = ["elementwise.cu", "qgemv.cu"]
HEADERS = ["gpu_compat.h"]
# -fmad=false / -ffp-contract=off: no FMA the source does not write, so every product the torch
# reference rounds is rounded here too (csrc/elementwise.cu)
FLAGS = {
    "nvcc": ["-O3", "-shared", "-Xcompiler", "-fPIC", "-std=c++17", "-fmad=false"],
    "hipcc": ["-O3", "-shared", "-fPIC", "-std=c++17", "-ffp-contract=off"],
}
ABI_VERSION = 2
CDEF = """
int tessera_cuda_abi_version(void);
int tessera_cuda_check(void);
const char* tessera_cuda_error_string(int code);
int tessera_cuda_rms_norm(void* out, const void* x, const void* weight, int64_t rows, int64_t n,
                          int64_t x_stride, float eps, int dtype, void* stream);
int tessera_cuda_fused_add_rms_norm(void* out, void* summed, const void* x, const void* residual,
                                    const void* weight, int64_t rows, int64_t n, int64_t x_stride,
                                    int64_t res_stride, float eps, int dtype, void* stream);
int tessera_cuda_rotary_embedding(void* q_out, void* k_out, const void* q, const void* k, const void* cos,
                                  const void* sin, int64_t tokens, int64_t q_heads, int64_t k_heads,
                                  int64_t head_dim, int64_t q_stride, int64_t k_stride, int dtype,
                                  int cs_dtype, void* stream);
int tessera_cuda_silu_and_mul(void* out, const void* x, int64_t rows, int64_t inter, int64_t x_stride,
                              int dtype, void* stream);
int tessera_cuda_gelu_tanh_and_mul(void* out, const void* x, int64_t rows, int64_t inter, int64_t x_stride,
                                   int dtype, void* stream);
int tessera_cuda_q8x2_quantize(void* xa, void* xb, void* xs, void* xsum, const void* x, int64_t M, int64_t K,
                               int64_t x_stride, int dtype, void* stream);
int tessera_cuda_qgemv(void* out, int64_t s_out, int out_dtype, const void* lo, const void* hi, const void* d,
                       const void* m, const void* bias, int bias_dtype, const void* xa, const void* xb,
                       const void* xs, const void* xsum, int64_t M, int64_t N, int64_t K, int64_t s_lo,
                       int64_t s_hi, int64_t s_d, int64_t s_m, int hi_bits, int group, int zero, int has_m,
                       void* stream);
"""
EXPORTS = re.findall(r"\b(tessera_cuda_\w+)\(", CDEF)


class BuildError(RuntimeError):
    """The compiler refused a source; the message holds the end of its output."""


def cache_dir() -> Path:
    if os.environ.get("TESSERA_CACHE_DIR"):
        return Path(os.environ["TESSERA_CACHE_DIR"]).expanduser() / "kernels_cuda"
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "tessera" / "kernels_cuda"


def find_compiler(compiler: str = "nvcc") -> str | None:
    """The path of nvcc ($CUDA_HOME, $CUDA_PATH, PATH, /usr/local/cuda) or hipcc ($ROCM_PATH,
    $HIP_PATH, PATH, /opt/rocm), or None."""
    if compiler == "nvcc":
        homes, default = ("CUDA_HOME", "CUDA_PATH"), "/usr/local/cuda"
    elif compiler == "hipcc":
        homes, default = ("ROCM_PATH", "HIP_PATH"), "/opt/rocm"
    else:
        raise ValueError(f"unknown compiler {compiler!r} (nvcc or hipcc)")
    for var in homes:
        if os.environ.get(var) and (p := Path(os.environ[var]) / "bin" / compiler).is_file():
            return str(p)
    found = shutil.which(compiler)
    if found:
        return found
    p = Path(default) / "bin" / compiler
    return str(p) if p.is_file() else None


def arch_flags(arch: str, compiler: str = "nvcc") -> list[str]:
    """Code generation flags for one target: ``"sm_90"``/``"90"``/``"9.0"`` for nvcc (the SASS and
    the PTX, so a newer GPU can still JIT it), a gfx name (``"gfx90a"``, with any ``:xnack-``
    features) for hipcc."""
    if compiler == "hipcc":
        if not arch.startswith("gfx"):
            raise ValueError(f"hipcc needs a gfx target such as gfx90a, not {arch!r}")
        return [f"--offload-arch={arch}"]
    digits = arch.removeprefix("sm_").removeprefix("compute_").replace(".", "")
    if not re.fullmatch(r"\d{2,3}[af]?", digits):
        raise ValueError(f"nvcc needs an architecture such as sm_80 or sm_90, not {arch!r}")
    sass, ptx = f"arch=compute_{digits},code=sm_{digits}", f"arch=compute_{digits},code=compute_{digits}"
    return ["-gencode", sass, "-gencode", ptx]


def _env(compiler: str) -> dict[str, str]:
    env = dict(os.environ)
    if compiler == "hipcc":
        # hipcc picks the NVIDIA platform by itself when it finds nvcc; these sources are built
        # for AMD with hipcc (and for NVIDIA with nvcc directly)
        env.setdefault("HIP_PLATFORM", "amd")
    return env


def compile_sources(
    out: Path | str, arch: str, compiler: str = "nvcc", sources: list[str] | None = None
) -> Path:
    """Build ``sources`` (default: all of csrc/) into the shared library ``out`` for ``arch``.

    Raises FileNotFoundError without the compiler and BuildError when it fails."""
    path = find_compiler(compiler)
    if path is None:
        raise FileNotFoundError(f"{compiler} not found ($CUDA_HOME/$ROCM_PATH, PATH)")
    srcs = [str(CSRC / s) for s in (sources or SOURCES)]
    cmd = [path, *FLAGS[compiler], *arch_flags(arch, compiler), "-o", str(out), *srcs]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(compiler))
    if r.returncode != 0:
        raise BuildError(f"{' '.join(cmd)} failed:\n{(r.stdout + r.stderr)[-4000:]}")
    return Path(out)


def _compiler_version(path: str, compiler: str) -> str:
    r = subprocess.run([path, "--version"], capture_output=True, text=True, env=_env(compiler))
    return r.stdout + r.stderr


def device_target() -> tuple[str, str]:
    """(compiler, arch) for the current GPU: hipcc and its gfx name under ROCm, else nvcc and sm_XY."""
    import torch

    if torch.version.hip is not None:
        return "hipcc", torch.cuda.get_device_properties(torch.cuda.current_device()).gcnArchName
    major, minor = torch.cuda.get_device_capability()
    return "nvcc", f"sm_{major}{minor}"


def _library_path(compiler: str, path: str, arch: str) -> Path:
    h = hashlib.sha256()
    for name in [*SOURCES, *HEADERS]:
        h.update((CSRC / name).read_bytes())
    h.update(" ".join([path, *FLAGS[compiler], *arch_flags(arch, compiler)]).encode())
    h.update(_compiler_version(path, compiler).encode())
    safe_arch = re.sub(r"[^A-Za-z0-9_]", "_", arch)
    return cache_dir() / f"kernels-{safe_arch}-{h.hexdigest()[:16]}.so"


@cache
def library():
    """``(ffi, lib)`` of the compiled kernels for the current GPU, or None (the reason logged once)."""
    if os.environ.get("TESSERA_NATIVE", "1") == "0":
        return None
    try:
        import cffi
    except ImportError:
        log.warning("tessera CUDA C++ kernels: cffi is not installed; using the torch reference ops")
        return None
    compiler, arch = device_target()
    path = find_compiler(compiler)
    if path is None:
        log.warning(
            "tessera CUDA C++ kernels: %s not found ($CUDA_HOME/$ROCM_PATH/bin, PATH); using the torch "
            "reference ops",
            compiler,
        )
        return None
    try:
        out = _library_path(compiler, path, arch)
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            log.info("tessera CUDA C++ kernels: building for %s with %s (once)", arch, path)
            with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
                tmp_out = Path(tmp) / out.name
                compile_sources(tmp_out, arch, compiler)
                os.replace(tmp_out, out)  # atomic: a concurrent process sees the whole file or none
        ffi = cffi.FFI()
        ffi.cdef(CDEF)
        lib = ffi.dlopen(str(out))
    except (OSError, BuildError, ValueError) as e:  # an unwritable cache, a failed build, a bad load
        log.warning("tessera CUDA C++ kernels unavailable (%s); using the torch reference ops", e)
        return None
    if lib.tessera_cuda_abi_version() != ABI_VERSION:
        log.warning("tessera CUDA C++ kernels: %s is of another ABI version; using the torch reference", out)
        return None
    # the runtime linked into the library may be newer than the driver, or the code not run on
    # this GPU: find out now rather than at the first launch
    rc = lib.tessera_cuda_check()
    if rc != 0:
        reason = ffi.string(lib.tessera_cuda_error_string(rc)).decode()
        log.warning("tessera CUDA C++ kernels cannot run here (%s); using the torch reference ops", reason)
        return None
    return ffi, lib


def launch(op: str, device, *args) -> None:
    """Call the launcher ``tessera_cuda_<op>`` with tensors passed as their device pointers (None
    as NULL), on ``device``'s current stream; a launcher's error code raises RuntimeError."""
    import torch

    ffi, lib = library()
    # the library's runtime launches on the thread's current device: make it the tensors' one
    switch = device.index != torch.cuda.current_device()
    with torch.cuda.device(device) if switch else contextlib.nullcontext():
        stream = torch.cuda.current_stream(device).cuda_stream
        conv = [
            ffi.cast("void *", a.data_ptr()) if isinstance(a, torch.Tensor) else ffi.NULL if a is None else a
            for a in args
        ]
        rc = getattr(lib, f"tessera_cuda_{op}")(*conv, ffi.cast("void *", stream))
    if rc != 0:
        reason = ffi.string(lib.tessera_cuda_error_string(rc)).decode()
        raise RuntimeError(f"tessera CUDA kernel {op} failed: {reason} (code {rc})")
