"""exllamav2 against tessera on one random EXL2 folder we wrote (a stage of tools/gpu_check.py).

exllamav2 (turboderp-org/exllamav2 0.3.2, carried as its pure-Python wheel by
tools/device_wheels.sh) builds its C++/CUDA extension with the machine's nvcc and ninja at first
import, so the stage runs it in a child process under a time limit and records why it could not
where it could not (not installed, no GPU, the build failed or ran out of time). What it
compares, on the same folder (tools/bench/make_random_exl2.py):

- each linear's dequantized weight: exllamav2's ``ExLlamaV2Linear.get_weight_tensor_dq()``
  (its ``reconstruct`` kernel: fp16 ``q - 2^(b-1)`` times the fp16 scale, one rounding) against
  our ``EXL2Tensor.dequantize(torch.float16)`` (the float32 product rounded once): equal. An MLP
  is compared in the order exllamav2 holds it: ``ExLlamaV2MLP.load`` (mlp.py lines 161-163) loads
  down_proj with ``unmap=True`` (its act-order permutation dropped, rows left in stored order)
  and gate_proj/up_proj with ``output_map`` = that permutation (``tensor_remap`` of their output
  columns), the same product; compared as stored, those three differ in every layer
  (packages/formats/tests/exllamav2_ref.py ports this load and the reconstruct kernel);
- the logits of one sequence of token ids: exllamav2's fp16 forward, and tessera's low-precision
  forward (fp16 on a GPU, packed weights through the kernels), each against tessera's fp32 torch
  reference on dequantized weights. The weights are identical, so what separates them is
  rounding of activations: fp16 (unit roundoff 2^-11) through every layer, and exllamav2's
  half-precision sums in its matmuls, move logits by a few tenths of a percent to about a
  percent of their norm. ``logits_ok`` is a relative error under 5%, on 16 tokens (where
  exllamav2's matmuls run its fused quantized GEMM kernel: ``q_gemm.cu`` takes it up to 32 rows)
  and on 40 (dequantize, then cuBLAS): the 16 are the 40's first, so tessera runs the 40 once. The
  folder's integers are drawn about EXL2's zero (make_random_exl2.py): with them drawn uniform in
  0..2^b-1, as before 2026-12-05, every matrix carried a bias of half a step, the residual stream
  grew into one constant vector of RMS ~480 with two stable signs, and logits compared
  all-or-nothing (exllamav2's 1.73 relative error and 0.25 argmax agreement that day are 12 of 16
  positions in the other sign: 2 sqrt(12/16)); now the stream stays near RMS 3 and fp16 rounding
  moves the fp32 logits 0.17%, while a missing causal mask moves them ~90% and GPT-J-style RoPE
  ~13%;
- each linear's two paths in exllamav2 (``linear_paths``): its ``forward`` (the fused kernel at 16
  rows, dequantize + cuBLAS at 40) against ``forward(force_recons=True)`` (the weights from
  ``reconstruct``, whose equality with ours the first point shows, times x in torch), one
  linear of each kind, layer 0 and the last, and the LM head: where the logits disagree and the
  weights do not, this says whether its GEMM kernel does.

exllamav2 runs with ``config.no_sdpa``: in 0.3.2 ``ExLlamaV2Attention._attn_torch`` (attn.py
lines 889-890, from commit 2e630ae) hands SDPA ``attn_params.get_block_diag_mask()`` whenever
``causal``, and that mask is None without ``cu_seqlens`` (attn_params.py lines 190-194): without
flash-attn or xformers a forward without a cache attends both ways. Its matmul path masks
(``get_attn_mask``). Where the logits still disagree, ``states_rel_err`` locates where: the
residual stream entering each of exllamav2's modules (``forward_chunk``'s
``extract_state_indices``) against ``reference_forward``, a plain fp32 Llama on our dequantized
weights (whose logits are checked against tessera's fp32 ones too).
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
SEQ_LEN = 40  # tessera's sequence; exllamav2 runs its first SHORT_LEN and all of it
SHORT_LEN = 16
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
    (``dump``): the time its import (the extension's build) and load took, per linear how its
    dequantized weight compares with ours, and (after the logits) the residual stream entering
    each module against ``reference_forward`` (whose logits go to ``dump.ref.pt``). The report is
    written before each forward, so a forward that fails still leaves what came before."""
    import torch

    t = time.perf_counter()
    from exllamav2 import ExLlamaV2, ExLlamaV2Config
    from exllamav2.linear import ExLlamaV2Linear
    from exllamav2.mlp import ExLlamaV2MLP

    report: dict = {"import_s": time.perf_counter() - t}
    from tessera.formats import open_checkpoint

    t = time.perf_counter()
    config = ExLlamaV2Config(path)
    config.max_seq_len = 256
    config.no_sdpa = True  # a causal mask without a cache (see the module docstring)
    model = ExLlamaV2(config)
    model.load()
    report["load_s"] = time.perf_counter() - t
    theirs, mlps = {}, []
    for module in model.modules:
        for m in [module, *module.submodules]:
            if isinstance(m, ExLlamaV2Linear) and m.q_handle is not None:
                theirs[m.key] = m
        if isinstance(module, ExLlamaV2MLP) and module.down_proj.q_handle is not None:
            if "q_perm" not in module.down_proj.q_tensors:  # loaded with unmap=True
                gate = module.gate_proj.key if module.gate_proj is not None else None
                mlps.append((gate, module.up_proj.key, module.down_proj.key))
    checkpoint = open_checkpoint(path)
    report["weights"] = weights_compared(checkpoint, theirs, mlps)
    Path(dump).write_text(json.dumps(report))
    try:
        report["linear_paths"] = linear_paths(theirs)
    except Exception as e:  # a diagnostic: its failure must not hide the logits below
        report["linear_paths_error"] = f"{type(e).__name__}: {e}"
    Path(dump).write_text(json.dumps(report))
    full = torch.tensor([[int(i) for i in ids.split(",")]])
    input_ids = full[:, :SHORT_LEN]
    torch.save(model.forward(input_ids)[0].float().cpu(), dump + ".pt")
    torch.save(model.forward(full)[0].float().cpu(), dump + ".full.pt")

    try:
        idx = list(range(1, model.head_layer_idx + 1))
        got = model.forward_chunk(input_ids=input_ids, extract_state_indices=idx)["states"]
        states, ref_logits = reference_forward(checkpoint, input_ids[0].tolist(), torch.device("cuda"))
        errs = [rel_err(got[i][0].float().cpu(), r) for i, r in zip(idx, states, strict=True)]
        report["states_rel_err"] = [round(e, 5) for e in errs]
        off = next((i for i, e in enumerate(errs) if e > LOGITS_TOLERANCE), None)
        report["first_state_off"] = None if off is None else state_name(off, len(errs))
        torch.save(ref_logits, dump + ".ref.pt")
    except Exception as e:  # a diagnostic: its failure must not hide the logits above
        report["states_error"] = f"{type(e).__name__}: {e}"
    Path(dump).write_text(json.dumps(report))


def linear_paths(theirs: dict, device: str = "cuda") -> dict:
    """(on the GPU, exllamav2 loaded) per sampled linear and row count, the relative error of its
    ``forward`` (fused quantized GEMM up to 32 rows) against ``forward(force_recons=True)``
    (``reconstruct`` + torch matmul) on the same fp16 inputs."""
    import torch

    layers = sorted({int(k.split(".")[2]) for k in theirs if k.startswith("model.layers.")})
    keys = [k for k in theirs if k == "lm_head"]
    for layer in {layers[0], layers[-1]} if layers else ():
        keys += sorted(k for k in theirs if k.startswith(f"model.layers.{layer}."))
    g = torch.Generator(device=device).manual_seed(3)
    out = {}
    for key in keys:
        m = theirs[key]
        for rows in (SHORT_LEN, SEQ_LEN):
            x = torch.randn(1, rows, m.in_features, device=device, generator=g).half()
            fused = m.forward(x).float()
            recons = m.forward(x, force_recons=True).float()
            out[f"{key} x{rows}"] = round(rel_err(fused, recons), 5)
    return out


def state_name(i: int, n: int) -> str:
    """What the ``i``-th of ``n`` compared states follows: the embedding, a layer's attention or
    MLP, the final norm (exllamav2's modules: embedding, attn, mlp per layer, norm, head)."""
    if i == 0:
        return "embedding"
    if i == n - 1:
        return "final norm"
    return f"layer {(i - 1) // 2} {'attention' if i % 2 else 'mlp'}"


def reference_forward(checkpoint, ids: list[int], device):
    """A plain fp32 Llama forward (HF's semantics: RMSNorm, rotate-half RoPE, grouped-query causal
    attention, SwiGLU) of one sequence on ``checkpoint``'s weights, EXL2 linears dequantized:
    ``(states, logits)``, states the residual stream after the embedding, after each layer's
    attention and MLP, and after the final norm (float32 ``[len, hidden]`` on the CPU)."""
    import torch
    import torch.nn.functional as F

    cfg = json.loads((Path(checkpoint.path) / "config.json").read_text())
    w = {}
    for name, t in checkpoint.weights():
        t = t.dequantize(torch.float32) if hasattr(t, "as_groups") else t.float()
        w[name] = t.to(device)
    n_heads, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or cfg["hidden_size"] // n_heads
    eps, theta = cfg["rms_norm_eps"], cfg.get("rope_theta", 10000.0)
    seq = len(ids)
    pos = torch.arange(seq, device=device, dtype=torch.float32)
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, device=device, dtype=torch.float32) / hd)
    angle = torch.cat([pos[:, None] * inv] * 2, -1)
    cos, sin = angle.cos(), angle.sin()

    def norm(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    def rope(x):  # [heads, seq, hd]
        return x * cos + torch.cat([-x[..., hd // 2 :], x[..., : hd // 2]], -1) * sin

    x = w["model.embed_tokens.weight"][torch.tensor(ids, device=device)]
    states = [x]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = norm(x, w[p + "input_layernorm.weight"])
        q, k, v = (h @ w[p + f"self_attn.{n}_proj.weight"].T for n in "qkv")
        q = rope(q.view(seq, n_heads, hd).transpose(0, 1))
        k = rope(k.view(seq, n_kv, hd).transpose(0, 1)).repeat_interleave(n_heads // n_kv, 0)
        v = v.view(seq, n_kv, hd).transpose(0, 1).repeat_interleave(n_heads // n_kv, 0)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(0, 1).reshape(seq, -1)
        x = x + a @ w[p + "self_attn.o_proj.weight"].T
        states.append(x)
        h = norm(x, w[p + "post_attention_layernorm.weight"])
        gate = F.silu(h @ w[p + "mlp.gate_proj.weight"].T)
        x = x + (gate * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
        states.append(x)
    x = norm(x, w["model.norm.weight"])
    states.append(x)
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return [s.cpu() for s in states], (x @ head.T).cpu()


def weights_compared(checkpoint, theirs: dict, mlps=()) -> dict:
    """Each EXL2 linear's ``dequantize(float16)`` against exllamav2's ``get_weight_tensor_dq()``
    (``[in, out]``): how many weights differ, how many by more than one fp16 step of ours, the
    largest difference, and the linears either side lacks or holds in another shape. ``mlps``
    are ``(gate, up, down)`` keys (gate may be None) of the MLPs exllamav2 loaded with down_proj
    unmapped: ours is put in its order first (down_proj's rows and gate/up's outputs in down_proj's
    stored order, ``perm = argsort(q_invperm)``), ``held_permuted`` linears compared so."""
    import torch

    out = {"linears": 0, "equal": 0, "unequal_elements": 0, "beyond_one_fp16_step": 0, "max_abs_diff": 0.0}
    out |= {"worst": None, "shape_mismatch": [], "held_permuted": 0}
    ours = {}
    for name, tensor in checkpoint.weights():
        prefix = name.removesuffix(".weight")
        if hasattr(tensor, "as_groups") and prefix in theirs:
            ours[prefix] = tensor
    order = {}  # prefix -> (dim of [in, out] to index, index)
    for gate, up, down in mlps:
        if down in ours:
            perm = torch.argsort(ours[down].q_invperm.long())
            order |= {down: (0, perm), up: (1, perm)} | ({gate: (1, perm)} if gate else {})
    for prefix, tensor in ours.items():
        mine = tensor.dequantize(torch.float16).T
        got = theirs[prefix].get_weight_tensor_dq().cpu()
        if prefix in order:
            dim, perm = order[prefix]
            mine = mine.index_select(dim, perm)
            out["held_permuted"] += 1
        if got.shape != mine.shape:
            out["shape_mismatch"].append(f"{prefix}: {list(got.shape)} vs ours {list(mine.shape)}")
            continue
        diff = (got.float() - mine.float()).abs()
        mag = mine.abs()
        step = (torch.nextafter(mag, torch.full_like(mag, float("inf"))) - mag).float()  # one fp16 step
        out["linears"] += 1
        n = int((diff > 0).sum())
        out["equal"] += n == 0
        out["unequal_elements"] += n
        out["beyond_one_fp16_step"] += int((diff > step).sum())
        if float(diff.max()) > out["max_abs_diff"]:
            out["max_abs_diff"], out["worst"] = float(diff.max()), prefix
    out["only_in_exllamav2"] = sorted(set(theirs) - set(ours))
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
    theirs = torch.load(str(dump) + ".pt")  # the first SHORT_LEN tokens
    fp32, low = logits["fp32"][:SHORT_LEN], logits["low"][:SHORT_LEN]
    err = rel_err(theirs, fp32)
    agree = (theirs.argmax(-1) == fp32.argmax(-1)).float().mean()
    result |= {
        "logits_rel_err_exllamav2_vs_fp32": err,
        "logits_rel_err_exllamav2_vs_tessera": rel_err(theirs, low),
        # the last position sees the whole sequence either way: right here and wrong before it
        # is attention that is not causal
        "logits_rel_err_exllamav2_vs_fp32_last_position": rel_err(theirs[-1], fp32[-1]),
        "argmax_agreement_exllamav2_vs_fp32": float(agree),
        "logits_tolerance": LOGITS_TOLERANCE,
    }
    ok = err < LOGITS_TOLERANCE
    full = Path(str(dump) + ".full.pt")
    if full.is_file():  # all SEQ_LEN tokens: exllamav2 dequantizes and calls cuBLAS there
        theirs_full = torch.load(full)
        err_full = rel_err(theirs_full, logits["fp32"])
        result["logits_rel_err_exllamav2_vs_fp32_40"] = err_full
        agree = (theirs_full.argmax(-1) == logits["fp32"].argmax(-1)).float().mean()
        result["argmax_agreement_exllamav2_vs_fp32_40"] = float(agree)
        ok = ok and err_full < LOGITS_TOLERANCE
    result["logits_ok"] = ok
    ref = Path(str(dump) + ".ref.pt")
    if ref.is_file():  # reference_forward's logits, the yardstick of states_rel_err
        result["logits_rel_err_reference_vs_tessera_fp32"] = rel_err(torch.load(ref), logits["fp32"])
    return {"status": "ran", **result}


def main() -> None:
    if sys.argv[1] == "--child-tessera":
        return child_tessera(*sys.argv[2:8])
    if sys.argv[1] == "--child-exllamav2":
        return child_exllamav2(*sys.argv[2:5])
    raise SystemExit(f"{sys.argv[0]} runs as a child of tools/gpu_check.py")


if __name__ == "__main__":
    main()
