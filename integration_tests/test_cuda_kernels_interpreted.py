"""The CUDA backend's Triton kernels wired through whole models, without a GPU: every op
tessera-kernels-cuda registers runs in Triton's interpreter on CPU tensors (the CUDA C++ ones
fall back to their references off the GPU), for a random-weight Llama with Q4_K and Q4_0 weights
and a Mixtral-layout MoE, and the logits of a ragged batch prefilled in two chunks must equal the
torch reference path's (every op its reference).

Each run is a fresh interpreter: the backends' registrations are process-wide, and Triton reads
TRITON_INTERPRET when its kernels are defined."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import json, sys
import torch
from tessera.kernels import registry
import tessera.kernels_cuda as kc
from tessera.formats import open_checkpoint
from tessera.models import load_model
from tessera.models.harness import forward_chunks

path, dtype = sys.argv[1], getattr(torch, sys.argv[2])
registry.load_backends()
ops = list(kc.OPS) + ["decoder_layers"]
cpu_impls = {op: registry._IMPLS.pop((op, "cpu"), None) for op in ops}  # reference everywhere


def run():
    model = load_model(open_checkpoint(path), dtype, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(300, 990, (n,), generator=g).tolist() for n in (9, 3, 20)]
    return forward_chunks(model, [[s[: len(s) // 2], s[len(s) // 2 :]] for s in seqs], block_size=16)


reference = run()
for op, (module, name, _) in kc.OPS.items():  # now the CUDA backend's kernels serve "cpu"
    registry._IMPLS[(op, "cpu")] = kc.lazy(module, name)
kernels = run()
print(json.dumps([
    [float((a.float() - b.float()).abs().max()), float(b.float().abs().max())]
    for a, b in zip(kernels, reference, strict=True)
]))
"""


def _writer():
    spec = importlib.util.spec_from_file_location(
        "make_random_gguf", ROOT / "tools/bench/make_random_gguf.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.write


TINY = dict(layers=2, hidden=256, ffn=512, heads=4, kv_heads=2, vocab=1000)


@pytest.mark.parametrize(
    "scheme,dtype,experts,tol",
    [
        # fp32: only the order of the sums differs (measured about 1e-6 of the largest logit)
        ("Q4_K", "float32", 0, 1e-5),
        ("Q4_0", "float32", 0, 1e-5),
        ("Q4_0", "float32", 4, 1e-5),
        # fp16: the kernels keep fp32 sums where the reference rounds each op's output to fp16
        # (eps 1e-3; measured 1.1-1.5e-3 of the largest logit over 2 layers)
        ("Q4_K", "float16", 0, 5e-3),
    ],
    ids=["q4_k-fp32", "q4_0-fp32", "moe-q4_0-fp32", "q4_k-fp16"],
)
def test_triton_kernels_match_the_reference_through_a_whole_model(tmp_path, scheme, dtype, experts, tol):
    pytest.importorskip("triton")
    path = tmp_path / "model.gguf"
    moe = {"experts": experts, "top_k": 2} if experts else {}
    _writer()(str(path), scheme=scheme, **TINY, **moe)
    env = dict(os.environ, TRITON_INTERPRET="1", TRITON_DEFAULT_FP_FUSION="1")
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(path), dtype], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    diffs = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(diffs) == 3
    for err, scale in diffs:
        assert scale > 0.5  # real logits, not zeros
        assert err <= tol * scale, (err, scale)
