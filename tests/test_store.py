"""The content-addressed graph store: keys, atomic writes, LRU eviction by bytes."""

from __future__ import annotations

import os
import subprocess
import sys
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


def killed_write(root, key: str, size: int) -> None:
    """A store write killed midway, in its own process: the temporary file stays behind."""
    code = ("import os, sys\nfrom attribute_ray.files import atomic_open\n"
            f"with atomic_open({str(root / (key + '.msgpack'))!r}) as f:\n"
            f"    f.write(b'x' * {size}); f.flush(); os._exit(9)\n")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9


def test_leftover_temp_files_count_against_the_bound_and_stale_ones_go_at_start_up(tmp_path) -> None:
    root = tmp_path / "graphs"
    root.mkdir()
    keys = [graph_key("m", "t", [i], {}) for i in range(4)]
    killed_write(root, keys[0], 1500)
    killed_write(root, keys[1], 1000)
    stale, fresh = sorted(root.glob(".*.tmp"), key=lambda p: p.stat().st_size, reverse=True)
    assert stale.stat().st_size == 1500 and fresh.stat().st_size == 1000
    hour_ago = time.time() - 3600
    os.utime(stale, (hour_ago, hour_ago))  # killed an hour ago; `fresh` may be a write still running

    store = GraphStore(str(root), max_bytes=2500)
    assert not stale.exists() and fresh.exists()
    store.put(keys[2], b"\x02" * 1000)
    old = time.time() - 100
    os.utime(root / f"{keys[2]}.msgpack", (old, old))
    store.put(keys[3], b"\x03" * 1000)  # 1000 (temp) + 1000 + 1000 > 2500: the older graph goes
    assert keys[2] not in store and store.get(keys[3]) == b"\x03" * 1000 and fresh.exists()
    GraphStore(str(root), max_bytes=2500, stale_tmp_s=0)  # once it is stale too, the next start removes it
    assert not fresh.exists() and keys[3] in store
