"""Without a CUDA device the Triton kernels run in Triton's interpreter on CPU tensors
(TRITON_INTERPRET=1, set before any kernel module is imported); with one they run compiled."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def device() -> torch.device:
    """Where the kernels under test run: the GPU when there is one, else the CPU (interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
