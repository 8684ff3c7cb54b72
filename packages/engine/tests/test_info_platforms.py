"""`tessera info` on a device no kernel backend serves (Intel XPU): the platform is detected
and every op is shown running its torch reference."""

from __future__ import annotations

import argparse

import pytest
import torch

from tessera.engine import info
from tessera.platform import Platform, current_platform


@pytest.fixture
def fake_xpu(monkeypatch):
    """torch reports an XPU and no CUDA device; memory queries answer without a device."""
    if not hasattr(torch, "xpu"):
        pytest.skip("this torch has no torch.xpu module")
    monkeypatch.delenv("TESSERA_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.xpu, "is_available", lambda: True)
    monkeypatch.setattr(Platform, "total_memory", lambda self: 64 << 30)
    monkeypatch.setattr(Platform, "free_memory", lambda self: 60 << 30)
    current_platform.cache_clear()
    yield
    current_platform.cache_clear()


def test_xpu_is_detected_and_runs_the_reference_ops(fake_xpu, capsys):
    plat = current_platform()
    assert (plat.name, plat.device.type, plat.dist_backend) == ("xpu", "xpu", "xccl")
    data = info.gather()
    assert data["platform"]["name"] == "xpu"
    assert data["kernel_backend"] is None
    assert data["ops"] and all(o["runs"].startswith("tessera.kernels.") for o in data["ops"])
    assert all(o["why"] == "reference: no backend registered it" for o in data["ops"])
    assert info.run(argparse.Namespace(model=None, json=False)) == 0
    out = capsys.readouterr().out
    assert out.startswith("platform     xpu (xpu), dist backend xccl")
    assert "no backend for this device: the torch reference runs every op" in out


def test_cuda_ops_are_declared_by_the_cuda_package():
    """The CUDA backend is found through the entry point alone; without a GPU nothing of it is
    imported until an op runs on a CUDA tensor."""
    from tessera.kernels import backend, explain

    name, caps = backend("cuda")
    assert name == "tessera-kernels-cuda"
    assert "preferred_dtype" in caps
    cuda_rows = [row for row in explain("cuda") if row[1].startswith("tessera.kernels_cuda.")]
    for op, _impl, why in cuda_rows:
        assert why, f"{op} registered for cuda without a note"
