"""The waiting queue under each policy: first come first served, or by priority."""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterator

from .request import Request


class FCFSQueue:
    def __init__(self) -> None:
        self._q: deque[Request] = deque()

    def add(self, req: Request) -> None:
        self._q.append(req)

    def add_preempted(self, req: Request) -> None:
        self._q.appendleft(req)  # it arrived before everything still waiting

    def peek(self) -> Request:
        return self._q[0]

    def pop(self) -> Request:
        return self._q.popleft()

    def remove(self, req: Request) -> None:
        self._q.remove(req)

    def __len__(self) -> int:
        return len(self._q)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._q)


class PriorityQueue:
    """Lowest ``priority`` value first, then earliest arrival."""

    def __init__(self) -> None:
        self._keys: list[tuple] = []
        self._reqs: list[Request] = []

    @staticmethod
    def key(req: Request) -> tuple:
        return (req.priority, req.arrival_time, req.seq)

    def add(self, req: Request) -> None:
        k = self.key(req)
        i = bisect.bisect(self._keys, k)
        self._keys.insert(i, k)
        self._reqs.insert(i, req)

    add_preempted = add

    def peek(self) -> Request:
        return self._reqs[0]

    def pop(self) -> Request:
        self._keys.pop(0)
        return self._reqs.pop(0)

    def remove(self, req: Request) -> None:
        i = self._reqs.index(req)
        del self._keys[i], self._reqs[i]

    def __len__(self) -> int:
        return len(self._reqs)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._reqs)
