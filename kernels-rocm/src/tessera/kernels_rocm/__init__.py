"""tessera's GPU kernels under ROCm, registered for device "cuda" when ``torch.version.hip`` is set.

ROCm's torch names its GPUs "cuda", so the same op table serves: the ops and modules are those of
tessera-kernels-cuda (its Triton kernels run unchanged on ROCm's Triton; its native module builds
the CUDA C++ sources with hipcc for the GPU's gfx target). Nothing is imported or compiled until an
op first runs.
"""

from __future__ import annotations

import importlib.util

import torch

from tessera.kernels import declare_backend, register
from tessera.kernels_cuda import OPS, lazy
from tessera.kernels_cuda import capabilities as cuda_capabilities

_registered = False


def capabilities() -> dict:
    """kernels_cuda's, with the HIP version and the GPU named by its gfx target."""
    caps = cuda_capabilities()
    caps["hip"] = torch.version.hip
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        caps["gpu"] = f"{p.name} ({p.gcnArchName}, {p.multi_processor_count} CUs)"
    return caps


def register_all() -> None:
    global _registered
    if _registered or torch.version.hip is None:  # a CUDA build: tessera-kernels-cuda registers
        return
    _registered = True
    declare_backend("cuda", "tessera-kernels-rocm", capabilities)
    for op, (module, name, note) in OPS.items():
        if importlib.util.find_spec(f"tessera.kernels_cuda.{module}") is not None:  # found, not imported
            register(op, "cuda", note.replace("nvcc", "hipcc"))(lazy(module, name))


__all__ = ["OPS", "capabilities", "register_all"]
