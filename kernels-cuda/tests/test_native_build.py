"""The CUDA C++ sources build without a GPU: with nvcc for sm_80 and sm_90 (the cards tessera
targets), and with hipcc for gfx90a through the portability header, exporting every launcher
native.py declares. Each test skips, saying why, where its compiler is absent."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tessera.kernels_cuda import native

NVCC = native.find_compiler("nvcc")
HIPCC = native.find_compiler("hipcc")


def exported(lib: Path) -> set[str]:
    """Names of the functions the shared library defines (``nm -D``, type T)."""
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm (binutils) not found: cannot list the exported symbols")
    out = subprocess.run([nm, "-D", "--defined-only", str(lib)], capture_output=True, text=True, check=True)
    rows = [line.split() for line in out.stdout.splitlines()]
    return {r[2] for r in rows if len(r) == 3 and r[1] == "T"}


def test_every_cu_source_in_csrc_is_built():
    assert sorted(native.SOURCES) == sorted(p.name for p in native.CSRC.glob("*.cu"))
    assert sorted(native.HEADERS) == sorted(p.name for p in native.CSRC.glob("*.h"))


@pytest.mark.skipif(NVCC is None, reason="nvcc not found ($CUDA_HOME/bin, PATH, /usr/local/cuda/bin)")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_sources_compile_with_nvcc_and_export_every_launcher(tmp_path, arch):
    lib = native.compile_sources(tmp_path / f"kernels-{arch}.so", arch, "nvcc")
    assert set(native.EXPORTS) <= exported(lib)


@pytest.mark.skipif(
    HIPCC is None, reason="hipcc not found ($ROCM_PATH/bin, PATH, /opt/rocm/bin; Debian: apt install hipcc)"
)
def test_sources_compile_with_hipcc_for_gfx90a_through_the_portability_header(tmp_path):
    lib = native.compile_sources(tmp_path / "kernels-gfx90a.so", "gfx90a", "hipcc")
    assert set(native.EXPORTS) <= exported(lib)
    assert b"gfx90a" in lib.read_bytes()  # the offload bundle holds code for the target


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_a_failing_build_raises_build_error_with_the_compiler_output(tmp_path):
    bad = tmp_path / "bad.cu"
    bad.write_text("__global__ void k() { undeclared_name = 1; }\n")
    with pytest.raises(native.BuildError, match="undeclared_name"):
        native.compile_sources(tmp_path / "bad.so", "sm_80", "nvcc", sources=[str(bad)])


def test_arch_flags_give_sass_and_ptx_for_nvcc_and_an_offload_arch_for_hipcc():
    want = ["-gencode", "arch=compute_90,code=sm_90", "-gencode", "arch=compute_90,code=compute_90"]
    assert native.arch_flags("sm_90") == want
    assert native.arch_flags("9.0") == want
    assert native.arch_flags("gfx90a:sramecc+:xnack-", "hipcc") == ["--offload-arch=gfx90a:sramecc+:xnack-"]
    with pytest.raises(ValueError, match="sm_80"):
        native.arch_flags("ampere")
    with pytest.raises(ValueError, match="gfx"):
        native.arch_flags("sm_90", "hipcc")


def test_find_compiler_prefers_cuda_home(tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "nvcc"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\n")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    assert native.find_compiler("nvcc") == str(fake)


def test_cache_dir_follows_tessera_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TESSERA_CACHE_DIR", str(tmp_path))
    assert native.cache_dir() == tmp_path / "kernels_cuda"


def test_tessera_native_0_turns_the_library_off(monkeypatch):
    monkeypatch.setenv("TESSERA_NATIVE", "0")
    native.library.cache_clear()
    try:
        assert native.library() is None
    finally:
        native.library.cache_clear()
