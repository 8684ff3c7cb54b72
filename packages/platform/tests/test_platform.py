import pytest

from tessera.platform import current_platform


def test_tessera_device_cpu_forces_the_cpu(monkeypatch):
    monkeypatch.setenv("TESSERA_DEVICE", "cpu")
    current_platform.cache_clear()
    try:
        p = current_platform()
        assert p.name == "cpu" and p.device.type == "cpu"
        assert 0 < p.free_memory() <= p.total_memory()
    finally:
        current_platform.cache_clear()


def test_an_unknown_tessera_device_is_refused_by_name(monkeypatch):
    monkeypatch.setenv("TESSERA_DEVICE", "tpu")
    current_platform.cache_clear()
    try:
        with pytest.raises(ValueError, match="TESSERA_DEVICE='tpu'"):
            current_platform()
    finally:
        current_platform.cache_clear()
