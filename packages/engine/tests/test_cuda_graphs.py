"""The GPU runner's machinery without a GPU: which steps replay which captured graph, the
persistent buffers against build_attention_metadata, and the capture/replay control flow with a
test double standing in for torch.cuda.CUDAGraph. The tests at the end need a CUDA device."""

import contextlib
import gc
import json
import logging

import pytest
import torch

from tessera.engine import LLM, EngineArgs
from tessera.engine import cuda_graphs as cg
from tessera.engine.cli import build_parser
from tessera.engine.cuda_graphs import DecodeGraphs, capture_sizes, decode_batch_size, padded_size
from tessera.engine.gpu_memory import MemoryProfile, _profile_batch
from tessera.engine.input_buffers import InputBuffers
from tessera.engine.model_runner import ModelRunner
from tessera.models import build_attention_metadata
from tessera.sampling import SamplingParams

# -- which steps replay which graph -------------------------------------------------------------


def test_capture_sizes_are_the_powers_of_two_up_to_max_num_seqs():
    assert capture_sizes(256) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert capture_sizes(1024) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert capture_sizes(48) == [1, 2, 4, 8, 16, 32]
    assert capture_sizes(1) == [1]


def test_a_batch_is_padded_up_to_the_next_captured_size():
    sizes = capture_sizes(256)
    assert [padded_size(b, sizes) for b in (1, 2, 3, 5, 17, 128, 129, 256)] == [1, 2, 4, 8, 32, 128, 256, 256]
    assert padded_size(257, sizes) is None
    assert padded_size(40, capture_sizes(48)) is None  # larger than the largest graph: eager


def test_only_steps_where_every_request_runs_one_token_are_decode_batches():
    assert decode_batch_size([1, 1, 1]) == 3
    assert decode_batch_size([1, 5, 1]) is None  # a prefill chunk rides along: eager
    assert decode_batch_size([2]) is None
    assert decode_batch_size([]) is None


# -- a test double for torch.cuda.CUDAGraph -----------------------------------------------------


class FakeGraph:
    """Stands in for torch.cuda.CUDAGraph: remembers the forward run while it was capturing and
    re-runs it into the captured output on replay, as a real graph re-launches its kernels."""

    capturing = None

    def __init__(self, log=None):
        self.log = log if log is not None else []
        self.rerun = None
        self.out = None
        self.replays = 0

    def replay(self):
        self.replays += 1
        self.log.append(("replay", id(self)))
        if self.rerun is not None:
            self.out.copy_(self.rerun())


def fake_machinery(log):
    pool = object()

    def new_pool():
        log.append(("pool",))
        return pool

    @contextlib.contextmanager
    def capture(graph, p):
        log.append(("begin", p))
        FakeGraph.capturing = graph
        try:
            yield
        finally:
            FakeGraph.capturing = None
            log.append(("end", p))

    return {
        "new_graph": lambda: FakeGraph(log),
        "new_pool": new_pool,
        "capture": capture,
        "synchronize": lambda: log.append(("sync",)),
    }, pool


def recording(forward, log):
    """``forward`` logged, and registered with the graph that captures it."""

    def run(size):
        log.append(("forward", size, FakeGraph.capturing is not None))
        out = forward(size)
        graph = FakeGraph.capturing
        if graph is not None:
            graph.rerun, graph.out = (lambda: forward(size)), out
        return out

    return run


def test_graphs_are_captured_largest_first_on_one_shared_pool_after_a_warmup():
    log = []
    machinery, pool = fake_machinery(log)
    graphs = DecodeGraphs(
        [1, 2, 4],
        lambda size: log.append(("prepare", size)),
        recording(lambda size: torch.zeros(size, 3), log),
        **machinery,
    )
    assert graphs.capture_all()
    per_size = [
        [
            ("prepare", s),
            ("forward", s, False),
            ("sync",),
            ("begin", pool),
            ("forward", s, True),
            ("end", pool),
        ]
        for s in (4, 2, 1)
    ]
    assert log == [("pool",), *per_size[0], *per_size[1], *per_size[2], ("sync",)]
    assert graphs.captured_sizes == [1, 2, 4]
    assert graphs.size_for([1, 1, 1]) == 4
    assert graphs.size_for([1] * 5) is None
    assert graphs.size_for([1, 3]) is None


def test_replay_runs_the_graph_of_the_padded_size_and_returns_its_static_output():
    log = []
    machinery, _ = fake_machinery(log)
    graphs = DecodeGraphs(
        [1, 2, 4], lambda size: None, lambda size: torch.full((size, 2), float(size)), **machinery
    )
    graphs.capture_all()
    out = graphs.replay(graphs.size_for([1, 1, 1]))
    graph, static = graphs.graphs[4]
    assert out is static and out.shape == (4, 2)
    assert graph.replays == 1 and all(g.replays == 0 for s, (g, _) in graphs.graphs.items() if s != 4)


def test_a_capture_that_raises_turns_every_graph_off_with_the_reason_logged(caplog):
    log = []
    machinery, _ = fake_machinery(log)

    def forward(size):
        if FakeGraph.capturing is not None and size == 2:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        return torch.zeros(size, 3)

    graphs = DecodeGraphs([1, 2, 4], lambda size: None, forward, **machinery)
    with caplog.at_level(logging.WARNING, logger="tessera.engine.cuda_graphs"):
        assert not graphs.capture_all()
    assert graphs.graphs == {} and graphs.size_for([1]) is None  # size 4 was captured, and dropped
    assert "operation not permitted when stream is capturing" in graphs.disabled_reason
    assert "CUDA graphs off" in caplog.text and "RuntimeError" in caplog.text


def test_a_graph_that_replays_differently_from_eager_turns_graphs_off():
    machinery, _ = fake_machinery([])
    graphs = DecodeGraphs([1, 2], lambda size: None, lambda size: torch.randn(size, 8), **machinery)
    graphs.capture_all()
    assert not graphs.verify(1)  # the fake graph replays nothing: its output stays the captured one
    assert graphs.graphs == {} and "replays differently" in graphs.disabled_reason


def test_graphs_are_not_captured_over_the_reference_attention_or_a_backend_that_declines(monkeypatch):
    assert "CUDA device" in cg.graph_blocker("cpu")
    monkeypatch.setattr(cg, "implementations", lambda op: {})
    assert "torch reference" in cg.graph_blocker("cuda")
    monkeypatch.setattr(cg, "implementations", lambda op: {"cuda": object()})
    monkeypatch.setattr(cg, "backend", lambda dev: ("fake-cuda", {"cuda_graphs": False}))
    assert "declares its ops not capturable" in cg.graph_blocker("cuda")
    monkeypatch.setattr(cg, "backend", lambda dev: ("fake-cuda", {"preferred_dtype": torch.bfloat16}))
    assert cg.graph_blocker("cuda") is None


# -- the persistent buffers ---------------------------------------------------------------------


def assert_same_inputs(got, want):
    (_, positions, metas), (want_positions, want_metas) = got, want
    assert torch.equal(positions, want_positions)
    assert len(metas) == len(want_metas)
    for m, w in zip(metas, want_metas, strict=True):
        for field in ("query_start_loc", "seq_lens", "block_tables", "slot_mapping", "token_seq_lens"):
            a, b = getattr(m, field), getattr(w, field)
            assert a.dtype == b.dtype and torch.equal(a, b), field
        assert (m.max_query_len, m.max_seq_len, m.batch_invariant) == (
            w.max_query_len,
            w.max_seq_len,
            w.batch_invariant,
        )


def test_the_buffers_hold_what_build_attention_metadata_builds_for_the_same_lists():
    bs = 4
    buf = InputBuffers(
        max_tokens=40, max_seqs=6, max_blocks_per_seq=9, num_groups=2, block_size=bs, device="cpu"
    )
    # a prefill chunk, a decode, the middle of a prompt, a one-token prompt; two KV groups
    steps = [
        (
            [5, 1, 3, 1],
            [5, 17, 11, 1],
            [[[3, 7], [0, 1, 2, 4, 8], [9, 10, 11], [6]], [[1], [2, 3, 4, 5, 6], [7, 8, 9], [0]]],
        ),
        # a smaller step after a larger one: nothing of the last step's lists shows through
        ([1, 2], [18, 13], [[[0, 1, 2, 4, 8], [9, 10, 11, 5]], [[2, 3, 4, 5, 6], [7, 8, 9, 1]]]),
    ]
    for query_lens, seq_lens, tables in steps:
        ids = list(range(100, 100 + sum(query_lens)))
        got = buf.fill(ids, query_lens, seq_lens, tables, batch_invariant=False)
        assert got[0].tolist() == ids
        assert_same_inputs(got, build_attention_metadata(query_lens, seq_lens, tables, bs, "cpu", False))


def test_the_graph_tables_are_fixed_width_and_hold_the_step_s_tables():
    bs = 4
    buf = InputBuffers(16, 4, max_blocks_per_seq=6, num_groups=1, block_size=bs, device="cpu", graph_rows=4)
    tables = [[[3, 7], [0, 1, 2], [5], [9]]]
    ids, positions, metas = buf.fill([1, 2, 3, 4], [1] * 4, [6, 9, 1, 2], tables, wide=True)
    _, want = build_attention_metadata([1] * 4, [6, 9, 1, 2], tables, bs, "cpu")
    assert metas[0].block_tables.shape == (4, 6)  # the width the graph captured
    assert metas[0].block_tables.data_ptr() == buf.wide_tables[0].data_ptr()
    assert torch.equal(metas[0].block_tables[:, :3], want[0].block_tables)
    assert torch.equal(metas[0].slot_mapping, want[0].slot_mapping)
    # static views (what a capture reads) are the same memory as what fill wrote
    _, static_pos, static = buf.views(4, 4, True, 1, 512, wide=True)
    assert static_pos.data_ptr() == positions.data_ptr() and static[0].max_seq_len == 512
    assert static[0].slot_mapping.data_ptr() == metas[0].slot_mapping.data_ptr()


def test_steps_that_do_not_fit_the_buffers_are_told_apart():
    buf = InputBuffers(8, 2, max_blocks_per_seq=3, num_groups=1, block_size=4, device="cpu")
    assert buf.fits(8, 2, 3)
    assert not buf.fits(9, 2, 3) and not buf.fits(8, 3, 3) and not buf.fits(8, 2, 4)


# -- options ------------------------------------------------------------------------------------


def test_enforce_eager_and_gpu_memory_utilization_are_named_as_vllm_names_them():
    ns = build_parser().parse_args(["generate", "hi", "--enforce-eager", "--gpu-memory-utilization", "0.5"])
    args = EngineArgs.from_cli(ns)
    assert args.enforce_eager is True and args.gpu_memory_utilization == 0.5
    default = EngineArgs.from_cli(build_parser().parse_args(["generate", "hi"]))
    assert default.enforce_eager is False and default.gpu_memory_utilization == 0.9


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5])
def test_a_gpu_memory_utilization_outside_0_1_is_refused_with_the_range(bad):
    with pytest.raises(ValueError, match=r"gpu_memory_utilization must be in \(0, 1\]"):
        EngineArgs(gpu_memory_utilization=bad)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "hi", "--gpu-memory-utilization", str(bad)])


def test_the_kv_cache_gets_the_allowed_share_less_the_profiled_peak_and_memory_outside_torch():
    gib = 2**30
    profile = MemoryProfile(total=140 * gib, peak=20 * gib, non_torch=gib)
    assert profile.kv_budget(0.9) == int(140 * gib * 0.9) - 21 * gib
    assert profile.kv_budget(0.1) < 0
    assert "allows 14.00 GiB of the GPU's 140.00 GiB" in profile.explain(0.1)
    # the profiled prefill: max_num_batched_tokens tokens in sequences no longer than the context
    assert _profile_batch(2048, 512) == [512] * 4 and _profile_batch(100, 64) == [64, 36]


# -- the runner's buffered path and graph replays, end to end on the CPU ------------------------

VOCAB = 96


def random_llama(folder):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 if p.dim() > 1 else 1.0)
    model.save_pretrained(folder)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "t1"}))
    return str(folder)


PROMPTS = [[5, 9, 14, 3, 77, 21, 8], [40, 41], [3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3], [60]]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
KW = {"dtype": "float32", "block_size": 4, "kv_cache_memory": 256 * 1024, "max_model_len": 64}


def test_buffered_steps_and_padded_graph_replays_give_the_tokens_of_the_plain_runner(tmp_path):
    path = random_llama(tmp_path)
    want = [o.token_ids for o in LLM(path, **KW).generate(PROMPTS, GREEDY)]

    # its runner is swapped for a buffered one: the runner in this process
    llm = LLM(path, max_num_seqs=8, max_num_batched_tokens=16, distributed_executor_backend="uni", **KW)
    old = llm.engine.runner
    runner = ModelRunner(
        llm.model,
        old.dummy_block,  # the allocator's block count
        4,
        torch.float32,
        llm.eos_token_ids,
        groups=llm.kv_groups,
        max_num_seqs=8,
        max_num_batched_tokens=16,
        max_model_len=64,
        buffered=True,
    )
    assert runner.inputs is not None
    log = []
    if runner.graphs is None:  # no CUDA, no graphs captured: the same control flow on fake graphs
        machinery, _ = fake_machinery(log)
        runner.graphs = DecodeGraphs(
            capture_sizes(8), runner._pad_batch, recording(runner._static_forward, log), **machinery
        )
        with torch.inference_mode():
            assert runner.graphs.capture_all() and runner.graphs.verify(1)
    else:  # on CUDA the runner captured real graphs of every size up to max_num_seqs
        assert runner.graphs.captured_sizes == capture_sizes(8)
        real_replay = runner.graphs.replay

        def replay(size):
            log.append(("replay", size))
            return real_replay(size)

        runner.graphs.replay = replay
    llm.engine.executor.runner = runner
    got = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
    assert got == want
    replays = [e for e in log if e[0] == "replay"]
    assert len(replays) > 1  # decode steps of 4 (and fewer, padded) requests replayed graphs
    assert llm.stats().kv_cache_usage == 0.0


# -- on a GPU -----------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
def test_graphs_give_the_greedy_tokens_of_enforce_eager_on_the_gpu(tmp_path):
    path = random_llama(tmp_path)
    kw = {**KW, "device": "cuda", "max_num_seqs": 8}
    eager = LLM(path, enforce_eager=True, **kw)
    assert eager.engine.runner.graphs is None
    graphed = LLM(path, **kw)
    want = [o.token_ids for o in eager.generate(PROMPTS, GREEDY)]
    assert [o.token_ids for o in graphed.generate(PROMPTS, GREEDY)] == want
    graphs = graphed.engine.runner.graphs
    if graphs is None or not graphs.graphs:
        pytest.skip(f"no graphs were captured here: {graphs.disabled_reason if graphs else 'see the log'}")
    assert graphs.captured_sizes == [1, 2, 4, 8]


@cuda
@pytest.mark.gpu_exclusive  # reads the GPU's free memory: alone on it (tools/gpu_check.py)
def test_the_kv_cache_takes_what_gpu_memory_utilization_leaves(tmp_path):
    path = random_llama(tmp_path)
    kw = {"dtype": "float32", "block_size": 16, "max_model_len": 64, "device": "cuda", "enforce_eager": True}
    total = torch.cuda.mem_get_info()[1]
    small = LLM(path, gpu_memory_utilization=0.05, **kw).kv_cache_bytes
    gc.collect()  # the first engine's cache is gone before the second measures
    larger = LLM(path, gpu_memory_utilization=0.1, **kw).kv_cache_bytes
    assert 0 < small < 0.05 * total
    assert larger - small == pytest.approx(0.05 * total, rel=0.05)
