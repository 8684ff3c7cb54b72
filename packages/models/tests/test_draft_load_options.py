"""A model loaded as a lean speculative draft: its linear weights re-quantized at load
(``quantize``) and its LM head cut to part of the vocabulary (``lm_head_rows``). References:
transformers on the same random weights, round-tripped through the ``gguf`` package's own
quantizer and dequantizer; the same checkpoint loaded without the options."""

import gguf
import numpy as np
import pytest
import torch
from gguf import quants

transformers = pytest.importorskip("transformers")

from tessera.formats import open_checkpoint  # noqa: E402
from tessera.models import load_model  # noqa: E402
from tessera.models.harness import forward_chunks  # noqa: E402

# a tiny untied Llama: every linear's inputs a whole number of 32-blocks
CONFIG = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2)
CONFIG |= dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build(tmp_path, **overrides):
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(
        transformers.LlamaConfig(**CONFIG | overrides), dtype=torch.float32
    )
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.3 if p.dim() > 1 else 1.0)
    hf.save_pretrained(tmp_path)
    return hf.eval()


def round_trip(hf, scheme: str) -> None:
    """Every linear weight of ``hf``'s layers replaced by its ``scheme`` blocks dequantized, and
    the (dense) LM head by its Q8_0 blocks, by gguf-py."""
    with torch.no_grad():
        for name, module in hf.named_modules():
            last = name.split(".")[-1]
            if last in LINEAR or last == "lm_head":
                qtype = getattr(gguf.GGMLQuantizationType, scheme if last in LINEAR else "Q8_0")
                w = module.weight.numpy()
                module.weight.copy_(torch.from_numpy(quants.dequantize(quants.quantize(w, qtype), qtype)))


def logits(model, ids):
    (out,) = forward_chunks(model, [[ids]], 4, 0)
    return out


IDS = torch.randint(0, 160, (23,), generator=torch.Generator().manual_seed(1)).tolist()


@pytest.mark.parametrize("scheme", ["Q4_0", "Q8_0"])
def test_requantized_weights_match_transformers_on_the_round_tripped_weights(tmp_path, scheme):
    hf = build(tmp_path)
    ours = load_model(open_checkpoint(tmp_path), packed_weights=True, quantize=scheme)
    assert ours.layers[0].mlp.down_proj.weight.scheme == scheme and ours.lm_head.weight.scheme == "Q8_0"
    round_trip(hf, scheme)
    with torch.no_grad():
        ref = hf(torch.tensor([IDS])).logits[0]
    assert (logits(ours, IDS) - ref).abs().max().item() < 1e-3


def test_a_dense_tied_head_becomes_q8_0_and_still_looks_up_its_rows(tmp_path):
    hf = build(tmp_path, tie_word_embeddings=True)
    ours = load_model(open_checkpoint(tmp_path), packed_weights=True, quantize="Q4_0")
    assert ours.lm_head.weight is ours.embed_tokens.weight and ours.lm_head.weight.scheme == "Q8_0"
    round_trip(hf, "Q4_0")
    with torch.no_grad():  # the tied table round-tripped through Q8_0, for lookups and logits alike
        q8 = gguf.GGMLQuantizationType.Q8_0
        w = hf.model.embed_tokens.weight
        w.copy_(torch.from_numpy(quants.dequantize(quants.quantize(w.numpy(), q8), q8)))
        ref = hf(torch.tensor([IDS])).logits[0]
    assert (logits(ours, IDS) - ref).abs().max().item() < 1e-3


def test_an_lm_head_of_some_rows_scores_those_rows_only(tmp_path):
    hf = build(tmp_path)
    rows = list(range(3, 160, 5))[:32]  # 32 rows: whole groups of 16 for the packed kernels
    ours = load_model(open_checkpoint(tmp_path), packed_weights=True, lm_head_rows=rows)
    got = logits(ours, IDS)
    with torch.no_grad():
        ref = hf(torch.tensor([IDS])).logits[0]
    others = np.setdiff1d(np.arange(160), rows)
    assert got.shape == ref.shape
    assert torch.isneginf(got[:, others]).all()
    assert (got[:, rows] - ref[:, rows]).abs().max().item() < 1e-4
    # tokens of a request's context join the head: scored as the whole head scores them
    head = ours.lm_head
    head.include([rows[0], others[0], others[1], others[0]])
    got = logits(ours, IDS)
    assert (got[:, others[:2]] - ref[:, others[:2]]).abs().max().item() < 1e-4
    assert torch.isneginf(got[:, others[2:]]).all()
    head.max_context_rows = 3  # past it: the rows no request holds go first ...
    head.include(others[2:4].tolist(), owner="a")
    assert head.context_rows == 2  # others[0:2] had no owner: dropped to make room
    head.include(others[4:5].tolist(), owner="b")
    head.include(others[2:3].tolist(), owner="b")  # held by both a and b
    assert head.context_rows == 3
    # ... and where the requests alive hold more than the cap, every row goes, these come in
    head.include(others[5:7].tolist(), owner="c")
    got = logits(ours, IDS)
    assert (got[:, others[5:7]] - ref[:, others[5:7]]).abs().max().item() < 1e-4
    assert torch.isneginf(got[:, others[:5]]).all()
    # a request's rows live as long as it does: a and b come back, c is done
    head.max_context_rows = 4096
    head.include(others[2:5].tolist(), owner="b")
    head.forget(["c"])  # 2 of 5 rows unheld: kept until they are half
    assert head.context_rows == 5
    head.forget(["b"])  # only others[2:4] (a's) remain held
    assert head.context_rows == 2
    got = logits(ours, IDS)
    assert (got[:, others[2:4]] - ref[:, others[2:4]]).abs().max().item() < 1e-4
    assert torch.isneginf(got[:, others[4:7]]).all()
    head.forget(["a", "unknown"])
    assert head.context_rows == 0 and torch.isneginf(logits(ours, IDS)[:, others]).all()
    with pytest.raises(ValueError, match="token ids in 0..159"):
        load_model(open_checkpoint(tmp_path), lm_head_rows=[0, 160])


def test_the_default_model_tied_head_cut_and_requantized(default_model_path):
    """Tied embeddings (the default model's Q8_0 table): the cut head takes its own rows and
    re-quantizes them; lookups keep the whole table as stored."""
    ck = open_checkpoint(default_model_path)
    full = load_model(ck, packed_weights=True)
    rows = list(range(0, 4096))
    cut = load_model(ck, packed_weights=True, lm_head_rows=rows)
    lean = load_model(ck, packed_weights=True, lm_head_rows=rows, quantize="Q4_0")
    text = "The capital of France is Paris. The capital of Italy is Rome, and the capital of Spain is"
    ids = ck.tokenizer().encode(text) + [4096 + 17, 40000]  # and two outside the head's rows
    a, b, c = logits(full, ids), logits(cut, ids), logits(lean, ids)
    assert (b[:, :4096] - a[:, :4096]).abs().max().item() < 1e-4
    assert torch.isneginf(b[:, 4096:]).all() and torch.isneginf(c[:, 4096:]).all()
    # the head keeps the table's Q8_0; the layers, Q4_1 as stored, become Q4_0
    assert lean.embed_tokens.weight.scheme == "Q8_0" and lean.lm_head.weight.scheme == "Q8_0"
    assert lean.layers[0].mlp.down_proj.weight.scheme == "Q4_0"
    x, y = a[:, :4096].flatten(), c[:, :4096].flatten()
    assert torch.corrcoef(torch.stack([x, y]))[0, 1] > 0.9  # a 4-bit draft still scores much alike
