"""tessera-kernels-rocm registers kernels_cuda's ops for device "cuda" under ROCm only, and the
CUDA C++ sources build with hipcc for an AMD target through the portability header."""

from __future__ import annotations

import types

import pytest
import torch

import tessera.kernels_rocm as rocm
from tessera.kernels_cuda import OPS, native


@pytest.fixture
def recorded(monkeypatch):
    """register_all run against a recorder instead of the global registry."""
    calls: dict = {"backends": [], "ops": {}}

    def register(op, device, note=""):
        def wrap(fn):
            calls["ops"][op] = (device, note, fn)
            return fn

        return wrap

    monkeypatch.setattr(rocm, "register", register)
    monkeypatch.setattr(rocm, "declare_backend", lambda *a: calls["backends"].append(a))
    monkeypatch.setattr(rocm, "_registered", False)
    return calls


def test_a_cuda_build_of_torch_registers_nothing(recorded, monkeypatch):
    monkeypatch.setattr(torch.version, "hip", None)
    rocm.register_all()
    assert recorded == {"backends": [], "ops": {}}


def test_under_rocm_kernels_cudas_ops_are_registered_for_cuda_lazily(recorded, monkeypatch):
    monkeypatch.setattr(torch.version, "hip", "6.2.41133")
    rocm.register_all()
    assert [(d, name) for d, name, _ in recorded["backends"]] == [("cuda", "tessera-kernels-rocm")]
    assert {"rms_norm", "fused_add_rms_norm", "rotary_embedding", "silu_and_mul", "gelu_tanh_and_mul"} <= set(
        recorded["ops"]
    )
    for op, (device, note, fn) in recorded["ops"].items():
        module, name, _ = OPS[op]
        assert device == "cuda" and "nvcc" not in note
        assert fn.__module__ == f"tessera.kernels_cuda.{module}" and fn.__name__ == name
    rocm.register_all()  # once only
    assert len(recorded["backends"]) == 1


def test_under_rocm_the_native_build_targets_the_gpus_gfx_name_with_hipcc(monkeypatch):
    monkeypatch.setattr(torch.version, "hip", "6.2.41133")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    props = types.SimpleNamespace(gcnArchName="gfx90a:sramecc+:xnack-")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    compiler, arch = native.device_target()
    assert (compiler, arch) == ("hipcc", "gfx90a:sramecc+:xnack-")
    assert native.arch_flags(arch, compiler) == ["--offload-arch=gfx90a:sramecc+:xnack-"]


@pytest.mark.skipif(
    native.find_compiler("hipcc") is None,
    reason="hipcc not found ($ROCM_PATH/bin, PATH, /opt/rocm/bin; Debian: apt install hipcc)",
)
def test_every_cuda_source_builds_with_hipcc_for_gfx90a(tmp_path):
    lib = native.compile_sources(tmp_path / "kernels-gfx90a.so", "gfx90a", "hipcc")
    data = lib.read_bytes()
    assert b"gfx90a" in data
    for name in native.EXPORTS:
        assert name.encode() in data
