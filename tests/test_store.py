"""The content-addressed graph store: keys, atomic writes, LRU eviction by bytes."""

from __future__ import annotations

import os
import time

import pytest

from attribute_ray.store import GraphStore, graph_key


def test_keys_are_content_addresses() -> None:
    a = graph_key("m", "t", [1, 2, 3], {"max_n_logits": 10})
    assert a == graph_key("m", "t", [1, 2, 3], {"max_n_logits": 10}) and len(a) == 32
    assert a != graph_key("m", "t", [1, 2, 4], {"max_n_logits": 10})
    assert a != graph_key("m", "t2", [1, 2, 3], {"max_n_logits": 10})
    assert a != graph_key("m", "t", [1, 2, 3], {"max_n_logits": 5})


def test_put_get_and_least_recently_used_eviction(tmp_path) -> None:
    store = GraphStore(str(tmp_path / "graphs"), max_bytes=2500)
    keys = [graph_key("m", "t", [i], {}) for i in range(4)]
    for i, k in enumerate(keys[:2]):
        store.put(k, bytes([i]) * 1000)
        os.utime(tmp_path / "graphs" / f"{k}.msgpack", (time.time() - 100 + i, time.time() - 100 + i))
    assert store.get(keys[0]) == b"\x00" * 1000  # a read refreshes key 0: key 1 is now the oldest
    store.put(keys[2], b"\x02" * 1000)  # 3000 bytes > 2500: evict the least recently used
    assert keys[1] not in store and keys[0] in store and keys[2] in store
    store.put(keys[3], b"\x03" * 3000)  # larger than the budget on its own: it stays, everything else goes
    assert store.get(keys[3]) == b"\x03" * 3000 and keys[0] not in store and keys[2] not in store
    assert not list((tmp_path / "graphs").glob("*.tmp"))
    assert store.get(graph_key("m", "t", [9], {})) is None


def test_ids_that_are_not_keys_are_refused(tmp_path) -> None:
    store = GraphStore(str(tmp_path))
    for bad in ("../../etc/passwd", "abc", "A" * 32):
        assert bad not in store
        with pytest.raises(KeyError):
            store.get(bad)
