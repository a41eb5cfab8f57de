"""Results kept by key, least recently used first out, within a budget of bytes."""
from __future__ import annotations

import collections
import hashlib
import json
import threading
from typing import Any, Optional

import numpy as np

__all__ = ["ResultCache", "key_of"]


def key_of(**parts: Any) -> str:
    """A short stable key of JSON-able ``parts`` (the same parts in any order give the same key)."""
    text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _size(value: Any) -> int:
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, dict):
        return 64 + sum(_size(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return 64 + sum(_size(v) for v in value)
    if isinstance(value, (bytes, str)):
        return len(value)
    return 64


class ResultCache:
    """A thread-safe LRU mapping ``key -> value`` holding at most ``max_bytes`` (numpy arrays count
    their ``nbytes``); a value larger than the whole budget is not kept."""

    def __init__(self, max_bytes: int = 512 * 2**20) -> None:
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self._items: collections.OrderedDict[str, tuple[Any, int]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> Optional[Any]:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: str, value: Any) -> None:
        size = _size(value)
        with self._lock:
            if key in self._items:
                self.bytes -= self._items.pop(key)[1]
            if size > self.max_bytes:
                return
            self._items[key] = (value, size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (_, s) = self._items.popitem(last=False)
                self.bytes -= s

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._items
