"""A disk cache of frozen-tower outputs, so towers that do not train run once per image, not once per step.

Layout: ``{root}/{namespace}/shard-00000.{field}.npy`` (one array per field, rows aligned) and
``shard-00000.keys.json`` (the row keys). ``namespace`` names the tower *and its weights* (a hash of
its parameters, the input size and any preprocessing knobs), so a fine-tuned tower never reads a
frozen one's features. Keys hash the *content* (image bytes, question text), so renamed or duplicated
files share rows and a changed file gets new ones. Shards are written to a temporary name and renamed,
so an interrupted build keeps every finished shard and never leaves a half-written one; arrays are
opened memory-mapped, so a 20k-image cache does not have to fit in memory.

Integrity: the keys file is the shard's index and is written last. Besides the keys it records, per field,
the file's size and a digest (BLAKE2b of the whole file up to 1 MiB, of 64 evenly spaced 16 KiB blocks plus
the size above that: cheap to check on every open, and it catches truncation, a lost file and most flipped
bytes). A shard that fails a check (missing or truncated file, changed bytes, rows that disagree with its
keys, an unreadable index) is reported with its path and the reason, left out of the cache, and deleted
and re-encoded, that shard only, by the next ``build`` (under the build lock), so a damaged cache repairs
itself instead of stopping a run with ``mmap length is greater than file size``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

logger = logging.getLogger("vqakit")

INDEX_FORMAT = 2  # keys files of format 1 were a bare list of keys (no sizes or digests): still read
_WHOLE_FILE_DIGEST = 1 << 20  # files up to this size are hashed whole
_DIGEST_BLOCKS, _DIGEST_BLOCK = 64, 16 << 10


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


def shard_digest(path: str | os.PathLike) -> str:
    """A cheap content digest of one shard file: BLAKE2b of the whole file up to 1 MiB; above, of its size and
    64 evenly spaced 16 KiB blocks (the first and the last included), i.e. at most 1 MiB read per file."""
    size = os.path.getsize(path)
    h = hashlib.blake2b(str(size).encode(), digest_size=16)
    with open(path, "rb") as f:
        if size <= _WHOLE_FILE_DIGEST:
            h.update(f.read())
        else:
            step = (size - _DIGEST_BLOCK) / (_DIGEST_BLOCKS - 1)
            for i in range(_DIGEST_BLOCKS):
                f.seek(int(i * step))
                h.update(f.read(_DIGEST_BLOCK))
    return h.hexdigest()


class ShardError(Exception):
    """A shard that failed its integrity check; the message says what was wrong."""


class FeatureCache:
    """Rows of named arrays keyed by string, stored in memory-mapped ``.npy`` shards.

    ``problems`` lists the shards found damaged (``"<path>: <what was wrong>"``) since the cache was opened;
    their keys read as missing, so ``build`` encodes them again.
    """

    def __init__(self, root: str | os.PathLike, namespace: str):
        self.dir = Path(root) / namespace
        self.dir.mkdir(parents=True, exist_ok=True)
        self._shards: list[dict[str, np.ndarray]] = []
        self.index: dict[str, tuple[int, int]] = {}
        self._opened: set[str] = set()
        self._damaged: dict[str, str] = {}  # keys file name -> what was wrong
        self.problems: list[str] = []
        self.repaired: list[str] = []  # keys files of the damaged shards deleted by build (to be re-encoded)
        for keys_file in sorted(self.dir.glob("shard-*.keys.json")):
            self._open_shard(keys_file)

    def _open_shard(self, keys_file: Path) -> None:
        try:
            keys, arrays = _read_shard(keys_file)
        except ShardError as e:
            if self._damaged.get(keys_file.name) != str(e):
                problem = f"{keys_file}: {e}"
                self.problems.append(problem)
                logger.warning("feature cache: damaged shard %s; its rows will be encoded again", problem)
            self._damaged[keys_file.name] = str(e)
            return
        self._damaged.pop(keys_file.name, None)
        shard_id = len(self._shards)
        self._shards.append(arrays)
        self._opened.add(keys_file.name)
        for row, key in enumerate(keys):
            self.index[key] = (shard_id, row)

    def _repair(self) -> None:
        """Delete the damaged shards (held under the build lock), so their keys are encoded again. A shard
        another process repaired meanwhile (its keys file gone or valid again) is left alone."""
        for name in list(self._damaged):
            keys_file = self.dir / name
            if not keys_file.exists():
                self._damaged.pop(name)
                continue
            try:
                _read_shard(keys_file)
            except ShardError:
                stem = name[: -len(".keys.json")]
                keys_file.unlink()  # first: the shard is invisible from here on
                for f in self.dir.glob(f"{stem}.*.npy"):
                    f.unlink()
                self.repaired.append(str(keys_file))
                logger.warning("feature cache: deleted damaged shard %s to encode its rows again", keys_file)
            self._damaged.pop(name)

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
        files = {}
        for field in arrays:
            path = self.dir / f"{stem}.{field}.npy"
            files[field] = {"size": path.stat().st_size, "digest": shard_digest(path)}
        tmp = self.dir / f".{stem}.keys.json.tmp"
        tmp.write_text(json.dumps({"format": INDEX_FORMAT, "keys": list(keys), "files": files}))
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
                self._repair()
                return self._build(keys, items, encode, batch_size, shard_size, desc, progress, load, workers,
                                   on_error)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _reload(self) -> None:
        """Open shards another process wrote since this cache was opened (and re-check damaged ones)."""
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


def _read_shard(keys_file: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """The keys and memory-mapped arrays of one shard, after checking them against its index; ``ShardError``
    says what is wrong otherwise."""
    stem = keys_file.name[: -len(".keys.json")]
    try:
        index = json.loads(keys_file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ShardError(f"unreadable index ({type(e).__name__}: {e})") from None
    if isinstance(index, list):  # format 1: keys only; fields found by name, no sizes or digests to check
        keys, files = index, {f.name[len(stem) + 1 : -len(".npy")]: None
                              for f in keys_file.parent.glob(f"{stem}.*.npy")}
    elif isinstance(index, dict) and isinstance(index.get("keys"), list) and isinstance(index.get("files"), dict):
        keys, files = index["keys"], index["files"]
    else:
        raise ShardError("unreadable index (neither a list of keys nor {keys, files})")
    if not files:
        raise ShardError("the index lists no array files")
    arrays = {}
    for field, expected in files.items():
        path = keys_file.parent / f"{stem}.{field}.npy"
        if not path.is_file():
            raise ShardError(f"{path.name} is missing")
        if expected is not None:
            size = path.stat().st_size
            if size != expected["size"]:
                raise ShardError(f"{path.name} is {size:,} bytes, its index says {expected['size']:,} "
                                 f"({'truncated' if size < expected['size'] else 'grown'})")
            if shard_digest(path) != expected["digest"]:
                raise ShardError(f"{path.name} has the right size but other bytes (digest mismatch: corrupted)")
        try:
            arrays[field] = np.load(path, mmap_mode="r")
        except Exception as e:  # a truncated format-1 shard: "mmap length is greater than file size", ...
            raise ShardError(f"{path.name} cannot be read ({type(e).__name__}: {e})") from None
        if len(arrays[field]) != len(keys):
            raise ShardError(f"{path.name} has {len(arrays[field])} rows, its index {len(keys)} keys")
    return keys, arrays


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
