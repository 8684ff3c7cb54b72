"""Disaggregated prefill/decode in the scheduler, with a fake connector: a producer holds a finished
prompt's blocks until released, a consumer parks a request while its prompt's blocks arrive and then
runs it from the end of the prompt; failures and aborts never leak a block."""

from tessera.kvcache import KVCacheManager
from tessera.scheduler import (
    KVConnectorEvents,
    KVTransferFailure,
    KVTransferParams,
    ModelRunnerOutput,
    Request,
    RequestStatus,
    Scheduler,
    SchedulerConfig,
)

BS = 4


class FakeConnector:
    def __init__(self) -> None:
        self.loads: dict[str, tuple[list[int], int]] = {}
        self.held: dict[str, list[int]] = {}
        self.cancelled: list[str] = []
        self.events = KVConnectorEvents(loaded=[], failed={}, released=[])

    def request_finished(self, request, block_ids):
        self.held[request.request_id] = block_ids
        return KVTransferParams(
            do_remote_prefill=True,
            remote_request_id=request.request_id,
            remote_block_ids=block_ids,
            first_token_ids=list(request.output_token_ids),
        )

    def start_load(self, request, block_ids, first_block):
        self.loads[request.request_id] = (block_ids, first_block)

    def cancel_load(self, request_id):
        self.cancelled.append(request_id)

    def poll(self):
        events, self.events = self.events, KVConnectorEvents(loaded=[], failed={}, released=[])
        return events


def make(num_blocks=32):
    connector = FakeConnector()
    s = Scheduler(SchedulerConfig(max_model_len=64), KVCacheManager(num_blocks, BS), connector)
    return s, connector


def step(s: Scheduler, token: int = 7):
    so = s.schedule()
    sampled = {}
    for rid, n in so.num_scheduled_tokens.items():
        req = s.requests[rid]
        if req.num_computed_tokens + n == req.num_tokens:
            sampled[rid] = [token]
    return so, s.update_from_output(so, ModelRunnerOutput(sampled))


def remote(rid, prompt, first=(5,), max_tokens=4):
    params = KVTransferParams(
        do_remote_prefill=True, remote_request_id="p-" + rid, first_token_ids=list(first)
    )
    return Request(rid, prompt, max_tokens=max_tokens, kv_transfer=params)


def test_a_producer_holds_the_prompt_blocks_until_the_connector_releases_them():
    s, c = make()
    s.add_request(
        Request("p", list(range(10)), max_tokens=1, kv_transfer=KVTransferParams(do_remote_decode=True))
    )
    _, outs = step(s, token=9)
    (out,) = outs
    assert out.finish_reason == "length" and out.new_token_ids == [9]
    assert out.kv_transfer_params.first_token_ids == [9]
    assert len(c.held["p"]) == 3  # the prompt's blocks: 10 tokens in blocks of 4
    assert s.kv.num_free_blocks == 32 - 3 and s.stats().num_kv_held == 1
    assert not s.has_unfinished_requests() and s.kv_transfers_in_flight()
    c.events.released.append("p")
    s.poll_kv_connector()
    assert s.kv.num_free_blocks == 32 and s.stats().num_kv_held == 0


def test_a_producer_request_that_stops_on_eos_holds_nothing():
    s, c = make()
    req = Request(
        "p", [1, 2, 3], max_tokens=1, eos_token_ids=(2,), kv_transfer=KVTransferParams(do_remote_decode=True)
    )
    s.add_request(req)
    _, (out,) = step(s, token=2)
    assert out.finish_reason == "stop" and out.kv_transfer_params is None
    assert not c.held and s.kv.num_free_blocks == 32


def test_a_consumer_request_waits_for_its_blocks_then_computes_only_the_first_token():
    s, c = make()
    prompt = list(range(10))
    s.add_request(remote("c", prompt))
    so, outs = step(s)
    assert so.total_num_scheduled_tokens == 0 and not outs
    blocks, first = c.loads["c"]
    assert first == 0 and len(blocks) == 3
    assert s.requests["c"].status == RequestStatus.WAITING_FOR_REMOTE_KVS
    assert s.stats().num_waiting_for_remote_kvs == 1
    c.events.loaded.append("c")
    so, outs = step(s, token=8)
    (nr,) = so.new_requests
    assert nr.token_ids == prompt + [5] and nr.num_computed_tokens == 10 and nr.num_prompt_tokens == 10
    assert so.num_scheduled_tokens == {"c": 1}
    # the producer's token is output first, then the one this step sampled
    assert [o.new_token_ids for o in outs] == [[5], [8]]
    assert s.prompt_tokens_computed == 0
    while s.has_unfinished_requests():
        step(s)
    assert s.kv.num_free_blocks == 32


def test_prefix_cache_hits_are_not_pulled_and_pulled_blocks_are_cached_once_loaded():
    s, c = make()
    prompt = list(range(13))
    s.add_request(remote("a", prompt, max_tokens=2))
    step(s)
    assert c.loads["a"][1] == 0
    c.events.loaded.append("a")
    while s.has_unfinished_requests():
        step(s)
    s.add_request(remote("b", prompt + [99, 98, 97], max_tokens=2))
    step(s)
    blocks, first = c.loads["b"]
    assert first == 3 and len(blocks) == 1  # blocks 0..2 came from the prefix cache
    assert s.requests["b"].num_cached_tokens == 12


def test_a_failed_pull_ends_the_request_with_its_reason_and_frees_uncached_blocks():
    s, c = make()
    s.add_request(remote("c", list(range(10))))
    step(s)
    c.events.failed["c"] = KVTransferFailure("the producer closed the connection", retryable=True)
    _, (out,) = step(s)
    assert out.finish_reason == "error" and out.kv_transfer_failure.retryable
    assert "closed" in out.stop_reason
    assert s.kv.num_free_blocks == 32 and not s.has_unfinished_requests()
    # nothing of the failed pull is found by a later request
    hits, n = s.kv.get_computed_blocks("x", list(range(10)) + [1])
    assert n == 0


def test_an_abort_during_the_pull_frees_the_blocks_only_once_the_load_has_ended():
    s, c = make()
    s.add_request(remote("c", list(range(10))))
    step(s)
    s.finish_requests("c")
    assert c.cancelled == ["c"] and s.kv.num_free_blocks == 32 - 3
    c.events.failed["c"] = KVTransferFailure("cancelled")
    so, outs = step(s)
    assert not outs and s.kv.num_free_blocks == 32


def test_a_first_token_that_ends_the_request_finishes_it_without_a_step():
    s, c = make()
    req = Request(
        "c",
        list(range(6)),
        max_tokens=4,
        eos_token_ids=(5,),
        kv_transfer=KVTransferParams(do_remote_prefill=True, first_token_ids=[5]),
    )
    s.add_request(req)
    step(s)
    c.events.loaded.append("c")
    so, (out,) = step(s)
    assert so.total_num_scheduled_tokens == 0
    assert out.new_token_ids == [5] and out.finish_reason == "stop"
    assert s.kv.num_free_blocks == 32 and not s.has_unfinished_requests()


def test_an_engine_without_a_connector_refuses_kv_transfer_params():
    s = Scheduler(SchedulerConfig(max_model_len=64), KVCacheManager(32, BS))
    try:
        s.add_request(remote("c", [1, 2, 3]))
    except ValueError as e:
        assert "no KV connector" in str(e)
    else:
        raise AssertionError("accepted")


def test_prompt_tokens_computed_counts_chunks_and_not_cache_hits():
    s = Scheduler(SchedulerConfig(max_model_len=64, max_num_batched_tokens=6), KVCacheManager(32, BS))
    s.add_request(Request("a", list(range(10)), max_tokens=2))
    while s.has_unfinished_requests():
        step(s)
    assert s.stats().prompt_tokens_computed == 10
    s.add_request(Request("b", list(range(10)), max_tokens=2))
    while s.has_unfinished_requests():
        step(s)
    assert s.stats().prompt_tokens_computed == 10 + 2  # 8 of its 10 prompt tokens were cached
