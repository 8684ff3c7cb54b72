"""Engine options as a user sets them, and refusals at start-up that name the numbers."""

import pytest

from tessera.engine import LLM, EngineArgs, parse_size
from tessera.engine.cli import build_parser


def test_sizes_parse_with_binary_and_decimal_units():
    assert parse_size("64MiB") == 64 * 2**20
    assert parse_size("1.5GiB") == int(1.5 * 2**30)
    assert parse_size("500MB") == 500_000_000
    assert parse_size("4096") == 4096
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots")


def test_cli_engine_options_are_named_as_vllm_names_them():
    ns = build_parser().parse_args(
        [
            "generate",
            "hi",
            "--max-model-len",
            "512",
            "--max-num-seqs",
            "8",
            "--max-num-batched-tokens",
            "256",
            "--block-size",
            "32",
            "--no-enable-prefix-caching",
            "--kv-cache-dtype",
            "int8",
            "--kv-cache-memory",
            "64MiB",
            "--no-enable-chunked-prefill",
            "--scheduling-policy",
            "priority",
        ]
    )
    assert (ns.max_model_len, ns.max_num_seqs, ns.max_num_batched_tokens, ns.block_size) == (512, 8, 256, 32)
    assert ns.enable_prefix_caching is False and ns.enable_chunked_prefill is False
    assert (
        ns.kv_cache_dtype == "int8"
        and ns.kv_cache_memory == 64 * 2**20
        and ns.scheduling_policy == "priority"
    )
    assert build_parser().parse_args(["generate", "hi"]).enable_prefix_caching is True


def test_batch_invariance_is_on_unless_turned_off():
    on = build_parser().parse_args(["generate", "hi"])
    off = build_parser().parse_args(["generate", "hi", "--no-batch-invariant"])
    assert EngineArgs.from_cli(on).batch_invariant is True
    assert EngineArgs.from_cli(off).batch_invariant is False


def test_a_context_that_cannot_fit_in_the_kv_cache_is_refused_with_the_numbers(default_model_path):
    with pytest.raises(ValueError, match=r"cannot hold one request of max_model_len 8192 \(360.0 MiB\)"):
        LLM(str(default_model_path), dtype="float32", max_model_len=8192, kv_cache_memory=2**20)


def test_int8_kv_cache_fits_about_four_times_the_tokens_of_fp32(default_model_path):
    path = str(default_model_path)
    fp32 = LLM(path, dtype="float32", kv_cache_memory=64 * 2**20, max_model_len=512)
    int8 = LLM(path, dtype="float32", kv_cache_memory=64 * 2**20, max_model_len=512, kv_cache_dtype="int8")
    n32 = fp32.engine.scheduler.kv.num_blocks
    n8 = int8.engine.scheduler.kv.num_blocks
    assert n8 / n32 == pytest.approx(256 / 68, rel=0.02)
    out = int8.generate("The capital of France is", None)[0]
    assert out.token_ids


def test_auto_dtype_is_what_the_device_backend_prefers(monkeypatch):
    """bf16 where the CPU backend's C kernels run, fp32 elsewhere; bf16 on GPUs (no backend
    declared there yet): asked through the kernels registry, never by naming a backend."""
    import torch

    from tessera.kernels import preferred_dtype

    assert preferred_dtype(torch.device("cuda")) == torch.bfloat16
    native = pytest.importorskip("tessera.kernels_cpu.native")
    monkeypatch.setattr(native, "library", lambda: None)  # no compiler, or a CPU without AVX512-BF16
    assert preferred_dtype(torch.device("cpu")) == torch.float32
    monkeypatch.setattr(native, "library", lambda: object())
    assert preferred_dtype(torch.device("cpu")) == torch.bfloat16


def test_speculative_config_from_the_command_line_reaches_engine_args():
    for cmd in (["generate", "hi"], ["serve"], ["bench", "latency"]):
        ns = build_parser().parse_args(
            [*cmd, "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}']
        )
        c = EngineArgs.from_cli(ns).speculative_config
        assert (c.method, c.num_speculative_tokens, c.adaptive) == ("ngram", 3, True)
    draft = '{"method": "draft_model", "model": "qwen2.5-coder-0.5b-instruct", "num_speculative_tokens": 5}'
    ns = build_parser().parse_args(["serve", "--speculative-config", draft])
    c = EngineArgs.from_cli(ns).speculative_config
    assert (c.method, c.model, c.num_speculative_tokens) == ("draft_model", "qwen2.5-coder-0.5b-instruct", 5)


@pytest.mark.parametrize(
    "config,names",
    [
        ('{"method": "medusa", "num_speculative_tokens": 4}', "speculative_config.method"),
        ('{"method": "ngram", "num_speculative_tokens": 99}', "num_speculative_tokens"),
        ('{"method": "draft_model", "num_speculative_tokens": 4}', "speculative_config.model is required"),
        ('{"method": "ngram", "num_speculative_tokens": 4,', "not valid JSON"),
    ],
)
def test_a_bad_speculative_config_is_refused_before_any_weight_loads(tmp_path, config, names):
    # the model file does not exist: the config error comes first
    with pytest.raises(ValueError, match=names):
        LLM(str(tmp_path / "missing.gguf"), speculative_config=config)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "hi", "--speculative-config", config])


def test_the_metrics_endpoint_exposes_speculative_decoding():
    from prometheus_client import generate_latest

    from tessera.engine.server.metrics import Metrics
    from tessera.scheduler import SchedulerStats

    stats = SchedulerStats(
        1, 0, 0, 0.1, num_steps=10, num_spec_steps=4, spec_num_drafts=4, spec_num_draft_tokens=16,
        spec_num_accepted_tokens=12,
    )  # fmt: skip
    text = generate_latest(Metrics(lambda: stats, lambda: 0).registry).decode()
    assert "tessera_spec_decode_acceptance_rate 0.75" in text
    assert "tessera_spec_decode_mean_accepted_length 4.0" in text
    assert "tessera_spec_decode_step_share 0.4" in text
    assert "tessera_spec_decode_num_accepted_tokens_total 12.0" in text
