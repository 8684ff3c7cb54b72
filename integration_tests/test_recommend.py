"""``tessera recommend`` on the default model: the held-size rules against the CPU layout's own
arithmetic (csrc/qmatmul.c), its predicted memory against the peak of a real run, bad input."""

import json

import pytest
import torch

from tessera.engine.cli import main
from tessera.engine.recommend import HeldBytes, exl2_layout, kv_bytes


def test_held_bytes_follow_the_cpu_layouts():
    """The CPU backend holds a 32-block as 16 quant bytes plus fp16 d and m (Q4_1: 5 bits a
    weight), 16 + d (Q4_0: 4.5), or 32 + d (Q8_0: 8.5); rows of a K-quant that are not whole
    256-blocks take llama.cpp's fallback type (Q4_K -> Q5_0: 16 + 4 bytes of bit 4 + d, 5.5)."""
    from tessera.kernels_cpu import native

    if native.library() is None:
        pytest.skip("no C kernels on this machine")
    held = HeldBytes(torch.device("cpu"), torch.bfloat16)
    n, k = 576, 1536
    assert held("Q4_1", n, k) == n * k * 5 // 8
    assert held("Q4_0", n, k) == n * k * 9 // 16
    assert held("Q8_0", n, k) == n * k * 17 // 16
    assert held("Q4_K", n, 576) == held("Q5_0", n, 576) == n * 576 * 11 // 16
    assert held("dense", n, k) == n * k * 2


def test_exl2_ladder_layouts_average_their_bits():
    assert exl2_layout(4.0).linears == (("Q4_1", 1.0),)
    (a, share_a), (b, share_b) = exl2_layout(4.25).linears
    assert (a, b) == ("Q4_1", "Q5_1") and share_b == pytest.approx(0.25)
    assert exl2_layout(6.0).linears == (("Q8_0", 1.0),)


def test_a_gptq_head_of_8_bits_is_read_as_q8_0_and_unties_the_embedding():
    """GPTQ keeps a tied model's head in the model dtype; with ``--lm-head`` (8-bit groups) the
    head is Q8_0 blocks and the embedding table is held beside it in the model dtype."""
    from tessera.engine import resolve_model
    from tessera.engine.recommend import GPTQ_HEAD8_LAYOUT, GPTQ_LAYOUT, weight_bytes
    from tessera.formats import open_checkpoint
    from tessera.kernels_cpu import native

    if native.library() is None:
        pytest.skip("no C kernels on this machine")
    config = open_checkpoint(resolve_model("smollm2-135m-instruct")).config
    held = HeldBytes(torch.device("cpu"), torch.bfloat16)
    v, h = config.vocab_size, config.hidden_size
    plain_total, plain_read = weight_bytes(config, GPTQ_LAYOUT, held)
    head_total, head_read = weight_bytes(config, GPTQ_HEAD8_LAYOUT, held)
    assert plain_read - head_read == held("dense", v, h) - held("Q8_0", v, h)
    assert head_total - plain_total == held("Q8_0", v, h)  # the tied table no longer doubles as the head


def test_kv_bytes_are_whole_blocks_with_scales():
    class C:
        num_hidden_layers, num_key_value_heads, head_dim = 30, 3, 64

    total, per_token = kv_bytes(C, "int8", torch.bfloat16, 17)
    assert per_token == 2 * 30 * 3 * (64 + 4)
    assert total == per_token * 32


def test_prediction_is_within_ten_percent_of_a_real_run():
    """The acceptance check: the recommended configuration runs in a fresh process at the stated
    context and batch; its peak resident memory is within 10% of the prediction. The command
    runs in a process of its own, as users run it: its runtime part is the resident memory of
    the process it measures in (a test process that ran hundreds of tests holds gigabytes)."""
    import subprocess
    import sys

    args = ["recommend", "smollm2-135m-instruct", "--candidates", "given", "--context", "1024",
            "--batch", "2", "--verify", "--json"]  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "tessera.engine.cli", *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    check = out["verify"]
    assert abs(check["error"]) <= 0.10, check
    assert out["choice"]["kind"] == "given" and out["recommendation"].startswith("SmolLM2")


def test_the_ladder_and_a_memory_limit(capsys):
    args = ["recommend", "smollm2-135m-instruct", "--memory", "64MiB", "--context", "512", "--json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["choice"] is None and out["recommendation"].startswith("nothing fits in 0.06 GiB")
    kinds = {r["kind"] for r in out["rows"]}
    assert kinds == {"given", "exl2", "gptq", "gguf"}
    assert {r["kv"] for r in out["rows"]} == {"auto", "fp8", "int8"}
    rows = {(r["label"], r["kv"]): r for r in out["rows"]}
    # a finer cache costs more; more bits cost more
    assert rows[("GGUF Q8_0", "auto")]["kv_bytes"] > rows[("GGUF Q8_0", "fp8")]["kv_bytes"]
    assert rows[("EXL2 8.0 bpw", "auto")]["weights"] > rows[("EXL2 4.0 bpw", "auto")]["weights"]


@pytest.mark.parametrize(
    "args,named",
    [
        (["--context", "0"], "--context (0)"),
        (["--context", "999999"], "beyond the model's 8192 positions"),
        (["--memory", "lots"], None),
        (["--eval", "/nonexistent/eval.json"], "--eval /nonexistent/eval.json"),
    ],
)
def test_bad_input_is_refused_with_its_name(args, named, capsys):
    try:
        rc = main(["recommend", "smollm2-135m-instruct", "--candidates", "given", *args])
    except SystemExit as e:  # argparse: a size it cannot read
        rc = e.code
    assert rc == 2
    if named:
        assert named in capsys.readouterr().err


def test_quality_comes_from_tessera_evals_json(tmp_path, capsys):
    """A variant that ``tessera eval`` scored carries its KL and perplexity, and measured quality
    ranks before bits."""
    from tessera.engine import resolve_model

    path = str(resolve_model("smollm2-135m-instruct"))
    doc = {"models": [{"model": "smollm2-135m-instruct", "path": path, "kl_divergence": 0.01,
                       "perplexity": 22.5, "top1_agreement": 0.9, "last_word_accuracy": 0.36}]}  # fmt: skip
    (tmp_path / "eval.json").write_text(json.dumps(doc))
    args = ["recommend", "smollm2-135m-instruct", "--context", "512", "--eval", str(tmp_path / "eval.json")]
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    given = [r for r in out["rows"] if r["kind"] == "given"]
    assert given[0]["quality"] == {"kl": 0.01, "perplexity": 22.5, "top1": 0.9, "last_word": 0.36}
    assert out["choice"]["kind"] == "given"  # measured quality first, though GGUF Q8_0 has more bits
