"""The TCP connector's wire: a consumer asks a producer for blocks of a held prompt, the producer
answers with a small header and then the blocks' raw bytes. Headers are msgpack frames (a 4-byte
big-endian length, then the msgspec encoding), never pickle; blocks are sent as the pages hold
them, in chunks of ``chunk_blocks``: per chunk, for each KV tensor, its K/V rows ``[2, n, block_size,
kv_heads, head_dim]`` then (int8/fp8 caches) their scales ``[2, n, block_size, kv_heads]``."""

from __future__ import annotations

import socket

import msgspec

MAX_FRAME_BYTES = 1 << 20


class KVLayout(msgspec.Struct, frozen=True, kw_only=True):
    """What both sides' pages must agree on for raw bytes to mean the same K/V."""

    block_size: int
    num_tensors: int  # KV tensors (one per layer here)
    dtype: str  # torch's name of the stored dtype: bfloat16, float32, int8, float8_e4m3fn, ...
    num_kv_heads: int
    head_dim: int
    scales: bool  # int8/fp8: per-token scales follow each tensor's rows
    block_nbytes: int  # one block's bytes over all tensors, scales included

    def describe(self) -> str:
        return (
            f"{self.num_tensors} tensors of {self.dtype}, blocks of {self.block_size} tokens x "
            f"{self.num_kv_heads} KV heads x {self.head_dim}{' with scales' if self.scales else ''}"
        )


class PullRequest(msgspec.Struct, kw_only=True):
    request_id: str  # the producer's request id (kv_transfer_params.remote_request_id)
    prompt_hash: str  # the consumer's prompt: it must be the one the producer computed
    first_block: int  # index among the held prompt's blocks
    num_blocks: int  # 0: nothing to pull (the consumer's prefix cache had them): only release
    chunk_blocks: int
    layout: KVLayout


class PullReply(msgspec.Struct, kw_only=True):
    error: str | None = None  # set: refused, nothing follows
    retryable: bool = True  # the error is about the producer's state (gone, expired), not the request


def write_frame(sock: socket.socket, message: msgspec.Struct) -> None:
    data = msgspec.msgpack.encode(message)
    sock.sendall(len(data).to_bytes(4, "big") + data)


def read_frame(sock: socket.socket, kind: type, what: str = "a header"):
    size = int.from_bytes(recv_exact(sock, 4, what), "big")
    if size > MAX_FRAME_BYTES:
        raise ValueError(f"{what} of {size} bytes is larger than the protocol allows ({MAX_FRAME_BYTES})")
    return msgspec.msgpack.decode(recv_exact(sock, size, what), type=kind)


def recv_exact(sock: socket.socket, n: int, what: str) -> bytes:
    buf = bytearray(n)
    recv_into_exact(sock, memoryview(buf), what)
    return bytes(buf)


def recv_into_exact(sock: socket.socket, view: memoryview, what: str) -> None:
    """Fill ``view``; ConnectionError naming how far it got if the peer closes first."""
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError(f"the connection closed after {got} of the {len(view)} bytes of {what}")
        got += n
