"""Per-document locks of one coordinator: a write, a delete and a rebalance move of one document exclude each
other. An entry lives only while someone holds or waits for it, so the table does not grow with every name ever
asked about."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class DocLocks:
    def __init__(self):
        self._locks: dict[tuple[str, str], tuple[asyncio.Lock, list[int]]] = {}  # key -> (lock, [users])

    @asynccontextmanager
    async def hold(self, namespace: str, name: str) -> AsyncIterator[None]:
        key = (namespace, name)
        lock, users = self._locks.setdefault(key, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if users[0] == 0:
                del self._locks[key]

    def __len__(self) -> int:
        return len(self._locks)
