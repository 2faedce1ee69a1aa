"""A disk cache of frozen-tower outputs, so towers that do not train run once per image, not once per step.

Layout: ``{root}/{namespace}/shard-00000.{field}.npy`` (one array per field, rows aligned) and
``shard-00000.keys.json`` (the row keys). ``namespace`` names the tower *and its weights* (a hash of
its parameters, the input size and any preprocessing knobs), so a fine-tuned tower never reads a
frozen one's features. Keys hash the *content* (image bytes, question text), so renamed or duplicated
files share rows and a changed file gets new ones. Shards are written to a temporary name and renamed,
so an interrupted build keeps every finished shard and never leaves a half-written one; arrays are
opened memory-mapped, so a 20k-image cache does not have to fit in memory.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm


def default_cache_dir() -> Path:
    """``$VQAKIT_CACHE`` or ``~/.cache/vqakit``."""
    return Path(os.environ.get("VQAKIT_CACHE", Path.home() / ".cache" / "vqakit"))


def file_digest(path: str | os.PathLike) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_digests(paths: Sequence[str], workers: int = 4, missing_ok: bool = False) -> list[str | None]:
    """Content hashes of many files, in parallel (hashing is I/O bound); with ``missing_ok``, ``None`` for a
    file that cannot be read (missing, a directory, no permission) instead of raising."""
    def digest(path):
        try:
            return file_digest(path)
        except OSError:
            if not missing_ok:
                raise
            return None

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(digest, paths))


def text_digest(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


class FeatureCache:
    """Rows of named arrays keyed by string, stored in memory-mapped ``.npy`` shards."""

    def __init__(self, root: str | os.PathLike, namespace: str):
        self.dir = Path(root) / namespace
        self.dir.mkdir(parents=True, exist_ok=True)
        self._shards: list[dict[str, np.ndarray]] = []
        self.index: dict[str, tuple[int, int]] = {}
        self._opened: set[str] = set()
        for keys_file in sorted(self.dir.glob("shard-*.keys.json")):
            self._open_shard(keys_file)

    def _open_shard(self, keys_file: Path) -> None:
        stem = keys_file.name[: -len(".keys.json")]
        keys = json.loads(keys_file.read_text())
        arrays = {}
        for f in self.dir.glob(f"{stem}.*.npy"):
            field = f.name[len(stem) + 1 : -len(".npy")]
            arrays[field] = np.load(f, mmap_mode="r")
        if not arrays or any(len(a) != len(keys) for a in arrays.values()):
            raise RuntimeError(f"feature cache shard {keys_file} is inconsistent; delete {self.dir} to rebuild it")
        shard_id = len(self._shards)
        self._shards.append(arrays)
        self._opened.add(keys_file.name)
        for row, key in enumerate(keys):
            self.index[key] = (shard_id, row)

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def __len__(self) -> int:
        return len(self.index)

    def missing(self, keys: Sequence[str]) -> list[str]:
        """Keys not cached yet, de-duplicated, in first-seen order."""
        return [k for k in dict.fromkeys(keys) if k not in self.index]

    def add(self, keys: Sequence[str], arrays: dict[str, np.ndarray]) -> None:
        """Write one new shard atomically: arrays first, then the keys file that makes it visible."""
        n = len(self._shards)
        while (self.dir / f"shard-{n:05d}.keys.json").exists():  # another process added shards meanwhile
            n += 1
        stem = f"shard-{n:05d}"
        for field, arr in arrays.items():
            if len(arr) != len(keys):
                raise ValueError(f"field {field!r} has {len(arr)} rows for {len(keys)} keys")
            tmp = self.dir / f".{stem}.{field}.npy.tmp"
            with open(tmp, "wb") as f:
                np.save(f, np.ascontiguousarray(arr))
            os.replace(tmp, self.dir / f"{stem}.{field}.npy")
        tmp = self.dir / f".{stem}.keys.json.tmp"
        tmp.write_text(json.dumps(list(keys)))
        os.replace(tmp, self.dir / f"{stem}.keys.json")
        self._open_shard(self.dir / f"{stem}.keys.json")

    def get(self, key: str, field: str) -> np.ndarray:
        shard, row = self.index[key]
        return self._shards[shard][field][row]

    def gather(self, keys: Sequence[str], field: str) -> np.ndarray:
        """Stack the rows of ``keys`` (B, ...) into one in-memory array."""
        return np.stack([self.get(k, field) for k in keys])

    def build(
        self,
        keys: Sequence[str],
        items: Sequence,
        encode: Callable[[list], dict[str, np.ndarray]],
        batch_size: int = 64,
        shard_size: int = 2048,
        desc: str = "caching features",
        progress: bool = True,
        load: Callable | None = None,
        workers: int = 4,
        on_error: Callable[[object, Exception], None] | None = None,
    ) -> int:
        """Encode the items whose keys are missing, ``batch_size`` at a time, one shard per ``shard_size``.

        Streaming and resumable: items are loaded a batch at a time (``load(item)``, e.g. decoding an image,
        runs in a pool of ``workers`` threads, up to two batches ahead of ``encode``), and every finished shard
        is on disk, so a build that is killed continues from its last shard when run again. Memory stays
        bounded by one shard of outputs plus a few batches of loaded items, whatever the number of items.

        With ``on_error``, an item whose ``load`` raises is skipped (no row is written for it, so a rerun tries it
        again) and ``on_error(item, exception)`` is called, so the caller can report it; without, the error propagates.

        Holds an exclusive lock on the cache folder while building, so processes sharing it (the ranks of
        a DDP run) encode each item once: the others wait, re-read the shards, and find them cached.
        Returns how many items were encoded (0 when everything was cached already; failed items not counted).
        """
        with open(self.dir / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self._reload()
                return self._build(keys, items, encode, batch_size, shard_size, desc, progress, load, workers,
                                   on_error)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _reload(self) -> None:
        """Open shards another process wrote since this cache was opened."""
        for keys_file in sorted(self.dir.glob("shard-*.keys.json")):
            if keys_file.name not in self._opened:
                self._open_shard(keys_file)

    def _build(self, keys, items, encode, batch_size, shard_size, desc, progress, load, workers, on_error) -> int:
        todo = {}
        for k, item in zip(keys, items):
            if k not in self.index and k not in todo:
                todo[k] = item
        pending = list(todo.items())
        safe_load = load
        if load is not None and on_error is not None:
            def safe_load(item):
                try:
                    return load(item)
                except Exception as e:  # reported through on_error below, never silently dropped
                    return _Failed(e)
        encoded = 0
        with tqdm(total=len(pending), desc=desc, disable=not progress or not pending, unit="item") as bar:
            for start in range(0, len(pending), shard_size):
                chunk = pending[start : start + shard_size]
                parts: dict[str, list[np.ndarray]] = {}
                done: list[str] = []
                offset = 0
                for batch in _loaded_batches([item for _, item in chunk], batch_size, safe_load, workers):
                    batch_keys = [k for k, _ in chunk[offset : offset + len(batch)]]
                    batch_items = [item for _, item in chunk[offset : offset + len(batch)]]
                    offset += len(batch)
                    good = [i for i, x in enumerate(batch) if not isinstance(x, _Failed)]
                    for i in range(len(batch)):
                        if isinstance(batch[i], _Failed):
                            on_error(batch_items[i], batch[i].error)
                    if good:
                        out = encode([batch[i] for i in good])
                        for field, arr in out.items():
                            parts.setdefault(field, []).append(arr)
                        done += [batch_keys[i] for i in good]
                    bar.update(len(batch))
                if done:
                    self.add(done, {f: np.concatenate(a) for f, a in parts.items()})
                encoded += len(done)
        return encoded


class _Failed:
    """What ``load`` gave for an item it could not load (``FeatureCache.build`` with ``on_error``)."""

    __slots__ = ("error",)

    def __init__(self, error: Exception):
        self.error = error


def _loaded_batches(items: list, batch_size: int, load: Callable | None, workers: int,
                    ahead: int = 2) -> Iterator[list]:
    """``items`` in batches, each item passed through ``load`` in a thread pool, ``ahead`` batches in advance
    (PIL decoding and resizing release the GIL, so this overlaps image decoding with the tower's forward)."""
    batches = [items[b : b + batch_size] for b in range(0, len(items), batch_size)]
    if load is None:
        yield from batches
        return
    with ThreadPoolExecutor(max(1, workers)) as pool:
        queued: deque = deque()
        for batch in batches:
            queued.append([pool.submit(load, item) for item in batch])
            if len(queued) > ahead:
                yield [f.result() for f in queued.popleft()]
        while queued:
            yield [f.result() for f in queued.popleft()]
