"""Tiny random-weight Mixtral, Qwen2-MoE and Qwen3-MoE models built with transformers, saved as
HF folders (with a word-level tokenizer) and written to GGUF as llama.cpp's converter would
(expert stacks ``ffn_*_exps`` quantized with gguf's own quantizer, Mixtral's q/k rows
permuted), for ``test_moe_vs_transformers.py``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

VOCAB = 320
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=128,
    num_experts_per_tok=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)
CONFIGS = {
    # top-2 of 8, renormalized; 4 query heads of 32 over 2 key/value heads
    "mixtral": (
        "MixtralConfig",
        dict(num_local_experts=8, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32),
    ),
    # q/k/v biases, a gated shared expert, routing weights not renormalized, layer 1 dense
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(num_experts=6, moe_intermediate_size=64, shared_expert_intermediate_size=96,
             intermediate_size=96, norm_topk_prob=False, mlp_only_layers=[1], num_hidden_layers=3,
             num_attention_heads=2, num_key_value_heads=1, head_dim=64),
    ),
    # QK-norm, renormalized; 4 heads of 64 (q is wider than the hidden size)
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(num_experts=4, moe_intermediate_size=64, intermediate_size=96, norm_topk_prob=True,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64),
    ),
}  # fmt: skip


def save_word_tokenizer(folder: Path) -> None:
    """A word-level tokenizer over t0..t{VOCAB-1}, enough for an HF folder to be complete."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "t1"}))


def build_hf(name: str, folder: Path, std: float = 0.3, **save_kwargs):
    """The random model ``name``, saved (safetensors) in ``folder`` with a tokenizer."""
    import transformers

    cls, overrides = CONFIGS[name]
    torch.manual_seed(0)
    config = getattr(transformers, cls)(**COMMON, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std if p.dim() > 1 else 1.0)
    model.save_pretrained(folder, **save_kwargs)
    save_word_tokenizer(folder)
    return model.eval()


# -- GGUF -------------------------------------------------------------------------------------


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter's q/k row order for what it converts as Llama (Mixtral)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(hf, arch: str) -> dict[str, np.ndarray]:
    """The HF model's tensors under llama.cpp's names, as fp32 arrays (experts ``[E, N, K]``)."""
    c = hf.config
    sd = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
    out = {
        "token_embd.weight": sd["model.embed_tokens.weight"],
        "output_norm.weight": sd["model.norm.weight"],
    }
    out["output.weight"] = sd["lm_head.weight"]
    dense = set(getattr(c, "mlp_only_layers", []) or [])
    for i in range(c.num_hidden_layers):
        hf_, b = f"model.layers.{i}", f"blk.{i}"
        a = f"{hf_}.self_attn"
        out[f"{b}.attn_norm.weight"] = sd[f"{hf_}.input_layernorm.weight"]
        out[f"{b}.ffn_norm.weight"] = sd[f"{hf_}.post_attention_layernorm.weight"]
        q, k = sd[f"{a}.q_proj.weight"], sd[f"{a}.k_proj.weight"]
        if arch == "llama":
            q = llama_cpp_permute(q, c.num_attention_heads)
            k = llama_cpp_permute(k, c.num_key_value_heads)
        out |= {
            f"{b}.attn_q.weight": q,
            f"{b}.attn_k.weight": k,
            f"{b}.attn_v.weight": sd[f"{a}.v_proj.weight"],
        }
        out[f"{b}.attn_output.weight"] = sd[f"{a}.o_proj.weight"]
        for x in "qkv":
            if f"{a}.{x}_proj.bias" in sd:
                out[f"{b}.attn_{x}.bias"] = sd[f"{a}.{x}_proj.bias"]
        if f"{a}.q_norm.weight" in sd:
            out[f"{b}.attn_q_norm.weight"] = sd[f"{a}.q_norm.weight"]
            out[f"{b}.attn_k_norm.weight"] = sd[f"{a}.k_norm.weight"]
        m = f"{hf_}.mlp"
        if i in dense:
            for x in ("gate", "up", "down"):
                out[f"{b}.ffn_{x}.weight"] = sd[f"{m}.{x}_proj.weight"]
            continue
        gate_up = sd[f"{m}.experts.gate_up_proj"]
        n = gate_up.shape[1] // 2
        out[f"{b}.ffn_gate_inp.weight"] = sd[f"{m}.gate.weight"]
        out[f"{b}.ffn_gate_exps.weight"] = gate_up[:, :n]
        out[f"{b}.ffn_up_exps.weight"] = gate_up[:, n:]
        out[f"{b}.ffn_down_exps.weight"] = sd[f"{m}.experts.down_proj"]
        if f"{m}.shared_expert_gate.weight" in sd:
            for x in ("gate", "up", "down"):
                out[f"{b}.ffn_{x}_shexp.weight"] = sd[f"{m}.shared_expert.{x}_proj.weight"]
            out[f"{b}.ffn_gate_inp_shexp.weight"] = sd[f"{m}.shared_expert_gate.weight"]
    return out


QUANTIZED = ("_exps.weight", "_shexp.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")


def quantized(name: str) -> bool:
    """The MLP matrices; routers and the shared expert's gate stay F32, as llama.cpp keeps them."""
    return name.endswith(QUANTIZED) and "gate_inp" not in name


def write_gguf(
    hf, path: Path, qtype: str, squeeze_shared_gate: bool = False, edit=None, meta=None, attention=False
) -> dict:
    """``hf`` as llama.cpp's converter writes it, every MLP matrix (experts, shared expert, dense
    MLP) in ``qtype`` and the rest in F32. ``squeeze_shared_gate``: the shared expert's gate as
    ``[H]`` (older converters) instead of ``[1, H]``. ``edit(tensors)`` may damage the tensors
    first; ``meta`` adds metadata (key -> (kind, value)). Returns the fp32 weights the file
    holds once dequantized, by GGUF name. ``attention``: the attention matrices in ``qtype`` too
    (as real files have them: what the fused CPU stack needs)."""
    import gguf

    c = hf.config
    arch = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}[c.model_type]
    tensors = gguf_tensors(hf, arch)
    if edit is not None:
        edit(tensors)
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_expert_count(c.num_local_experts if arch == "llama" else c.num_experts)
    w.add_expert_used_count(c.num_experts_per_tok)
    w.add_feed_forward_length(c.intermediate_size)
    if arch != "llama":
        w.add_expert_feed_forward_length(c.moe_intermediate_size)
    if getattr(c, "shared_expert_intermediate_size", 0):
        w.add_expert_shared_feed_forward_length(c.shared_expert_intermediate_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([f"t{i}" for i in range(VOCAB)])
    w.add_eos_token_id(1)
    for key, (kind, value) in (meta or {}).items():
        getattr(w, f"add_{kind}")(key, value)
    held = {}
    kind = gguf.GGMLQuantizationType[qtype]
    for name, value in tensors.items():
        if name.endswith("ffn_gate_inp_shexp.weight") and squeeze_shared_gate:
            value = value.reshape(-1)
        attn = attention and ".attn_" in name and "norm" not in name
        if quantized(name) or attn:
            raw = gguf.quants.quantize(np.ascontiguousarray(value), kind)
            w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=kind)
            held[name] = gguf.quants.dequantize(raw, kind)
        else:
            w.add_tensor(name, np.ascontiguousarray(value, dtype=np.float32))
            held[name] = value
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return held


def load_dequantized(hf, held: dict) -> None:
    """Put the GGUF file's dequantized MLP weights into ``hf`` (what it is compared on)."""
    sd = hf.state_dict()
    with torch.no_grad():
        for name, value in held.items():
            if not quantized(name):
                continue
            b, rest = name.split(".", 2)[1], name.split(".", 2)[2].removesuffix(".weight")
            m = f"model.layers.{b}.mlp"
            t = torch.from_numpy(np.array(value, dtype=np.float32))
            if rest in ("ffn_gate_exps", "ffn_up_exps"):
                n = t.shape[1]
                part = slice(0, n) if rest == "ffn_gate_exps" else slice(n, 2 * n)
                sd[f"{m}.experts.gate_up_proj"][:, part] = t
            elif rest == "ffn_down_exps":
                sd[f"{m}.experts.down_proj"][:] = t
            elif rest.endswith("_shexp"):
                sd[f"{m}.shared_expert.{rest[4:-6]}_proj.weight"][:] = t
            else:
                sd[f"{m}.{rest[4:]}_proj.weight"][:] = t
