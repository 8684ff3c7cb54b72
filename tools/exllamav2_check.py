"""exllamav2 against tessera on one random EXL2 folder we wrote (a stage of tools/gpu_check.py).

exllamav2 (turboderp-org/exllamav2 0.3.2, carried as its pure-Python wheel by
tools/device_wheels.sh) builds its C++/CUDA extension with the machine's nvcc and ninja at first
import, so the stage runs it in a child process under a time limit and records why it could not
where it could not (not installed, no GPU, the build failed or ran out of time). What it
compares, on the same folder (tools/bench/make_random_exl2.py):

- each linear's dequantized weight: exllamav2's ``ExLlamaV2Linear.get_weight_tensor_dq()``
  (its ``reconstruct`` kernel: fp16 ``q - 2^(b-1)`` times the fp16 scale, one rounding) against
  our ``EXL2Tensor.dequantize(torch.float16)`` (the float32 product rounded once): equal;
- the logits of one sequence of token ids: exllamav2's fp16 forward, and tessera's low-precision
  forward (fp16 on a GPU, packed weights through the kernels), each against tessera's fp32 torch
  reference on dequantized weights. The weights are identical, so what separates them is
  rounding of activations: fp16 (unit roundoff 2^-11) through every layer, and exllamav2's
  half-precision sums in its matmuls, move logits by a few tenths of a percent to about a
  percent of their norm; reading one group's width, scale or the permutation wrongly makes the
  logits unrelated (relative error near 1.4). ``logits_ok`` is a relative error under 5%.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

LOGITS_TOLERANCE = 0.05  # relative L2 error; see the module docstring
SEQ_LEN = 16
_SHAPE = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")


def token_ids(vocab: int) -> list[int]:
    import torch

    g = torch.Generator().manual_seed(7)
    return torch.randint(300, vocab - 2, (SEQ_LEN,), generator=g).tolist()


def child_tessera(path: str, dtype: str, device: str, packed: str, dump: str, ids: str) -> None:
    """(in a child process) tessera's logits ``[len, vocab]`` of the sequence ``ids``."""
    import torch

    from tessera.formats import open_checkpoint
    from tessera.models import load_model
    from tessera.models.harness import forward_chunks

    dev = torch.device(device)
    model = load_model(open_checkpoint(path), getattr(torch, dtype), dev, packed_weights=packed == "1")
    (logits,) = forward_chunks(model, [[[int(i) for i in ids.split(",")]]], block_size=16)
    torch.save(logits.float().cpu(), dump)


def child_exllamav2(path: str, dump: str, ids: str) -> None:
    """(in a child process) exllamav2's fp16 logits of ``ids`` (into ``dump.pt``) and a report
    (``dump``): the time its import (the extension's build) and load took, and per linear how
    its dequantized weight compares with ours. The report is written before the forward, so a
    forward that fails still leaves the weights' comparison."""
    import torch

    t = time.perf_counter()
    from exllamav2 import ExLlamaV2, ExLlamaV2Config
    from exllamav2.linear import ExLlamaV2Linear

    report: dict = {"import_s": time.perf_counter() - t}
    from tessera.formats import open_checkpoint

    t = time.perf_counter()
    config = ExLlamaV2Config(path)
    config.max_seq_len = 256
    model = ExLlamaV2(config)
    model.load()
    report["load_s"] = time.perf_counter() - t
    theirs = {}
    for module in model.modules:
        for m in [module, *module.submodules]:
            if isinstance(m, ExLlamaV2Linear) and m.q_handle is not None:
                theirs[m.key] = m
    report["weights"] = weights_compared(open_checkpoint(path), theirs)
    Path(dump).write_text(json.dumps(report))
    logits = model.forward(torch.tensor([[int(i) for i in ids.split(",")]]))
    torch.save(logits[0].float().cpu(), dump + ".pt")


def weights_compared(checkpoint, theirs: dict) -> dict:
    """Each EXL2 linear's ``dequantize(float16)`` against exllamav2's ``get_weight_tensor_dq()``
    (``[in, out]``): how many weights differ, how many by more than one fp16 step of ours, the
    largest difference, and the linears either side lacks or holds in another shape."""
    import torch

    out = {"linears": 0, "equal": 0, "unequal_elements": 0, "beyond_one_fp16_step": 0, "max_abs_diff": 0.0}
    out |= {"worst": None, "shape_mismatch": []}
    seen = set()
    for name, tensor in checkpoint.weights():
        prefix = name.removesuffix(".weight")
        if not hasattr(tensor, "as_groups") or prefix not in theirs:
            continue
        seen.add(prefix)
        ours = tensor.dequantize(torch.float16).T
        got = theirs[prefix].get_weight_tensor_dq().cpu()
        if got.shape != ours.shape:
            out["shape_mismatch"].append(f"{prefix}: {list(got.shape)} vs ours {list(ours.shape)}")
            continue
        diff = (got.float() - ours.float()).abs()
        mag = ours.abs()
        step = (torch.nextafter(mag, torch.full_like(mag, float("inf"))) - mag).float()  # one fp16 step
        out["linears"] += 1
        n = int((diff > 0).sum())
        out["equal"] += n == 0
        out["unequal_elements"] += n
        out["beyond_one_fp16_step"] += int((diff > step).sum())
        if float(diff.max()) > out["max_abs_diff"]:
            out["max_abs_diff"], out["worst"] = float(diff.max()), prefix
    out["only_in_exllamav2"] = sorted(set(theirs) - seen)
    complete = out["linears"] > 0 and not out["only_in_exllamav2"] and not out["shape_mismatch"]
    out["all_equal"] = complete and out["equal"] == out["linears"]
    out["all_within_fp16_rounding"] = complete and out["beyond_one_fp16_step"] == 0
    return out


def unavailable(device: str) -> str | None:
    """Why exllamav2 cannot run here, or None. Its import is left to the child: it builds."""
    reasons = []
    if importlib.util.find_spec("exllamav2") is None:
        reasons.append("exllamav2 is not installed (carry its wheel: tools/device_wheels.sh)")
    if device != "cuda":
        reasons.append("its kernels need a CUDA GPU")
    return "; ".join(reasons) or None


def _run(cmd: list[str], env: dict, timeout: float, log: Path) -> str | None:
    """Run a child; None on success, else why it failed (the log keeps its whole output)."""
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        text = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        log.write_text(text)
        return f"ran past its {timeout:.0f} s"
    log.write_text(r.stdout + r.stderr)
    return f"exit {r.returncode}: {r.stderr[-1500:]}" if r.returncode else None


def rel_err(a, b) -> float:
    return float((a - b).norm() / b.norm())


def cross_check(folder: Path, env: dict, device: str, timeout: float, out: Path) -> dict:
    """The stage: tessera's two forwards always (they check this stage's own path on a CPU),
    exllamav2's where it can run; each child's output in ``out/exllamav2-*.log``."""
    import torch

    config = json.loads((folder / "config.json").read_text())
    ids = ",".join(map(str, token_ids(config["vocab_size"])))
    low = "float16" if device == "cuda" else "bfloat16"  # the CPU backend computes in bf16
    deadline = time.monotonic() + timeout
    logits = {}
    for name, dtype, backend, packed in (("fp32", "float32", "reference", "0"), ("low", low, "", "1")):
        dump = folder.parent / f"tessera-{name}.pt"
        cmd = [sys.executable, __file__, "--child-tessera", str(folder), dtype, device, packed, str(dump)]
        cmd.append(ids)
        log = out / f"exllamav2-tessera-{name}.log"
        why = _run(cmd, dict(env, TESSERA_KERNELS=backend), deadline - time.monotonic(), log)
        if why:
            return {"status": f"error: tessera {dtype}: {why}"}
        logits[name] = torch.load(dump)
    result = {
        "folder_shape": {k: v for k, v in config.items() if k in _SHAPE},
        "tessera_dtype": low,
        "logits_rel_err_tessera_vs_fp32": rel_err(logits["low"], logits["fp32"]),
    }
    why = unavailable(device)
    if why:
        return {"status": f"not available: {why}", **result}
    major, minor = torch.cuda.get_device_capability()
    e = dict(env, TORCH_CUDA_ARCH_LIST=f"{major}.{minor}", MAX_JOBS=str(os.cpu_count()))
    dump = folder.parent / "exllamav2.json"
    cmd = [sys.executable, __file__, "--child-exllamav2", str(folder), str(dump), ids]
    t = time.perf_counter()
    why = _run(cmd, e, max(1.0, deadline - time.monotonic()), out / "exllamav2-run.log")
    result["exllamav2_wall_s"] = time.perf_counter() - t
    report = json.loads(dump.read_text()) if dump.is_file() else {}
    result |= {f"exllamav2_{k}": v for k, v in report.items() if k != "weights"}
    if "weights" in report:
        result["weights"] = report["weights"]
    if why:
        return {"status": f"failed: {why}", **result}
    theirs = torch.load(str(dump) + ".pt")
    err = rel_err(theirs, logits["fp32"])
    agree = (theirs.argmax(-1) == logits["fp32"].argmax(-1)).float().mean()
    result |= {
        "logits_rel_err_exllamav2_vs_fp32": err,
        "logits_rel_err_exllamav2_vs_tessera": rel_err(theirs, logits["low"]),
        "argmax_agreement_exllamav2_vs_fp32": float(agree),
        "logits_tolerance": LOGITS_TOLERANCE,
        "logits_ok": err < LOGITS_TOLERANCE,
    }
    return {"status": "ran", **result}


def main() -> None:
    if sys.argv[1] == "--child-tessera":
        return child_tessera(*sys.argv[2:8])
    if sys.argv[1] == "--child-exllamav2":
        return child_exllamav2(*sys.argv[2:5])
    raise SystemExit(f"{sys.argv[0]} runs as a child of tools/gpu_check.py")


if __name__ == "__main__":
    main()
