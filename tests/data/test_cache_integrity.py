"""Feature-cache integrity: damaged shards (truncated, flipped bytes, lost files, a disagreeing or unreadable
index) are found on open, named with what was wrong, and re-encoded (that shard only) by the next build."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from vqakit.data.cache import FeatureCache


def _encode(calls):
    def encode(items):
        calls.extend(items)
        return {"x": np.array([[float(i), float(i) / 3] for i in items], dtype=np.float32),
                "m": np.full((len(items), 5), 7, dtype=np.uint8)}
    return encode


KEYS = [f"k{i}" for i in range(12)]


def _built(root):
    cache = FeatureCache(root, "t")
    cache.build(KEYS, list(range(12)), _encode([]), batch_size=2, shard_size=4, progress=False)
    return cache.gather(KEYS, "x"), cache.gather(KEYS, "m")


def _truncate(path):
    os.truncate(path, path.stat().st_size // 2)


def _flip(path):
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size - 5)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def _index_disagrees(path):
    keys_file = path.with_name("shard-00001.keys.json")
    index = json.loads(keys_file.read_text())
    index["keys"].append("extra")
    keys_file.write_text(json.dumps(index))


FAULTS = {
    "truncated": (_truncate, "truncated"),
    "flipped byte": (_flip, "digest mismatch"),
    "missing file": (lambda p: p.unlink(), "is missing"),
    "index disagrees": (_index_disagrees, "its index 5 keys"),
    "unreadable index": (lambda p: p.with_name("shard-00001.keys.json").write_bytes(b'{"keys": [\x00'),
                         "unreadable index"),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_a_damaged_shard_is_reported_and_rebuilt_alone(tmp_path, fault):
    clean_x, clean_m = _built(tmp_path)
    damage, reason = FAULTS[fault]
    damage(tmp_path / "t" / "shard-00001.x.npy")

    cache = FeatureCache(tmp_path, "t")  # opening never raises: the damaged shard is left out and named
    assert len(cache.problems) == 1 and "shard-00001" in cache.problems[0] and reason in cache.problems[0]
    assert cache.missing(KEYS) == ["k4", "k5", "k6", "k7"]
    calls = []
    assert cache.build(KEYS, list(range(12)), _encode(calls), batch_size=2, shard_size=4, progress=False) == 4
    assert calls == [4, 5, 6, 7]  # only that shard's items are encoded again
    assert cache.repaired == [str(tmp_path / "t" / "shard-00001.keys.json")]

    again = FeatureCache(tmp_path, "t")  # a later run sees a clean cache with the same rows
    assert again.problems == []
    np.testing.assert_array_equal(again.gather(KEYS, "x"), clean_x)
    np.testing.assert_array_equal(again.gather(KEYS, "m"), clean_m)


def test_a_truncated_format_1_shard_is_found_too(tmp_path):
    """Caches written before the index carried sizes (a bare list of keys): numpy's own error is the check."""
    clean_x, _ = _built(tmp_path)
    for keys_file in (tmp_path / "t").glob("*.keys.json"):
        keys_file.write_text(json.dumps(json.loads(keys_file.read_text())["keys"]))
    _truncate(tmp_path / "t" / "shard-00002.m.npy")
    cache = FeatureCache(tmp_path, "t")
    assert len(cache.problems) == 1 and "shard-00002.m.npy cannot be read" in cache.problems[0]
    assert cache.build(KEYS, list(range(12)), _encode([]), batch_size=2, shard_size=4, progress=False) == 4
    np.testing.assert_array_equal(FeatureCache(tmp_path, "t").gather(KEYS, "x"), clean_x)


def test_flipped_bytes_in_a_large_shard_are_found(tmp_path):
    """Above 1 MiB the digest samples 64 blocks; the first block (the .npy header) and the last are always in."""
    cache = FeatureCache(tmp_path, "big")
    cache.add(["a", "b"], {"x": np.arange(2 * 300_000, dtype=np.float32).reshape(2, -1)})  # 2.4 MB
    path = tmp_path / "big" / "shard-00000.x.npy"
    _flip(path)
    assert "digest mismatch" in FeatureCache(tmp_path, "big").problems[0]


def test_two_processes_repair_a_damaged_shard_once(tmp_path):
    import multiprocessing as mp

    _built(tmp_path)
    _truncate(tmp_path / "t" / "shard-00000.x.npy")
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_rebuild_in_child, args=(tmp_path, i)) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert sorted(int((tmp_path / f"encoded-{i}").read_text()) for i in range(2)) == [0, 4]
    cache = FeatureCache(tmp_path, "t")
    assert cache.problems == [] and len(cache) == 12


def _rebuild_in_child(root, i):
    import time

    def slow(items):
        time.sleep(0.05)
        return _encode([])(items)

    cache = FeatureCache(root, "t")
    n = cache.build(KEYS, list(range(12)), slow, batch_size=2, shard_size=4, progress=False)
    (root / f"encoded-{i}").write_text(str(n))
