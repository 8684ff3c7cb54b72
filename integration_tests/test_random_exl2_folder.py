"""tools/bench/make_random_exl2.py: the random EXL2 folder gpu_check benches and hands to
exllamav2 has exllamav2's layout (5/4/3-bit groups widest first behind a permutation, a 6-bit
head), the spread its docstring promises, a tokenizer that ``tokenizers`` round-trips, and loads
in our engine."""

import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(layers=1, hidden=256, ffn=768, heads=4, kv_heads=2, vocab=1024)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    sys.path.insert(0, str(ROOT / "tools/bench"))  # make_random_exl2 imports make_random_gguf
    try:
        import make_random_exl2
    finally:
        sys.path.remove(str(ROOT / "tools/bench"))
    path = make_random_exl2.write(tmp_path_factory.mktemp("exl2") / "random", **TINY)
    return path, make_random_exl2.stored_bits(path)


def linears(path):
    from tessera.formats import EXL2Tensor, open_checkpoint

    return {n: t for n, t in open_checkpoint(path).weights() if isinstance(t, EXL2Tensor)}


def test_linears_mix_5_4_3_bits_widest_first_behind_a_permutation_and_the_head_is_6_bit(folder):
    path, _ = folder
    found = linears(path)
    assert len(found) == 7 + 1
    # 256 inputs: 2 groups of 128 (10% of 2 rounds to none); 768 inputs: 6 groups, one 5 and one 3
    assert found["model.layers.0.mlp.down_proj.weight"].group_bits == (5, 4, 4, 4, 4, 3)
    assert found["model.layers.0.self_attn.q_proj.weight"].group_bits == (4, 4)
    assert set(found["lm_head.weight"].group_bits) == {6}
    for t in found.values():
        assert t.group_starts == tuple(range(0, t.shape[1] + 1, 128))
        assert not torch.equal(t.q_invperm.long(), torch.arange(t.shape[1]))


def test_stored_bits_read_from_the_header_equal_the_bytes_the_loader_holds(folder):
    path, bits = folder
    decoder = [t for n, t in linears(path).items() if ".layers." in n]
    want = sum(8 * t.nbytes for t in decoder) / sum(math.prod(t.shape) for t in decoder)
    assert bits["decoder_bpw"] == pytest.approx(want, rel=1e-12)
    assert 4.0 < bits["decoder_bpw"] < 4.2  # 4.0 bits of integers, then scales and permutation
    assert bits["head_bpw"] == pytest.approx(linears(path)["lm_head.weight"].bits_per_weight, rel=1e-12)


def test_weights_have_about_the_spread_that_keeps_activations_at_unit_size(folder):
    """Scales aim at ``jitter / sqrt(fan_in)`` standard deviations, jitter uniform in 0.5..1
    (root mean square 0.76) before EXL2's grid rounds them."""
    path, _ = folder
    for name, t in linears(path).items():
        std = float(t.dequantize().std()) * math.sqrt(t.shape[1])
        assert 0.6 < std < 0.95, name


def test_the_tokenizer_round_trips_text_through_byte_tokens_and_the_engine_generates(folder):
    from tokenizers import Tokenizer

    from tessera.engine import LLM
    from tessera.sampling import SamplingParams

    path, _ = folder
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    text = "héllo wörld, 1+1=2 🙂"
    ids = tok.encode(text).ids
    assert len(ids) == len(text.encode()) and max(ids) < 256
    assert tok.decode(ids) == text
    llm = LLM(str(path), dtype="float32", max_model_len=64, kv_cache_memory=1 << 20)
    (out,) = llm.generate([text], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert len(out.token_ids) == 4
    assert llm.tokenizer.eos_token_ids == (TINY["vocab"] - 1,)
