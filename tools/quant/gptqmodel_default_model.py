"""The default model (SmolLM2-135M-Instruct) quantized by GPTQModel, a tool nobody here wrote, and
our loader checked against it on that checkpoint: our dequantize against GPTQModel's, our logits
against transformers' on the same weights and against GPTQModel's own.

Three steps, two interpreters (GPTQModel pins its own stack, so it runs in a throwaway venv):

    uv venv /tmp/gptq-venv --python 3.11
    uv pip install --python /tmp/gptq-venv torch transformers gptqmodel==7.7.0

    # 1. (project) the default model as an HF Llama folder, weights dequantized from its GGUF by our
    #    loader (float32), config and tokenizer as `tessera convert` writes them; calibration rows
    #    (32 x 512 tokens of formats.calibration's calibration split) and a 64-token prompt of
    #    held-out text as token ids. Skipped when WORK already holds them.
    nice -n 10 uv run python tools/quant/gptqmodel_default_model.py export /tmp/gptqmodel-smollm2

    # 2. (GPTQModel's venv) quantize WORK/hf: bits=4, group_size=128, desc_act=True, sym=True,
    #    format="gptq" (v1), other options GPTQModel's defaults (damp_percent 0.05); save OUT;
    #    write WORK/reference.safetensors: every quantized linear's dequantize_weight() as [out, in]
    #    (bf16, the dtype GPTQModel runs in) and GPTQModel's own logits on the prompt. An OUT that
    #    already holds a checkpoint is not quantized again (only the reference is rewritten).
    GPTQMODEL_CPU_WORKERS=2 nice -n 10 /tmp/gptq-venv/bin/python \\
        tools/quant/gptqmodel_default_model.py quantize /tmp/gptqmodel-smollm2 \\
        /tmp/variants/smollm2/gptqmodel-4b-g128-actorder-sym

    # 3. (project) compare; prints a table and, with --json, one JSON object
    nice -n 10 uv run python tools/quant/gptqmodel_default_model.py compare /tmp/gptqmodel-smollm2 \\
        /tmp/variants/smollm2/gptqmodel-4b-g128-actorder-sym

    # the LM head quantized too (GPTQModel refuses a tied head: export --untie gives it its own
    # copy of the embedding), GPTQModel's lm_head=True with its default 8 bits in groups of 32:
    #   export --untie WORK2; quantize --lm-head WORK2 OUT2; compare WORK2 OUT2

The comparisons: per linear, max |our GPTQTensor.dequantize() - GPTQModel's dequantize_weight()|
(GPTQModel computes ``scale * (q - zero)`` in bf16, scales rounded to bf16 first: the same product
emulated from our unpacked ints, scales and g_idx must equal theirs bit for bit); our fp32 logits
(load_model on open_checkpoint(OUT)) against transformers' fp32 LlamaForCausalLM holding our
dequantized weights; GPTQModel's own bf16 logits against ours, next to transformers-bf16 against
ours as the yardstick of bf16 noise; top-1 agreement of each; and a short greedy generation through
``tessera.engine.LLM`` on OUT.

Measured (GPTQModel 7.7.0, torch 2.15 CPU, transformers 5.25 in its venv; 2 shared cores): export
100 s (transformers on WORK/hf vs our forward on the GGUF: 4.2e-5); quantize 305 s, GPTQModel
computing in bf16; 210 linears, ours vs theirs max 2.9e-2 absolute, 7.3e-3 relative (< 2^-7), and
GPTQModel's bf16 arithmetic on our unpacked parts equal to theirs bit for bit; logits on 64 tokens
(|logit| <= 38): ours vs transformers fp32 4.3e-5 (top-1 64/64), GPTQModel's vs ours 2.23 (mean
0.137, top-1 63/64), transformers bf16 vs ours 2.00 (mean 0.148, top-1 62/64): ratio 1.11.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROWS, ROW_LENGTH, PROMPT_TOKENS = 32, 512, 64
QUANTIZE = dict(bits=4, group_size=128, desc_act=True, sym=True, format="gptq", act_group_aware=False)
START = time.monotonic()


def say(msg: str) -> None:
    print(f"[{time.monotonic() - START:7.1f}s] {msg}", flush=True)


# -- 1. export (project venv) -----------------------------------------------------------------------


def export(work: Path, model_name: str, untie: bool = False) -> None:
    import torch
    from safetensors.torch import save_file

    from tessera.engine import convert as conv
    from tessera.engine import resolve_model
    from tessera.formats import open_checkpoint
    from tessera.formats.calibration import default_text, split_text, token_rows
    from tessera.models import load_model

    hf, inputs = work / "hf", work / "inputs.safetensors"
    if (hf / "model.safetensors").is_file() and inputs.is_file():
        say(f"{hf} and {inputs} exist: export skipped")
        return
    work.mkdir(parents=True, exist_ok=True)
    src = resolve_model(model_name)
    say(f"loading {src} (float32)")
    ck = open_checkpoint(src)
    model = load_model(ck, torch.float32)
    if ck.path.is_dir() or ck.config.architecture != "llama":
        raise SystemExit(f"export: {src} is not a Llama GGUF file")
    tensors = conv._plain_tensors(model, torch.float32)
    for i, spec in enumerate(model.layer_specs):
        p, d = f"model.layers.{i}", spec.head_dim
        q, k, v = spec.qkv.weight.split([spec.num_heads * d, spec.num_kv_heads * d, spec.num_kv_heads * d])
        gate, up = spec.gate_up.weight.chunk(2)
        linears = {"self_attn.q_proj": q, "self_attn.k_proj": k, "self_attn.v_proj": v,
                   "self_attn.o_proj": spec.o.weight, "mlp.gate_proj": gate, "mlp.up_proj": up,
                   "mlp.down_proj": spec.down.weight}  # fmt: skip
        for name, w in linears.items():
            tensors[f"{p}.{name}.weight"] = w.float().contiguous()
    cfg = conv._hf_config(ck, torch.float32, {})
    cfg.pop("quantization_config")
    if untie:  # GPTQModel quantizes an LM head only where it is not tied: a copy of the embedding
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
        cfg["tie_word_embeddings"] = False
    tmp = work / "hf.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    conv._write_side_files(ck, tmp)
    shutil.rmtree(hf, ignore_errors=True)
    os.replace(tmp, hf)
    say(f"wrote {hf}: {len(tensors)} tensors")

    text = default_text()
    calib = conv.calibration_rows(ck, conv.Calibration(text, ROWS, ROW_LENGTH))
    tok = ck.tokenizer()
    (prompt,) = token_rows(
        split_text(text).evaluation, lambda s: tok.encode(s, add_special_tokens=False), 1, PROMPT_TOKENS, text
    )
    save_file({"calibration": calib.contiguous(), "prompt": torch.tensor(prompt)}, str(inputs))
    say(f"wrote {inputs}: calibration {list(calib.shape)}, prompt {len(prompt)} tokens")
    say(f"prompt: {tok.decode(prompt)!r}")

    # the folder must be the GGUF model: transformers on it against our forward on the GGUF
    import transformers

    from tessera.models.harness import forward_chunks

    hf_model = transformers.LlamaForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf_model(torch.tensor([prompt])).logits[0]
    (got,) = forward_chunks(model, [[prompt]])
    diff = (got - want).abs().max().item()
    say(f"check: our fp32 logits on the GGUF vs transformers fp32 on {hf}: max |diff| {diff:.2e}")
    if diff > 1e-3:
        raise SystemExit(f"export: {hf} does not reproduce the GGUF's logits (max |diff| {diff})")


# -- 2. quantize (GPTQModel's venv) -----------------------------------------------------------------


def quantize(work: Path, out: Path, lm_head: bool = False) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig

    hf, inputs = work / "hf", load_file(work / "inputs.safetensors")
    if not (hf / "model.safetensors").is_file():
        raise SystemExit(f"quantize: {hf} has no model.safetensors (run the export step first)")
    os.chdir(work)  # GPTQModel writes logs/ into the working directory
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        say(f"{out} holds a checkpoint: not quantized again")
    else:
        calib = [
            {"input_ids": r[None], "attention_mask": torch.ones_like(r)[None]} for r in inputs["calibration"]
        ]
        cfg = QuantizeConfig(**QUANTIZE, lm_head=lm_head)
        say(f"GPTQModel quantizing {hf} on {len(calib)} rows of {calib[0]['input_ids'].shape[1]}: {cfg}")
        model = GPTQModel.load(str(hf), cfg, device="cpu")
        t0 = time.monotonic()
        model.quantize(calib, batch_size=1)
        quant_s = time.monotonic() - t0
        tmp = out.parent / f".{out.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        model.save(str(tmp))
        (tmp / "quant_log.csv").unlink(missing_ok=True)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
        say(f"quantized in {quant_s:.0f}s; saved {out}")
        (work / "quantize_seconds.json").write_text(json.dumps({"quantize_s": quant_s}))
        del model

    say(f"loading {out} with GPTQModel's torch kernel")
    model = GPTQModel.load(str(out), device="cpu", backend=BACKEND.GPTQ_TORCH)
    ref = {}
    for name, module in model.model.named_modules():
        if hasattr(module, "qweight"):
            ref[name] = module.dequantize_weight().T.contiguous()  # [out, in], the model's dtype
    with torch.no_grad():
        ref["logits"] = model.model(inputs["prompt"][None]).logits[0].float().contiguous()
    dtype = str(next(iter(ref.values())).dtype)
    save_file(ref, str(work / "reference.safetensors"), metadata={"dtype": dtype})
    say(f"wrote {work / 'reference.safetensors'}: {len(ref) - 1} linears ({dtype}) and logits")


# -- 3. compare (project venv) ----------------------------------------------------------------------


def _transformers_on(folder: Path, weights: dict):
    """transformers' fp32 LlamaForCausalLM from the folder's config (quantization_config dropped)
    holding ``weights`` (a tied head: the embedding)."""
    import transformers

    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("quantization_config")
    cfg.pop("dtype", None), cfg.pop("torch_dtype", None)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).float().eval()
    if cfg.get("tie_word_embeddings") and "lm_head.weight" not in weights:
        weights = {**weights, "lm_head.weight": weights["model.embed_tokens.weight"]}
    model.load_state_dict(weights, strict=True)
    return model


def compare(work: Path, out: Path, as_json: bool) -> None:
    import torch
    from safetensors.torch import load_file

    from tessera.engine import LLM
    from tessera.formats import GPTQTensor, open_checkpoint
    from tessera.models import load_model
    from tessera.models.harness import forward_chunks
    from tessera.sampling import SamplingParams

    ref = load_file(work / "reference.safetensors")
    prompt = load_file(work / "inputs.safetensors")["prompt"].tolist()
    ck = open_checkpoint(out)
    weights = dict(ck.weights())
    quantized = {n: t for n, t in weights.items() if isinstance(t, GPTQTensor)}
    theirs_names = {n for n in ref if n != "logits"}
    if {n.removesuffix(".weight") for n in quantized} != theirs_names:
        raise SystemExit(f"compare: our quantized linears differ from GPTQModel's ({len(quantized)} vs "
                         f"{len(theirs_names)})")  # fmt: skip
    res: dict = {"linears": len(quantized)}
    worst = (0.0, "")
    worst_rel = 0.0
    emulated_max = 0.0
    exact = 0
    for name, t in quantized.items():
        theirs = ref[name.removesuffix(".weight")]
        ours = t.dequantize(torch.float32)
        d = (ours - theirs.float()).abs()
        if d.max().item() > worst[0]:
            worst = (d.max().item(), name)
        worst_rel = max(worst_rel, (d / ours.abs().clamp_min(1e-30)).max().item())
        exact += int(d.max().item() == 0)
        # GPTQModel's arithmetic on our unpacked parts: bf16(bf16(scale) * (q - zero))
        g = t.group_index()
        s = t.scales.to(theirs.dtype).float()[g]
        emulated = ((t.int_weight() - t.int_zeros()[g]).float() * s).T.to(theirs.dtype)
        emulated_max = max(emulated_max, (emulated.float() - theirs.float()).abs().max().item())
    res |= {"dequant_max_abs": worst[0], "dequant_worst_linear": worst[1], "dequant_max_rel": worst_rel,
            "dequant_bit_exact_linears": exact, "dequant_vs_bf16_emulation_max_abs": emulated_max,
            "reference_dtype": str(ref[next(iter(theirs_names))].dtype)}  # fmt: skip
    say(
        f"dequantize: {len(quantized)} linears; max |ours(fp32) - GPTQModel({res['reference_dtype']})| "
        f"{worst[0]:.3e} ({worst[1]}), max relative {worst_rel:.3e}; {exact} bit-exact in fp32; "
        f"GPTQModel's bf16 arithmetic on our ints/scales/g_idx vs theirs: max |diff| {emulated_max:.3e}"
    )

    ours = load_model(ck, torch.float32)
    (our_logits,) = forward_chunks(ours, [[prompt[:17], prompt[17:]]], block_size=16)
    state = {
        n: t.dequantize(torch.float32) if isinstance(t, GPTQTensor) else t.float() for n, t in weights.items()
    }
    hf = _transformers_on(out, state)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        hf32 = hf(ids).logits[0]
        hf16 = hf.to(torch.bfloat16)(ids).logits[0].float()
    theirs = ref["logits"]

    def top1(a, b):
        return (a.argmax(-1) == b.argmax(-1)).float().mean().item()

    res |= {"prompt_tokens": len(prompt), "logits_abs_max": our_logits.abs().max().item()}
    for key, other in [("ours_vs_transformers_fp32", hf32), ("gptqmodel_vs_ours", theirs),
                       ("transformers_bf16_vs_ours", hf16)]:  # fmt: skip
        d = (other - our_logits).abs()
        res |= {f"{key}_max_abs": d.max().item(), f"{key}_mean_abs": d.mean().item(),
                f"{key}_top1": top1(other, our_logits)}  # fmt: skip
    res["gptqmodel_over_bf16_noise"] = (
        res["gptqmodel_vs_ours_max_abs"] / res["transformers_bf16_vs_ours_max_abs"]
    )
    say(f"logits on {len(prompt)} tokens (|logit| up to {res['logits_abs_max']:.1f}):")
    rows = [
        ("ours fp32 vs transformers fp32 (same weights)", "ours_vs_transformers_fp32"),
        ("GPTQModel's own (bf16) vs ours fp32", "gptqmodel_vs_ours"),
        ("transformers bf16 vs ours fp32 (noise yardstick)", "transformers_bf16_vs_ours"),
    ]
    for what, key in rows:
        say(
            f"  {what:48} max |diff| {res[key + '_max_abs']:.3e}  mean {res[key + '_mean_abs']:.3e}  "
            f"top-1 agreement {res[key + '_top1']:.4f}"
        )
    say(f"  GPTQModel's error / transformers-bf16's: {res['gptqmodel_over_bf16_noise']:.2f}")
    secs = work / "quantize_seconds.json"
    if secs.is_file():
        res |= json.loads(secs.read_text())

    del ours, hf
    llm = LLM(str(out), dtype="float32", max_model_len=512, kv_cache_memory=64 * 2**20)
    greedy = SamplingParams(temperature=0, max_tokens=48)
    t0 = time.monotonic()
    chat = llm.chat(
        [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}], greedy
    )
    text = llm.generate(["The Eiffel Tower is located in"], greedy)[0]
    res |= {"chat": chat.text, "completion": text.text, "generate_s": time.monotonic() - t0}
    say(f"LLM greedy chat: {chat.text!r}")
    say(f"LLM greedy completion of 'The Eiffel Tower is located in': {text.text!r}")
    if as_json:
        print(json.dumps(res))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="step", required=True)
    e = sub.add_parser("export", help="(project venv) the default model as an HF folder, and the inputs")
    e.add_argument("work", type=Path)
    e.add_argument("--model", default="smollm2-135m-instruct")
    e.add_argument(
        "--untie", action="store_true", help="the LM head as its own weight (for quantize --lm-head)"
    )
    q = sub.add_parser("quantize", help="(GPTQModel's venv) quantize WORK/hf into OUT; the reference")
    q.add_argument("work", type=Path)
    q.add_argument("out", type=Path)
    q.add_argument("--lm-head", action="store_true", help="GPTQModel's lm_head=True (its default: 8 bits)")
    c = sub.add_parser("compare", help="(project venv) ours against GPTQModel's on OUT")
    c.add_argument("work", type=Path)
    c.add_argument("out", type=Path)
    c.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.step == "export":
        export(args.work.resolve(), args.model, args.untie)
    elif args.step == "quantize":
        quantize(args.work.resolve(), args.out.resolve(), args.lm_head)
    else:
        compare(args.work.resolve(), args.out.resolve(), args.json)


if __name__ == "__main__":
    sys.exit(main())
