"""The bf16 path (the CPU's C kernels where the machine has them) against transformers on the
same bf16 weights: our bf16 logits must be as close to the float32 computation as
transformers' own bf16 run is."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tessera.formats import open_checkpoint  # noqa: E402
from tessera.kernels_cpu import attention, native  # noqa: E402
from tessera.models import load_model  # noqa: E402
from tessera.models.harness import forward_chunks  # noqa: E402


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("heads,kv_heads", [(3, 1), (4, 2)])
def test_bf16_logits_are_as_close_to_fp32_as_transformers_bf16(tmp_path, monkeypatch, heads, kv_heads):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=160,
        hidden_size=64 * heads,  # head size 64, as the C kernels take it
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
    )
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.1 if p.dim() > 1 else 1.0)
    hf.to(torch.bfloat16).save_pretrained(tmp_path)
    hf_bf16 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    hf_fp32 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()

    calls = []
    real = attention._native_bf16
    monkeypatch.setattr(attention, "_native_bf16", lambda *a: calls.append(1) or real(*a))
    ours = load_model(open_checkpoint(tmp_path), dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 160, (n,), generator=g).tolist() for n in (150, 70)]
    # chunked: the first sequence's second chunk starts at position 60
    got = forward_chunks(ours, [[seqs[0][:60], seqs[0][60:]], [seqs[1]]], block_size=16)
    if native.library() is not None:
        assert calls, "the C attention kernel did not run"
    for ids, logits in zip(seqs, got, strict=True):
        with torch.no_grad():
            ref = hf_fp32(torch.tensor([ids])).logits[0]
            theirs = hf_bf16(torch.tensor([ids])).logits[0].float()
        ours_err, theirs_err = rel_err(logits, ref), rel_err(theirs, ref)
        assert ours_err < 1.5 * theirs_err + 1e-3, (ours_err, theirs_err)
