"""The tessera command as a person runs it."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.usefixtures("default_model_path")  # skips where the model is absent


def tessera(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "tessera.engine.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# fp32, as the fixtures and references the outputs are compared with (the CPU default is bf16)
SMALL = ["--max-model-len", "512", "--kv-cache-memory", "64MiB", "--dtype", "float32"]


def test_generate_json_prints_one_object_with_the_documented_fields():
    r = tessera("generate", "The capital of France is", "--max-tokens", "8", "--json", *SMALL)
    assert r.returncode == 0, r.stderr
    (line,) = r.stdout.splitlines()
    obj = json.loads(line)
    assert set(obj) == {"text", "token_ids", "finish_reason", "prompt_tokens", "completion_tokens"}
    assert obj["completion_tokens"] == len(obj["token_ids"]) == 8
    assert obj["finish_reason"] == "length"
    assert obj["prompt_tokens"] == 5
    assert "Paris" in obj["text"]


def test_the_default_dtype_generates_too():
    """No --dtype: bf16 with the int8 products and the fused layers where the CPU has them."""
    r = tessera("generate", "The capital of France is", "--max-tokens", "8", "--json", *SMALL[:4])
    assert r.returncode == 0, r.stderr
    obj = json.loads(r.stdout)
    assert obj["completion_tokens"] == 8 and obj["text"].strip()


def test_prompts_file_runs_as_one_batch_and_prints_in_input_order(tmp_path, default_llm):
    prompts = ["The capital of France is", "1, 2, 3, 4,", "def add(a, b):\n", "Water boils at"]
    f = tmp_path / "prompts.jsonl"
    f.write_text("\n".join(json.dumps(p) for p in prompts) + "\n")
    r = tessera("generate", "--prompts-file", str(f), "--max-tokens", "6", "--json", *SMALL)
    assert r.returncode == 0, r.stderr
    got = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(got) == 4
    from tessera.sampling import SamplingParams

    alone = [default_llm.generate(p, SamplingParams(temperature=0, max_tokens=6))[0] for p in prompts]
    assert [g["token_ids"] for g in got] == [a.token_ids for a in alone]


@pytest.mark.parametrize(
    "args,message",
    [
        (["generate", "hi", "--model", "/nonexistent/model.gguf"], "no such file or folder"),
        (["generate", "hi", "--model", "pyproject.toml"], "not a GGUF file"),
        (["generate", "--prompts-file", "/nonexistent.jsonl"], "cannot read"),
        (["generate", "hi", "--temperature", "-1"], "temperature must be"),
        (["generate", "hi", "--kv-cache-memory", "lots"], None),
        (["generate", "hi", "--device", "tpu", *SMALL], "device 'tpu' is not one of"),
    ],
)
def test_bad_input_gives_one_clear_line_and_exit_code_2(args, message):
    r = tessera(*args)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    if message is not None:
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], r.stderr


def test_a_prompt_longer_than_the_context_is_refused():
    r = tessera("generate", "word " * 300, "--max-model-len", "64", "--kv-cache-memory", "16MiB")
    assert r.returncode == 2
    assert "more than the maximum context length of 64" in r.stderr


def test_chat_reads_turns_from_stdin_and_applies_the_template():
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "tessera.engine.cli",
            "chat",
            "--temperature",
            "0",
            "--max-tokens",
            "16",
            *SMALL,
        ],
        input="What is the capital of France?\n\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


def test_bench_latency_and_throughput_print_the_documented_json():
    small = ["--prompt-tokens", "32", "--output-tokens", "8", "--runs", "1", "--kv-cache-memory", "64MiB"]
    r = tessera("bench", "latency", "--json", *small)
    assert r.returncode == 0, r.stderr
    (line,) = r.stdout.splitlines()
    obj = json.loads(line)
    assert obj["prefill_tok_s"] > 0 and obj["ttft_ms"] > 0 and obj["decode_tok_s"] > 0
    r = tessera("bench", "throughput", "--concurrency", "2", "--json", *small)
    assert r.returncode == 0, r.stderr
    (line,) = r.stdout.splitlines()
    obj = json.loads(line)
    assert obj["output_tok_s"] > 0 and obj["concurrency"] == 2


def test_bench_latency_with_speculation_reports_acceptance():
    small = ["--prompt-tokens", "32", "--output-tokens", "16", "--runs", "1", "--kv-cache-memory", "64MiB"]
    spec = '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1}'
    r = tessera("bench", "latency", "--json", "--speculative-config", spec, *small)
    assert r.returncode == 0, r.stderr
    (line,) = r.stdout.splitlines()
    obj = json.loads(line)
    assert obj["speculative_config"]["num_speculative_tokens"] == 3
    assert 0 <= obj["spec_acceptance_rate"] <= 1 and 0 <= obj["spec_step_share"] <= 1
    assert obj["spec_mean_accepted_length"] == 0 or 1 <= obj["spec_mean_accepted_length"] <= 4
    assert obj["decode_tok_s"] > 0
