"""Which device tessera runs on: detected, or chosen with TESSERA_DEVICE."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import torch

KNOWN_DEVICES = ("cpu", "cuda", "rocm", "xpu")


@dataclass(frozen=True)
class Platform:
    name: str  # cpu | cuda | rocm | xpu
    device: torch.device  # what torch calls it (ROCm is "cuda" to torch)
    dist_backend: str

    @property
    def is_cpu(self) -> bool:
        return self.name == "cpu"

    def total_memory(self) -> int:
        """Bytes of memory on the device (system RAM for the CPU)."""
        if self.name in ("cuda", "rocm"):
            return torch.cuda.get_device_properties(self.device).total_memory
        if self.name == "xpu":
            return torch.xpu.get_device_properties(self.device).total_memory
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    def free_memory(self) -> int:
        """Bytes free now (available system RAM for the CPU)."""
        if self.name in ("cuda", "rocm"):
            return torch.cuda.mem_get_info(self.device)[0]
        if self.name == "xpu":
            return self.total_memory() - torch.xpu.memory_allocated(self.device)
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _make(name: str) -> Platform:
    if name == "cpu":
        return Platform("cpu", torch.device("cpu"), "gloo")
    if name in ("cuda", "rocm"):
        return Platform(name, torch.device("cuda"), "nccl")
    return Platform("xpu", torch.device("xpu"), "xccl")


def _available(name: str) -> bool:
    if name == "cpu":
        return True
    if name == "cuda":
        return torch.cuda.is_available() and torch.version.hip is None
    if name == "rocm":
        return torch.cuda.is_available() and torch.version.hip is not None
    return hasattr(torch, "xpu") and torch.xpu.is_available()


def platform_for(device: torch.device | str) -> Platform:
    """The Platform of a torch device (``cuda`` is ROCm where torch is a HIP build)."""
    kind = torch.device(device).type
    if kind == "cuda":
        return _make("rocm" if torch.version.hip is not None else "cuda")
    return _make("xpu" if kind == "xpu" else "cpu")


@lru_cache(maxsize=1)
def current_platform() -> Platform:
    """The platform named by TESSERA_DEVICE, else the first available of rocm/cuda/xpu/cpu."""
    wanted = os.environ.get("TESSERA_DEVICE", "").strip().lower()
    if wanted:
        if wanted not in KNOWN_DEVICES:
            raise ValueError(
                f"TESSERA_DEVICE={wanted!r} is not a known device (known: {', '.join(KNOWN_DEVICES)})"
            )
        if not _available(wanted):
            raise RuntimeError(f"TESSERA_DEVICE={wanted!r} but no {wanted} device is available here")
        return _make(wanted)
    for name in ("rocm", "cuda", "xpu"):
        if _available(name):
            return _make(name)
    return _make("cpu")
