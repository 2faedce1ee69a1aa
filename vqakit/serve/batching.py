"""Micro-batching: requests that arrive together are answered in one forward pass.

A worker thread runs the model. While it runs a batch, new requests queue up; when it is free it takes
everything waiting (up to ``max_batch_size`` questions) at once, so batches grow with the load and a lone
request is never delayed. With ``workers`` > 1, that many threads take batches in turn, so one batch's text
tower runs while another's vision tower or head does: the cores stay busy when one batch's parts would leave one
idle (the predictor must allow concurrent calls, as ONNX Runtime sessions do). Requests still being received and
decoded announce themselves (``expect``), and a worker waits for them up to ``max_wait_ms``; with nothing announced
it does not wait at all.
This is the dynamic batching of inference servers (Triton's ``max_queue_delay_microseconds``, TorchServe's
``maxBatchDelay``) with the delay only paid when it can help.

Futures are ``concurrent.futures.Future``: asyncio handlers await them with ``asyncio.wrap_future`` and
threads block on ``.result()``, so the REST service and the web UI share one batcher. A batch that raises
is retried one request at a time, so one bad request fails alone; the worker survives every exception.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field

logger = logging.getLogger("vqakit")


class QueueFull(RuntimeError):
    """More requests are waiting than ``max_queue`` allows."""


@dataclass
class Job:
    """One request: an image's inputs and its questions."""

    image: object
    questions: list[str]
    top_k: int = 5
    heatmap: bool = False
    future: Future = field(default_factory=Future)


class _Ticket:
    open = True


# run(images, questions per image, top_k, output_attentions) -> one result list per image
RunFn = Callable[[Sequence[object], Sequence[list[str]], int, bool], list]


class MicroBatcher:
    """Groups concurrent jobs into batches of at most ``max_batch_size`` questions and runs them on ``workers``
    threads."""

    def __init__(self, run: RunFn, max_batch_size: int = 32, max_wait_ms: float = 2.0, max_queue: int = 256,
                 workers: int = 1):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size} must be at least 1")
        if workers < 1:
            raise ValueError(f"workers={workers} must be at least 1")
        self.run = run
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.max_queue = max_queue
        self._jobs: deque[Job] = deque()
        self._expected = 0
        self._cond = threading.Condition()
        self._closed = False
        self.stats = {"batches": 0, "requests": 0, "questions": 0, "largest_batch": 0, "failed_batches": 0}
        self._stats_lock = threading.Lock()
        self._threads = [threading.Thread(target=self._loop, name=f"vqakit-batcher-{i}", daemon=True)
                         for i in range(workers)]
        for thread in self._threads:
            thread.start()

    @property
    def workers(self) -> int:
        return len(self._threads)

    # -- callers ---------------------------------------------------------------------------------------------------

    @contextmanager
    def expect(self):
        """Announce a request that is being received or decoded, so a forming batch may wait for it.

        Yields a ticket to pass to ``submit``; the announcement ends at ``submit`` or when the block exits."""
        ticket = _Ticket()
        with self._cond:
            self._expected += 1
        try:
            yield ticket
        finally:
            with self._cond:
                self._settle(ticket)

    def submit(self, image, questions: list[str], top_k: int = 5, heatmap: bool = False,
               ticket: _Ticket | None = None) -> Future:
        """Queue one image's questions; the future's result is that image's list of predictions."""
        job = Job(image, list(questions), top_k, heatmap)
        with self._cond:
            if ticket is not None:
                self._settle(ticket)
            if self._closed:
                raise RuntimeError("the batcher is closed")
            if len(self._jobs) >= self.max_queue:
                raise QueueFull(f"{len(self._jobs)} requests are waiting (max_queue={self.max_queue}); retry later")
            self._jobs.append(job)
            self._cond.notify_all()
        return job.future

    def _settle(self, ticket: _Ticket) -> None:
        if ticket.open:  # under self._cond
            ticket.open = False
            self._expected -= 1
            self._cond.notify_all()

    def close(self, timeout: float = 10.0) -> None:
        """Answer what is queued, then stop the workers."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        end = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, end - time.monotonic()))

    # -- the worker ------------------------------------------------------------------------------------------------

    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while not self._jobs and not self._closed:
                self._cond.wait()
            if not self._jobs:
                return None  # closed and drained
            deadline = time.monotonic() + self.max_wait
            while (self._expected > 0 and self._questions_waiting() < self.max_batch_size and not self._closed
                   and (left := deadline - time.monotonic()) > 0):
                self._cond.wait(left)
            batch, size = [], 0
            while self._jobs and (not batch or size + len(self._jobs[0].questions) <= self.max_batch_size):
                job = self._jobs.popleft()
                batch.append(job)
                size += len(job.questions)
            return batch

    def _questions_waiting(self) -> int:
        return sum(len(j.questions) for j in self._jobs)

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            # jobs asking for heatmaps take the (slower) attention path; the others do not wait for it
            for group in ([j for j in batch if not j.heatmap], [j for j in batch if j.heatmap]):
                if group:
                    self._run_group(group)

    def _run_group(self, group: list[Job]) -> None:
        live = [j for j in group if j.future.set_running_or_notify_cancel()]
        if not live:
            return
        try:
            results = self._call(live)
        except Exception as err:  # noqa: BLE001 - the worker must survive anything the model raises
            with self._stats_lock:
                self.stats["failed_batches"] += 1
            if len(live) == 1:
                logger.exception("batch of 1 request failed")
                live[0].future.set_exception(err)
                return
            for job in live:  # isolate the request that failed; the others are answered
                try:
                    job.future.set_result(self._call([job])[0])
                except Exception as single_err:  # noqa: BLE001
                    job.future.set_exception(single_err)
            return
        for job, result in zip(live, results):
            job.future.set_result(result)

    def _call(self, jobs: list[Job]) -> list:
        top_k = max(j.top_k for j in jobs)
        results = self.run([j.image for j in jobs], [j.questions for j in jobs], top_k, jobs[0].heatmap)
        questions = sum(len(j.questions) for j in jobs)
        with self._stats_lock:
            self.stats["batches"] += 1
            self.stats["requests"] += len(jobs)
            self.stats["questions"] += questions
            self.stats["largest_batch"] = max(self.stats["largest_batch"], questions)
        for job, preds in zip(jobs, results):  # each request gets the top-k it asked for
            for p in preds:
                p.top_k = p.top_k[: job.top_k]
        return results
