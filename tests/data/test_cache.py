"""The feature cache: content keys, persistence across runs, atomic shards, skipping cached items."""

from __future__ import annotations

import numpy as np
import pytest

from vqakit.data.cache import FeatureCache, file_digest, text_digest


def _encode_counting(calls):
    def encode(items):
        calls.append(list(items))
        return {"x": np.array([[float(i), float(i) * 2] for i in items], dtype=np.float16),
                "m": np.ones((len(items), 3), dtype=np.uint8)}
    return encode


def test_build_encodes_each_key_once_and_persists(tmp_path):
    calls = []
    cache = FeatureCache(tmp_path, "tower-a")
    keys = ["k1", "k2", "k1", "k3"]
    assert cache.build(keys, [1, 2, 1, 3], _encode_counting(calls), batch_size=2, progress=False) == 3
    assert [i for c in calls for i in c] == [1, 2, 3]
    np.testing.assert_array_equal(cache.gather(["k3", "k1"], "x"), [[3, 6], [1, 2]])

    reopened = FeatureCache(tmp_path, "tower-a")  # a later run
    assert len(reopened) == 3 and "k2" in reopened
    assert reopened.build(keys, [1, 2, 1, 3], _encode_counting(calls), progress=False) == 0
    assert reopened.build(["k4"], [4], _encode_counting(calls), progress=False) == 1
    assert isinstance(FeatureCache(tmp_path, "tower-a").get("k4", "x"), np.memmap)  # memory-mapped
    assert len(FeatureCache(tmp_path, "tower-b")) == 0  # another tower never sees these rows


def test_shards_split_and_leave_no_temporary_files(tmp_path):
    cache = FeatureCache(tmp_path, "t")
    cache.build([f"k{i}" for i in range(10)], list(range(10)), _encode_counting([]), batch_size=3, shard_size=4,
                progress=False)
    assert len(list(cache.dir.glob("shard-*.keys.json"))) == 3
    assert not list(cache.dir.glob(".*tmp"))
    assert FeatureCache(tmp_path, "t").gather(["k9", "k0"], "x")[:, 0].tolist() == [9, 0]


def test_interrupted_build_keeps_finished_shards(tmp_path):
    def failing(items):
        if 5 in items:
            raise KeyboardInterrupt
        return _encode_counting([])(items)

    with pytest.raises(KeyboardInterrupt):
        FeatureCache(tmp_path, "t").build([f"k{i}" for i in range(8)], list(range(8)), failing, batch_size=2,
                                          shard_size=4, progress=False)
    cache = FeatureCache(tmp_path, "t")
    assert sorted(cache.index) == ["k0", "k1", "k2", "k3"]
    assert cache.missing([f"k{i}" for i in range(8)]) == ["k4", "k5", "k6", "k7"]


def test_inconsistent_shard_is_reported(tmp_path):
    cache = FeatureCache(tmp_path, "t")
    cache.add(["a", "b"], {"x": np.zeros((2, 2))})
    (cache.dir / "shard-00000.keys.json").write_text('["a", "b", "c"]')
    reopened = FeatureCache(tmp_path, "t")  # left out and named; rebuilt by the next build
    assert "shard-00000.x.npy has 2 rows, its index 3 keys" in reopened.problems[0] and len(reopened) == 0


def test_content_keys(tmp_path):
    (tmp_path / "a.png").write_bytes(b"same")
    (tmp_path / "b.png").write_bytes(b"same")
    (tmp_path / "c.png").write_bytes(b"other")
    assert file_digest(tmp_path / "a.png") == file_digest(tmp_path / "b.png") != file_digest(tmp_path / "c.png")
    assert text_digest("what?") != text_digest("what ?")


def test_two_processes_building_the_same_cache_encode_each_item_once(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_build_in_child, args=(tmp_path, i)) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    counts = [int((tmp_path / f"encoded-{i}").read_text()) for i in range(2)]
    assert sorted(counts) == [0, 20]  # one process encoded everything, the other found it cached
    cache = FeatureCache(tmp_path, "shared")
    assert len(cache) == 20 and len(list(cache.dir.glob("shard-*.keys.json"))) == 5


def _build_in_child(root, i):
    import time

    def slow_encode(items):
        time.sleep(0.05)
        return {"x": np.array([[float(v)] for v in items], dtype=np.float32)}

    cache = FeatureCache(root, "shared")
    n = cache.build([f"k{j}" for j in range(20)], list(range(20)), slow_encode, batch_size=4, shard_size=4,
                    progress=False)
    (root / f"encoded-{i}").write_text(str(n))


def test_build_with_on_error_skips_and_reports_failed_loads(tmp_path):
    def load(item):
        if item % 3 == 0:
            raise ValueError(f"cannot load {item}")
        return item

    failed = []
    cache = FeatureCache(tmp_path, "t")
    n = cache.build([f"k{i}" for i in range(7)], list(range(7)), lambda b: {"x": np.array(b)[:, None]}, batch_size=2,
                    shard_size=4, progress=False, load=load, workers=2,
                    on_error=lambda item, e: failed.append((item, str(e))))
    assert n == 4 and sorted(failed) == [(0, "cannot load 0"), (3, "cannot load 3"), (6, "cannot load 6")]
    assert sorted(cache.index) == ["k1", "k2", "k4", "k5"] and cache.get("k5", "x")[0] == 5
    with pytest.raises(ValueError, match="cannot load 0"):  # without on_error the error propagates
        FeatureCache(tmp_path, "u").build(["k0"], [0], lambda b: {"x": np.array(b)}, progress=False, load=load)
