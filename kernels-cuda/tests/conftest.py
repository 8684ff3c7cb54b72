"""Without a CUDA device the Triton kernels run in Triton's interpreter on CPU tensors
(TRITON_INTERPRET=1, set before any kernel module is imported); with one they run compiled."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def device() -> torch.device:
    """Where the kernels under test run: the GPU when there is one, else the CPU (interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def compile_cases():
    """Run a compile script (``triton_usage.usage`` per case, one JSON line per case printed) in a
    process without the interpreter; returns the parsed lines."""
    pytest.importorskip("triton.backends.nvidia")

    def run(script: str, cases: list) -> list:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), env.get("PYTHONPATH")]))
        done = subprocess.run(
            [sys.executable, "-c", script, json.dumps(cases)], env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-3000:]
        results = [json.loads(line) for line in done.stdout.splitlines()]
        assert len(results) == len(cases)
        return results

    return run
