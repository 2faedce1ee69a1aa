"""A resumable predictions journal: answers appended as JSON lines, fsync'd a chunk at a time.

``evaluate`` on a large split can run for an hour; a killed run (SIGKILL, a lost machine) must not start
over. The journal ``<out_dir>/predictions.partial.jsonl`` starts with a header naming what is evaluated
(the checkpoint's weights by size and modification time, the dataset, split, question ids and any
predictor settings); each later line is one answered question. A rerun with the same header skips the
questions already answered; a header that differs (another checkpoint, retrained weights, other
questions) starts the journal over. A last line cut short by the kill is ignored. The journal is removed
once ``metrics.json`` and ``predictions.csv`` are written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

logger = logging.getLogger("vqakit")

JOURNAL_NAME = "predictions.partial.jsonl"
ROW_FIELDS = {"row", "question_id", "answer", "score", "top_k"}


def journal_key(checkpoint: str | Path, dataset: str, split: str, question_ids: list, **settings) -> str:
    """What a journal's answers are valid for, hashed: checkpoint files, data and predictor settings."""
    checkpoint = Path(checkpoint).resolve()
    files = {}
    for name in ("config.json", "model.safetensors"):
        path = checkpoint / name
        if path.is_file():
            st = path.stat()
            files[name] = [st.st_size, st.st_mtime_ns]
    blob = json.dumps({"checkpoint": str(checkpoint), "files": files, "dataset": dataset, "split": split,
                       "question_ids": question_ids, "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()


class PredictionJournal:
    """Append-only JSON lines of ``{"row", "question_id", "answer", "score", "top_k"}`` after a ``{"key"}``
    header; ``done`` maps each answered row (the question's position in the split) to its line."""

    def __init__(self, out_dir: str | Path, key: str, resume: bool = True):
        self.path = Path(out_dir) / JOURNAL_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.key = key
        self.done: dict = {}
        if resume and self.path.is_file():
            self.done = self._read()
        if not self.done:
            with open(self.path, "w") as f:
                f.write(json.dumps({"key": key}) + "\n")
                f.flush()
                os.fsync(f.fileno())
        elif self.done:
            logger.info("resuming the evaluation from %s: %d questions already answered", self.path, len(self.done))

    def _read(self) -> dict:
        lines = self.path.read_bytes().split(b"\n")
        try:
            header = json.loads(lines[0])
        except ValueError:
            header = None
        if not isinstance(header, dict) or header.get("key") != self.key:
            logger.warning("%s was written for another checkpoint, split or settings: starting over", self.path)
            return {}
        done = {}
        for n, line in enumerate(lines[1:], start=2):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if not isinstance(row, dict) or not ROW_FIELDS <= row.keys():  # e.g. the line cut short by a kill
                if n < len(lines):
                    logger.warning("%s line %d is damaged: ignored (that question is predicted again)", self.path, n)
                continue
            done[row["row"]] = row
        if done and not lines[-1] == b"":  # the file ends mid-line: end that line, so appends start on a new one
            with open(self.path, "ab") as f:
                f.write(b"\n")
        return done

    def append(self, rows: list[dict]) -> None:
        """Add answered questions and make them durable (one fsync per call)."""
        with open(self.path, "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
            f.flush()
            os.fsync(f.fileno())
        for r in rows:
            self.done[r["row"]] = r

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
