"""GPTQ and AWQ checkpoints of a random-weight tiny Llama made by GPTQModel and AutoAWQ (tools
nobody here wrote), with the tool's own dequantized weights and logits, as fixtures for
packages/formats/tests/test_gptq.py and integration_tests/test_gptq_checkpoints.py.

Runs in a throwaway venv, not the project's (GPTQModel pins its own stack):

    uv venv /tmp/gptq-venv --python 3.11
    uv pip install --python /tmp/gptq-venv torch transformers gptqmodel autoawq
    GPTQMODEL_CPU_WORKERS=2 /tmp/gptq-venv/bin/python tools/make_gptq_fixtures.py OUT_DIR [NAME ...]

Each case NAME is written to OUT_DIR/NAME/: the HF folder GPTQModel saved (config.json with its
quantization_config, model.safetensors, tokenizer), ``reference.safetensors`` holding for every
quantized linear ``<module>`` GPTQModel's ``dequantize_weight()`` (for AWQ its ``dequantize_gemm``)
as ``[out, in]`` (in the dtype it computes in: bfloat16), and ``logits`` (float32
``[len(PROMPT), vocab]``) of GPTQModel's own model (its torch kernel on the CPU, bfloat16
activations) on PROMPT.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

VOCAB = 160
PROMPT = [3, 17, 42, 99, 5, 150, 77, 8, 23, 64, 111, 2]

# name -> QuantizeConfig keyword arguments
CASES = {
    "gptq-4bit-g32-actorder-asym-v1": dict(bits=4, group_size=32, desc_act=True, sym=False, format="gptq"),
    "gptq-3bit-g32-sym-v1": dict(bits=3, group_size=32, desc_act=False, sym=True, format="gptq"),
    "gptq-2bit-perchannel-asym-v2": dict(
        bits=2, group_size=-1, desc_act=False, sym=False, format="gptq_v2", act_group_aware=False
    ),
    "gptq-8bit-g64-actorder-sym-v2": dict(bits=8, group_size=64, desc_act=True, sym=True, format="gptq_v2"),
    # the LM head quantized too: GPTQModel gives it 8 bits through `dynamic` unless told otherwise
    "gptq-4bit-g32-actorder-sym-v1-lmhead": dict(
        bits=4, group_size=32, desc_act=True, sym=True, format="gptq", lm_head=True
    ),
    # per-module overrides: an 8-bit head of groups of 64, layer 1's MLP at 8 bits, layer 0's
    # o_proj left unquantized
    "gptq-4bit-g32-sym-v1-dynamic": dict(
        bits=4,
        group_size=32,
        desc_act=False,
        sym=True,
        format="gptq",
        lm_head=True,
        dynamic={
            "lm_head": {"bits": 8, "group_size": 64},
            r"+:.*\.1\.mlp\..*": {"bits": 8, "group_size": 64},
            r"-:.*\.0\.self_attn\.o_proj": {},
        },
    ),
    "awq-4bit-g32-sym-gemm": dict(bits=4, group_size=32, quant_method="awq", format="gemm"),
    "awq-4bit-g64-asym-gemm": dict(bits=4, group_size=64, sym=False, quant_method="awq", format="gemm"),
}
# made with AutoAWQ (pip install autoawq) instead of GPTQModel: AutoAWQ's quant_config
AUTOAWQ_CASES = {
    "autoawq-4bit-g32-gemm": {"zero_point": True, "q_group_size": 32, "w_bit": 4, "version": "GEMM"},
}
# the AWQ searches need every output size a multiple of 64
MODEL_OVERRIDES = {name: {"num_key_value_heads": 4} for name in [*CASES, *AUTOAWQ_CASES] if "awq" in name}


def random_llama(folder: Path, num_key_value_heads: int = 2) -> None:
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
    )
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 if p.dim() > 1 else 1.0)
    model.save_pretrained(folder)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "t1", "pad_token": "t0", "tokenizer_class": "PreTrainedTokenizerFast"})
    )


def make_case(base: Path, out: Path, kwargs: dict) -> None:
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    calib = [
        {
            "input_ids": torch.randint(2, VOCAB, (1, 64), generator=g),
            "attention_mask": torch.ones(1, 64, dtype=torch.long),
        }
        for _ in range(16)
    ]
    model = GPTQModel.load(str(base), QuantizeConfig(**kwargs), device="cpu")
    model.quantize(calib, batch_size=1)
    model.save(str(out))
    del model

    backend = BACKEND.GPTQ_TORCH if kwargs.get("quant_method") != "awq" else BACKEND.AWQ_TORCH
    model = GPTQModel.load(str(out), device="cpu", backend=backend)
    ref = {}
    for name, module in model.model.named_modules():
        if not hasattr(module, "qweight"):
            continue
        if hasattr(module, "dequantize_weight"):
            w = module.dequantize_weight()
        else:  # GPTQModel's AWQ modules dequantize through its dequantize_gemm
            from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

            w = dequantize_gemm(module.qweight, module.qzeros, module.scales, module.bits, module.group_size)
        # [in, out] in the model's dtype (bf16 here); kept as it is, lossless and half the size
        ref[name] = w.T.contiguous()
    with torch.no_grad():
        logits = model.model(torch.tensor([PROMPT])).logits[0].float()
    ref["logits"] = logits.contiguous()
    save_file(ref, str(out / "reference.safetensors"))
    for junk in ("quant_log.csv",):
        (out / junk).unlink(missing_ok=True)


def make_autoawq_case(base: Path, out: Path, quant_config: dict) -> None:
    """The same with AutoAWQ: its checkpoint, its ``dequantize_gemm`` of every WQLinear_GEMM and
    the logits of its quantized model (its CPU path: dequantize_gemm, then an fp16 matmul)."""
    from awq import AutoAWQForCausalLM
    from awq.modules.linear.gemm import WQLinear_GEMM
    from awq.utils.packing_utils import dequantize_gemm
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    g = torch.Generator().manual_seed(1)
    calib = [torch.randint(2, VOCAB, (64,), generator=g).tolist() for _ in range(16)]
    model = AutoAWQForCausalLM.from_pretrained(str(base), device_map="cpu")
    model.quantize(
        AutoTokenizer.from_pretrained(str(base)),
        quant_config=quant_config,
        calib_data=calib,
        max_calib_samples=16,
        max_calib_seq_len=64,
        n_parallel_calib_samples=4,
    )
    model.save_quantized(str(out))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base / name, out / name)
    ref = {}
    for name, module in model.model.named_modules():
        if isinstance(module, WQLinear_GEMM):
            w = dequantize_gemm(module.qweight, module.qzeros, module.scales, module.w_bit, module.group_size)
            ref[name] = w.T.contiguous()
    import awq.modules.linear.gemm as awq_gemm

    awq_gemm.TRITON_AVAILABLE = False  # its Triton kernel needs a GPU; this is its own CPU fallback
    with torch.no_grad():
        ref["logits"] = model.model(torch.tensor([PROMPT])).logits[0].float().contiguous()
    save_file(ref, str(out / "reference.safetensors"))


def main() -> None:
    root = Path(sys.argv[1]).resolve()
    names = sys.argv[2:] or [*CASES, *AUTOAWQ_CASES]
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # GPTQModel writes logs/ into the working directory
        for name in names:
            base = Path(tmp) / name
            base.mkdir()
            random_llama(base, **MODEL_OVERRIDES.get(name, {}))
            out = root / name
            shutil.rmtree(out, ignore_errors=True)
            if name in AUTOAWQ_CASES:
                make_autoawq_case(base, out, AUTOAWQ_CASES[name])
            else:
                make_case(base, out, CASES[name])
            print("made", out, flush=True)


if __name__ == "__main__":
    main()
