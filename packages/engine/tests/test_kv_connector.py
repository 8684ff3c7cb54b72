"""The TCP connector between two sets of KV pages in one process (no model): what a consumer pulls
equals the producer's pages byte for byte; holds are released once pulled or when they time out;
a producer that vanishes mid-block, refuses, or was never there fails the pull with a reason."""

import socket
import threading
import time

import pytest
import torch

from tessera.engine.kv_connector import TCPConnector, prompt_hash
from tessera.engine.kv_pages import KVPages
from tessera.engine.kv_transfer_config import KVTransferConfig
from tessera.engine.kv_wire import PullReply, PullRequest, read_frame, write_frame
from tessera.models import LayerKVCache
from tessera.scheduler import KVTransferParams, Request

BS = 4
PROMPT = list(range(100, 118))  # 18 tokens: 5 blocks, the last one partial


def pages(dtype=torch.bfloat16, num_blocks=16, layers=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    caches = []
    for _ in range(layers):
        c = LayerKVCache.allocate(num_blocks, BS, 2, 8, dtype, "cpu")
        if dtype == torch.int8:
            c.data.copy_(torch.randint(-128, 128, c.data.shape, generator=g, dtype=torch.int8))
            c.scales.copy_(torch.rand(c.scales.shape, generator=g))
        else:
            c.data.copy_(torch.randn(c.data.shape, generator=g).to(dtype))
        caches.append(c)
    return KVPages(caches)


def connector(role, kv_pages, **kw):
    c = TCPConnector(KVTransferConfig(kv_role=role, **kw), kv_pages)
    return c


def held(producer, rid="p", prompt=PROMPT, block_ids=(9, 3, 7, 1, 12)):
    req = Request(rid, prompt, max_tokens=1)
    req.append_output_token(42)
    return producer.request_finished(req, list(block_ids))


def wait_events(c, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ev = c.poll()
        if ev.loaded or ev.failed or ev.released:
            return ev
        time.sleep(0.005)
    raise AssertionError("no event")


def pull(consumer, params, local_ids, first_block, rid="c"):
    req = Request(rid, PROMPT, max_tokens=4, kv_transfer=params)
    consumer.start_load(req, local_ids, first_block)
    return wait_events(consumer)


def same_pages(a: KVPages, a_ids, b: KVPages, b_ids) -> bool:
    return all(bytes(x) == bytes(y) for x, y in zip(a.read(list(a_ids)), b.read(list(b_ids)), strict=True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.int8])
def test_pulled_blocks_equal_the_producers_pages_byte_for_byte(dtype):
    src, dst = pages(dtype, seed=1), pages(dtype, seed=2)
    producer, consumer = connector("kv_producer", src), connector("kv_consumer", dst)
    consumer.chunk_blocks = 2  # several chunks on the wire
    try:
        params = held(producer)
        assert params.first_token_ids == [42] and params.remote_port == producer.port
        assert params.prompt_hash == prompt_hash(PROMPT)
        ev = pull(consumer, params, [4, 5, 6, 0, 2], 0)
        assert ev.loaded == ["c"], ev
        assert same_pages(src, params.remote_block_ids, dst, [4, 5, 6, 0, 2])
        assert consumer.stats.blocks_received == 5 and producer.stats.blocks_sent == 5
        assert wait_events(producer).released == ["p"]  # pulled: the producer frees them
    finally:
        producer.close()
        consumer.close()


def test_only_the_blocks_after_the_consumers_cache_hits_are_pulled():
    src, dst = pages(seed=1), pages(seed=2)
    producer, consumer = connector("kv_producer", src), connector("kv_consumer", dst)
    try:
        params = held(producer)
        before = dst.read([0, 1, 2, 3])
        assert pull(consumer, params, [8, 10], 3).loaded == ["c"]
        assert same_pages(src, params.remote_block_ids[3:], dst, [8, 10])
        assert [bytes(b) for b in dst.read([0, 1, 2, 3])] == [bytes(b) for b in before]
        assert consumer.stats.blocks_received == 2
    finally:
        producer.close()
        consumer.close()


def test_a_second_pull_and_a_wrong_prompt_are_refused():
    producer, consumer = connector("kv_producer", pages()), connector("kv_consumer", pages())
    try:
        params = held(producer)
        wrong = KVTransferParams(**{**_fields(params), "prompt_hash": prompt_hash([1, 2, 3])})
        ev = pull(consumer, wrong, [0], 0)
        assert not ev.failed["c"].retryable and "another prompt" in ev.failed["c"].message
        assert producer.poll().released == []  # the rightful consumer may still come
        assert pull(consumer, params, [0, 1, 2, 3, 4], 0, rid="c2").loaded == ["c2"]
        ev = pull(consumer, params, [0, 1, 2, 3, 4], 0, rid="c3")
        assert ev.failed["c3"].retryable and "no KV blocks are held" in ev.failed["c3"].message
    finally:
        producer.close()
        consumer.close()


def test_a_hold_nobody_pulls_is_released_after_the_timeout():
    producer = connector("kv_producer", pages(), kv_hold_timeout=0.05)
    try:
        held(producer)
        assert producer.poll().released == []
        time.sleep(0.1)
        assert producer.poll().released == ["p"]
        assert producer.stats.holds_expired == 1 and producer.stats.num_held == 0
    finally:
        producer.close()


def test_a_producer_that_closes_mid_block_fails_the_pull():
    dst = pages()
    server = socket.create_server(("127.0.0.1", 0))

    def half_a_block():
        conn, _ = server.accept()
        with conn:
            req = read_frame(conn, PullRequest)
            write_frame(conn, PullReply())
            conn.sendall(b"\0" * (req.layout.block_nbytes // 2))

    threading.Thread(target=half_a_block, daemon=True).start()
    consumer = connector("kv_consumer", dst)
    try:
        params = KVTransferParams(
            do_remote_prefill=True,
            remote_host="127.0.0.1",
            remote_port=server.getsockname()[1],
            remote_request_id="x",
            prompt_hash=prompt_hash(PROMPT),
            first_token_ids=[1],
        )
        failure = pull(consumer, params, [0, 1], 0).failed["c"]
        assert failure.retryable and "closed after" in failure.message, failure.message
        assert consumer.stats.pulls_failed == 1
    finally:
        server.close()
        consumer.close()


def test_a_producer_that_is_not_there_fails_the_pull_at_once():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when the block ends: nobody listens there
    consumer = connector("kv_consumer", pages(), kv_transfer_timeout=2)
    try:
        params = KVTransferParams(
            do_remote_prefill=True,
            remote_host="127.0.0.1",
            remote_port=port,
            remote_request_id="x",
            prompt_hash="h",
            first_token_ids=[1],
        )
        failure = pull(consumer, params, [0], 0).failed["c"]
        assert failure.retryable and "refused" in failure.message
    finally:
        consumer.close()


def test_with_every_block_cached_the_pull_only_releases_the_hold():
    producer, consumer = connector("kv_producer", pages()), connector("kv_consumer", pages())
    try:
        params = held(producer)
        assert pull(consumer, params, [], 5).loaded == ["c"]
        assert wait_events(producer).released == ["p"] and producer.stats.blocks_sent == 0
    finally:
        producer.close()
        consumer.close()


def test_mismatched_kv_layouts_are_refused():
    producer = connector("kv_producer", pages(torch.bfloat16))
    consumer = connector("kv_consumer", pages(torch.float32))
    try:
        failure = pull(consumer, held(producer), [0], 0).failed["c"]
        assert not failure.retryable and "bfloat16" in failure.message and "float32" in failure.message
    finally:
        producer.close()
        consumer.close()


@pytest.mark.parametrize(
    "config, message",
    [
        ({"kv_role": "kv_producer", "kv_connector": "NixlConnector"}, "not a connector this build has"),
        ({"kv_role": "prefill"}, "kv_role must be one of"),
        ({"kv_role": "kv_consumer", "kv_port": 70000}, "kv_port"),
        ({"kv_role": "kv_consumer", "kv_hold_timeout": 0}, "kv_hold_timeout"),
        ({"kv_connector": "TCPConnector"}, "kv_role"),
        ('{"kv_role": ', "not valid JSON"),
    ],
)
def test_kv_transfer_config_errors_name_the_field(config, message):
    with pytest.raises(ValueError, match=message):
        KVTransferConfig.parse(config)


def _fields(params: KVTransferParams) -> dict:
    return {f: getattr(params, f) for f in params.__struct_fields__}
