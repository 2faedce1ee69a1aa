"""The feature cache at scale: a build killed with SIGKILL resumes from its last shard; loading is streamed."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np

from vqakit.data.cache import FeatureCache, _loaded_batches

BUILD = textwrap.dedent("""
    import sys, time
    import numpy as np
    from vqakit.data.cache import FeatureCache
    cache = FeatureCache(sys.argv[1], "ns")
    keys = [f"k{i}" for i in range(40)]
    def encode(batch):
        time.sleep(0.2)
        return {"x": np.array([[v, v * 2] for v in batch], dtype=np.float32)}
    cache.build(keys, list(range(40)), encode, batch_size=2, shard_size=4, progress=False)
""")


def test_killed_build_resumes(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", BUILD, str(tmp_path)], env={**os.environ})
    deadline = time.time() + 120
    while len(list((tmp_path / "ns").glob("shard-*.keys.json"))) < 2:
        assert proc.poll() is None, "the build finished before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    cache = FeatureCache(tmp_path, "ns")
    done, before = len(cache), set(cache.index)
    assert 8 <= done < 40 and done % 4 == 0  # whole shards only, never a half-written one

    encoded = []

    def encode(batch):
        encoded.extend(batch)
        return {"x": np.array([[v, v * 2] for v in batch], dtype=np.float32)}

    keys = [f"k{i}" for i in range(40)]
    assert cache.build(keys, list(range(40)), encode, batch_size=2, shard_size=4, progress=False) == 40 - done
    assert len(encoded) == 40 - done and {f"k{v}" for v in encoded} == set(keys) - before  # only what was missing
    reopened = FeatureCache(tmp_path, "ns")
    assert len(reopened) == 40
    np.testing.assert_array_equal(reopened.gather(keys, "x"), np.array([[i, 2 * i] for i in range(40)], np.float32))


def test_loaded_batches_order_and_bounded_lookahead():
    in_flight, peak, lock = [0], [0], threading.Lock()

    def load(v):
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        time.sleep(0.001)
        return v * 10

    out = []
    for batch in _loaded_batches(list(range(103)), 10, load, workers=4, ahead=2):
        with lock:
            in_flight[0] -= len(batch)
        out.append(batch)
    assert [v for b in out for v in b] == [v * 10 for v in range(103)] and len(out[-1]) == 3
    assert peak[0] <= 30  # at most `ahead` + 1 batches loaded and not yet consumed
    assert list(_loaded_batches([1, 2, 3], 2, None, 4)) == [[1, 2], [3]]
