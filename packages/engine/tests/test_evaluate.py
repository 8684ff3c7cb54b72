"""``tessera eval``: its metrics against independent math (torch.distributions, scipy, HF
transformers' loss and greedy generation), bits per weight against the formats' own layouts, and
the command end to end on tiny random GGUF models (F32 and the same weights as gguf's Q8_0)."""

import json
import math
import random
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from scipy.special import rel_entr

from tessera.engine.cli import main
from tessera.engine.eval_metrics import Tally, compress, kl_divergence, log_probs
from tessera.engine.evaluate import score_windows
from tessera.engine.last_word import Item, first_word, greedy, last_word_items
from tessera.engine.weight_bits import linear_bits
from tessera.formats import open_checkpoint
from tessera.models import load_model

FIXTURES = Path(__file__).resolve().parents[2] / "formats" / "tests" / "fixtures" / "gptq"
HIDDEN, FFN, HEADS, KV_HEADS, LAYERS = 64, 128, 4, 2, 2


# --- metrics against independent math ---------------------------------------------------------


def random_log_probs(n: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(n, vocab, generator=g) * 3
    q = p + torch.randn(n, vocab, generator=g) * 0.5
    return log_probs(p), log_probs(q)


def test_kl_with_the_whole_vocabulary_kept_equals_torch_distributions():
    logp, logq = random_log_probs(7, 50, seed=0)
    ours = kl_divergence(compress(logp, k=50), logq)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Categorical(logits=logp.double()),
        torch.distributions.Categorical(logits=logq.double()),
    )
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-9)


def test_kl_over_top_k_is_scipys_kl_of_the_top_k_and_the_tail_as_one_outcome_and_a_lower_bound():
    logp, logq = random_log_probs(5, 40, seed=1)
    k = 6
    ours = kl_divergence(compress(logp, k), logq)
    p, q = logp.double().exp().numpy(), logq.double().exp().numpy()
    for row in range(5):
        top = np.argsort(-p[row])[:k]
        rest = np.setdiff1d(np.arange(40), top)
        pc = np.append(p[row, top], p[row, rest].sum())
        qc = np.append(q[row, top], q[row, rest].sum())
        assert ours[row].item() == pytest.approx(rel_entr(pc, qc).sum(), rel=1e-5)  # float32 log-probs
        assert ours[row].item() <= rel_entr(p[row], q[row]).sum() + 1e-12


def test_tally_counts_perplexity_top1_agreement_and_the_baselines_tail():
    logp, logq = random_log_probs(9, 30, seed=2)
    targets = torch.randint(0, 30, (9,), generator=torch.Generator().manual_seed(3))
    base = compress(logp, k=4)
    tally = Tally()
    tally.add(logq, targets, base)
    nll = -logq.double()[torch.arange(9), targets].mean().item()
    assert tally.perplexity == pytest.approx(math.exp(nll), rel=1e-9)
    assert tally.top1_agreement == (logq.argmax(-1) == logp.argmax(-1)).sum().item() / 9
    tail = 1 - logp.double().exp().topk(4, dim=-1).values.sum(-1)
    assert tally.mean_baseline_tail == pytest.approx(tail.mean().item(), rel=1e-5)


def test_the_baseline_against_itself_has_zero_kl_and_full_agreement():
    logp, _ = random_log_probs(4, 20, seed=4)
    tally = Tally()
    tally.add(logp, torch.zeros(4, dtype=torch.long), compress(logp, k=3))
    assert tally.mean_kl == 0.0 and tally.top1_agreement == 1.0


def test_window_perplexity_equals_transformers_loss_on_a_tiny_random_llama(hf_llama):
    hf, ours = hf_llama
    g = torch.Generator().manual_seed(5)
    windows = [torch.randint(0, 160, (33,), generator=g).tolist() for _ in range(3)]
    tally, _ = score_windows(ours, windows, None, top_k=8)
    with torch.no_grad():
        losses = [hf(torch.tensor([w]), labels=torch.tensor([w])).loss.item() for w in windows]
    assert tally.positions == 3 * 32
    assert tally.perplexity == pytest.approx(math.exp(sum(losses) / 3), rel=1e-4)


# --- last-word items and greedy completion ------------------------------------------------------


def test_last_word_items_take_long_paragraphs_ending_in_a_word_and_match_the_first_word():
    words = " ".join(["alpha"] * 55)
    doc = "\n".join(
        [
            f"{words} Paris.",  # kept: target Paris
            "Too short to count Paris.",
            f"{words} 1999.",  # the last word is a number
            f"{words} (Rome)",  # ends in a bracket
            f"{words} Zürich",  # letters beyond ASCII, no full stop
        ]
    )
    assert last_word_items([doc], 10) == [Item(f"{words}", "Paris"), Item(f"{words}", "Zürich")]
    assert last_word_items([doc], 1) == [Item(f"{words}", "Paris")]
    assert last_word_items([doc], 0) == []
    assert [first_word(t) for t in (" Paris.", "\nParis,", " Parisian", " paris", "3 Paris", "")] == [
        "Paris",
        "Paris",
        "Parisian",
        "paris",
        "",
        "",
    ]


def test_greedy_continuations_equal_transformers_greedy_generate(hf_llama):
    hf, ours = hf_llama
    rng = random.Random(6)
    prompts = [[rng.randrange(160) for _ in range(n)] for n in (5, 17, 30)]
    budgets = [3, 1, 6]
    got = greedy(ours, prompts, budgets, stop=set(), block_size=4)
    for prompt, n, tokens in zip(prompts, budgets, got, strict=True):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None)
        assert tokens == ref[0, len(prompt) :].tolist()


# --- bits per weight ----------------------------------------------------------------------------


def test_bits_per_weight_of_gguf_f32_and_q8_0_linears(tmp_path):
    f32, q8 = write_pair(tmp_path)
    assert linear_bits(open_checkpoint(f32)).per_weight == 32.0
    bits = linear_bits(open_checkpoint(q8))
    assert bits.per_weight == 34 * 8 / 32  # a Q8_0 block: fp16 scale + 32 int8
    assert bits.weights == LAYERS * (HIDDEN * (HIDDEN + 2 * HIDDEN // 2 + HIDDEN) + 3 * HIDDEN * FFN)


def test_bits_per_weight_of_a_gptq_checkpoint_from_its_config_and_shapes():
    folder = FIXTURES / "gptq-4bit-g32-actorder-asym-v1"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent")
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    b, group = config["bits"], config["group_size"]
    ck = open_checkpoint(folder)
    expected_bits = expected_weights = 0
    for name, t in ck.weights():
        if ".layers." in name and name.endswith(".weight") and len(t.shape) == 2:
            n_out, n_in = t.shape
            groups = math.ceil(n_in / group)
            # qweight + qzeros (bits each), fp16 scales per group and output, int32 g_idx per input
            expected_bits += n_out * n_in * b + groups * n_out * (b + 16) + 32 * n_in
            expected_weights += n_out * n_in
    got = linear_bits(ck)
    assert (got.bits, got.weights) == (expected_bits, expected_weights)


# --- the command end to end ---------------------------------------------------------------------


def test_eval_of_f32_and_q8_0_writes_json_and_plot(tmp_path, capsys):
    f32, q8 = write_pair(tmp_path)
    text = write_text(tmp_path / "text.txt")
    out = tmp_path / "out"
    args = ["eval", str(q8), str(f32), "--text", str(text), "--tokens", "200", "--window", "64"]
    args += ["--last-word-items", "2", "--kl-top-k", "16", "--out", str(out), "--device", "cpu"]
    assert main(args) == 0
    doc = json.loads((out / "eval.json").read_text())
    assert doc["baseline"] == str(f32) and doc["command"] == ["tessera", *args]
    assert (doc["windows"], doc["window"], doc["tokens"], doc["predictions"]) == (3, 64, 192, 189)
    assert doc["text"] == str(text) and doc["last_word_items"] == 2
    q8_row, f32_row = doc["models"]
    assert (q8_row["model"], f32_row["model"]) == (str(q8), str(f32))
    assert (q8_row["bits_per_weight"], f32_row["bits_per_weight"]) == (8.5, 32.0)
    assert f32_row["kl_divergence"] == 0.0 and f32_row["top1_agreement"] == 1.0
    assert 0 < q8_row["kl_divergence"] < 0.05 and q8_row["top1_agreement"] > 0.5
    assert q8_row["perplexity"] == pytest.approx(f32_row["perplexity"], rel=0.05)
    assert all(r["last_word_items"] == 2 and 0 <= r["last_word_accuracy"] <= 1 for r in doc["models"])
    assert (out / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    assert "perplexity" in table and "tiny-f32 *" in table


def test_eval_with_an_explicit_baseline_scores_the_others_against_it(tmp_path):
    f32, q8 = write_pair(tmp_path)
    text = write_text(tmp_path / "text.txt")
    out = tmp_path / "out"
    args = ["eval", str(f32), "--baseline", str(q8), "--text", str(text), "--tokens", "64", "--window", "64"]
    assert main([*args, "--last-word-items", "0", "--out", str(out)]) == 0
    doc = json.loads((out / "eval.json").read_text())
    q8_row, f32_row = doc["models"]  # the baseline comes first where it was not among the MODELs
    assert doc["baseline"] == q8_row["model"] == str(q8) and q8_row["kl_divergence"] == 0.0
    assert f32_row["kl_divergence"] > 0 and f32_row["last_word_accuracy"] is None


def test_eval_of_an_unknown_model_is_refused_naming_it(tmp_path, capsys):
    f32, _ = write_pair(tmp_path)
    out = tmp_path / "out"
    assert main(["eval", str(f32), "no-such-model", "--out", str(out)]) == 2
    assert "'no-such-model': no such file or folder" in capsys.readouterr().err
    assert not out.exists()


def test_eval_of_models_with_different_tokenizers_is_refused(tmp_path, capsys):
    f32, _ = write_pair(tmp_path)
    other = write_gguf(
        tmp_path / "other.gguf", tiny_weights(seed=0), gguf.GGMLQuantizationType.F32, swap=True
    )
    text = write_text(tmp_path / "text.txt")
    assert main(["eval", str(f32), str(other), "--text", str(text), "--out", str(tmp_path / "o")]) == 2
    assert "different tokenizers" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_eval_on_a_text_too_short_for_the_windows_is_refused(tmp_path, capsys):
    f32, q8 = write_pair(tmp_path)
    text = write_text(tmp_path / "text.txt")
    assert main(["eval", str(f32), str(q8), "--text", str(text), "--tokens", "100000", "--window", "64"]) == 2
    err = capsys.readouterr().err
    assert str(text) in err and "not the 1562 requested" in err


# --- tiny models and text -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    """A tiny random Llama in transformers, saved as an HF folder and loaded back by tessera
    (built once: importing and building it in transformers takes most of these tests' time)."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("tiny-llama")
    hf = tiny_hf_llama(folder, transformers)
    return hf, load_model(open_checkpoint(folder))


def tiny_hf_llama(folder: Path, transformers):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=160,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
    )
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 if p.dim() > 1 else 1.0)
    model.save_pretrained(folder)
    return model.eval()


def byte_tokens() -> list[str]:
    """GPT-2's 256 byte tokens, spelled as its byte-to-unicode table spells them."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelled, extra = {}, 0
    for b in range(256):
        if b in keep:
            spelled[b] = chr(b)
        else:
            spelled[b] = chr(256 + extra)
            extra += 1
    return [spelled[b] for b in range(256)]


VOCAB = 257  # the bytes, then an end-of-text token


def tiny_weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def w(*shape, std=0.3):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    kv = HIDDEN // HEADS * KV_HEADS
    out = {"token_embd.weight": w(VOCAB, HIDDEN, std=1.0), "output_norm.weight": np.ones(HIDDEN, np.float32)}
    out["output.weight"] = w(VOCAB, HIDDEN)
    for i in range(LAYERS):
        out |= {
            f"blk.{i}.attn_norm.weight": np.ones(HIDDEN, np.float32),
            f"blk.{i}.attn_q.weight": w(HIDDEN, HIDDEN),
            f"blk.{i}.attn_k.weight": w(kv, HIDDEN),
            f"blk.{i}.attn_v.weight": w(kv, HIDDEN),
            f"blk.{i}.attn_output.weight": w(HIDDEN, HIDDEN),
            f"blk.{i}.ffn_norm.weight": np.ones(HIDDEN, np.float32),
            f"blk.{i}.ffn_gate.weight": w(FFN, HIDDEN),
            f"blk.{i}.ffn_up.weight": w(FFN, HIDDEN),
            f"blk.{i}.ffn_down.weight": w(HIDDEN, FFN, std=0.2),
        }
    return out


def write_gguf(path: Path, weights: dict, qtype, swap: bool = False) -> Path:
    """A Llama GGUF of ``weights`` (torch shapes) with a byte-level BPE tokenizer; linear layers in
    ``qtype`` (F32 or quantized by gguf's own quantizer); ``swap`` exchanges two tokens' ids."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    tokens = [*byte_tokens(), "<|end|>"]
    if swap:
        tokens[65], tokens[66] = tokens[66], tokens[65]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * 256 + [3])
    w.add_eos_token_id(256)
    for name, value in weights.items():
        if name.startswith("blk.") and value.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_pair(folder: Path) -> tuple[Path, Path]:
    weights = tiny_weights(seed=0)
    return (
        write_gguf(folder / "tiny-f32.gguf", weights, gguf.GGMLQuantizationType.F32),
        write_gguf(folder / "tiny-q8_0.gguf", weights, gguf.GGMLQuantizationType.Q8_0),
    )


def write_text(path: Path) -> Path:
    """Ten paragraphs (documents) of 60 words, each ending in a word and a full stop."""
    rng = random.Random(7)
    words = "the river city bridge north old market stone light harbour winter song".split()
    paras = [" ".join(rng.choice(words) for _ in range(60)) + "." for _ in range(10)]
    path.write_text("\n\n".join(paras) + "\n", encoding="utf-8")
    return path
