"""Evaluate any OpenAI-compatible VQA server (``vqakit serve``, vLLM, ``transformers serve``, ...) on a vqakit data
source, with the same metrics as a local checkpoint (``vqakit evaluate --endpoint URL --endpoint_model NAME``).

Each question goes out as one chat completion: a user message with the image as a ``data:`` URL and the question
through ``prompt_template`` (an optional ``system_prompt`` before it), ``temperature`` 0. Requests run
``concurrency`` at a time, each with a timeout, and are retried with exponential backoff and jitter on connection
errors, timeouts, 408/409/429 and 5xx (``Retry-After`` honoured); any other 4xx stops the run with the server's
message. This is the pattern of lmms-eval's and VLMEvalKit's API models, which score with their own metrics;
here the answers are scored by :func:`vqakit.eval.evaluate.score_and_write`, the official VQA accuracy of
``vqakit evaluate --checkpoint``.

The answer cache ``<out_dir>/answers.jsonl`` gets one line per answer as it arrives (flushed and fsync'd), keyed by
(endpoint, model, prompt template, system prompt, max_tokens, top_logprobs, question id): a killed or failed
evaluation run again with the same settings asks only the questions that have no answer yet.

A server that describes itself (``vqakit serve``: the ``vqakit`` field of ``GET /v1/models``) is scored as the
checkpoint would be: a classifier's answers against its answer classes, with its top-5 answers from
``top_logprobs``; a generative checkpoint's after the official normalisation, with its decoding settings. Any other
server's answers are free text, scored like a generative checkpoint's (the lenient accuracy handles
"The answer is ..."), with the answer's score ``exp(sum of its token logprobs)`` when the server returns them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import mimetypes
import os
import random
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from vqakit.data.config import DataConfig
from vqakit.inference.predict import Prediction

CACHE_NAME = "answers.jsonl"
# worth another try: the request may succeed later (OpenAI's client retries the same statuses)
RETRY_STATUSES = (408, 409, 429, 500, 502, 503, 504)


@dataclass
class EndpointOptions:
    """How ``vqakit evaluate --endpoint`` calls the server.

    Args:
        concurrency: requests in flight at once.
        max_retries: retries of a request after a connection error, a timeout, 408/409/429 or a 5xx (0: none).
        backoff_s: the first retry's wait; it doubles with each retry (with jitter), up to ``max_backoff_s``.
        max_backoff_s: the longest wait between two tries (also the cap on a server's ``Retry-After``).
        timeout_s: time limit of one request (connect, send, answer).
        max_tokens: ``max_tokens`` of each request (the answer's length in the server's tokens).
        top_logprobs: answers with scores asked per question (``logprobs``; ``vqakit serve`` returns its top-k
            answers, which top-5 accuracy needs); 0: ask for no logprobs (servers that do not support them).
        api_key_env: the environment variable holding the server's API key (sent as ``Authorization: Bearer``);
            unset or empty: no key is sent.
    """

    concurrency: int = 8
    max_retries: int = 5
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    timeout_s: float = 60.0
    max_tokens: int = 16
    top_logprobs: int = 5
    api_key_env: str = "OPENAI_API_KEY"

    def __post_init__(self):
        for name in ("concurrency", "timeout_s", "max_tokens"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--endpoint_options.{name}={getattr(self, name)} must be positive")
        for name in ("max_retries", "backoff_s", "max_backoff_s", "top_logprobs"):
            if getattr(self, name) < 0:
                raise ValueError(f"--endpoint_options.{name}={getattr(self, name)} must not be negative")
        if self.top_logprobs > 20:
            raise ValueError(f"--endpoint_options.top_logprobs={self.top_logprobs} is more than OpenAI's limit, 20")


class EndpointError(RuntimeError):
    """The server refused a request, or kept failing after every retry."""


def base_url(url: str) -> str:
    """The API's base URL: ``http://host:8000`` and ``http://host:8000/v1/`` both -> ``http://host:8000/v1``."""
    url = url.strip().rstrip("/")
    if not url.lower().startswith(("http://", "https://")):
        raise ValueError(f"--endpoint={url!r} must be an http:// or https:// URL, e.g. http://127.0.0.1:8000/v1")
    return url if "/" in url.partition("://")[2] else f"{url}/v1"


def check_template(template: str) -> str:
    """``template`` must hold ``{question}`` and no other field (``{{``/``}}`` for literal braces)."""
    try:
        filled = template.format(question="\x00")
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(f"--prompt_template={template!r} must use the one field {{question}} (write {{{{ and }}}} "
                         f"for literal braces): {type(err).__name__}: {err}") from err
    if "\x00" not in filled:
        raise ValueError(f"--prompt_template={template!r} has no {{question}} field")
    return template


class EndpointClient:
    """Chat completions against one OpenAI-compatible server, with a timeout, retries and backoff.

    ``sleep`` is the wait between tries (``time.sleep``; tests count the waits)."""

    def __init__(self, url: str, model: str, options: EndpointOptions | None = None, sleep=time.sleep):
        try:
            import httpx
        except ImportError as err:  # a dependency of vqakit; missing only in a broken environment
            raise RuntimeError("vqakit evaluate --endpoint needs httpx: pip install httpx") from err
        self.url, self.model = base_url(url), model
        self.options = options or EndpointOptions()
        self.sleep = sleep
        key = os.environ.get(self.options.api_key_env, "") if self.options.api_key_env else ""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        n = self.options.concurrency
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        self.http = httpx.Client(timeout=self.options.timeout_s, headers=headers, limits=limits)
        self._httpx = httpx
        self._lock = threading.Lock()
        self.retries = 0

    def close(self) -> None:
        self.http.close()

    def model_card(self) -> dict | None:
        """The ``GET /models`` entry of ``model``; ``ValueError`` listing the served ids when it is not there;
        None when the server has no ``/models`` route."""
        response = self._request("GET", "/models")
        if response is None:
            return None
        data = response.get("data") or []
        ids = [m.get("id") for m in data if isinstance(m, dict)]
        if self.model not in ids:
            raise ValueError(f"--endpoint_model={self.model!r} is not served by {self.url}; it serves {ids}")
        return data[ids.index(self.model)]

    def chat(self, messages: list[dict]) -> dict:
        """One deterministic chat completion (``temperature`` 0), with logprobs when ``top_logprobs`` > 0."""
        body = {"model": self.model, "messages": messages, "temperature": 0, "max_tokens": self.options.max_tokens}
        if self.options.top_logprobs:
            body.update(logprobs=True, top_logprobs=self.options.top_logprobs)
        return self._request("POST", "/chat/completions", body)

    def _request(self, method: str, path: str, body: dict | None = None) -> dict | None:
        """The JSON answer, after up to ``max_retries`` retries; None for a GET the server does not have (404)."""
        opts, url = self.options, self.url + path
        for attempt in range(opts.max_retries + 1):
            retry_after = None
            try:
                response = self.http.request(method, url, json=body)
            except self._httpx.HTTPError as err:  # refused, reset, timed out
                problem = f"{type(err).__name__}: {err}"
            else:
                if response.status_code == 200:
                    try:
                        return response.json()
                    except ValueError as err:
                        raise EndpointError(f"{method} {url} answered 200 with a body that is not JSON: "
                                            f"{response.text[:200]!r}") from err
                if method == "GET" and response.status_code == 404:
                    return None
                problem = f"HTTP {response.status_code}: {_error_message(response)}"
                if response.status_code not in RETRY_STATUSES:
                    raise EndpointError(f"{method} {url} was refused ({problem})")
                retry_after = _retry_after(response.headers.get("retry-after"))
            if attempt == opts.max_retries:
                raise EndpointError(f"{method} {url} failed {attempt + 1} times; the last: {problem}")
            delay = min(opts.max_backoff_s, opts.backoff_s * 2**attempt) * random.uniform(0.5, 1.0)
            if retry_after is not None:
                delay = max(delay, min(retry_after, opts.max_backoff_s))
            with self._lock:
                self.retries += 1
            self.sleep(delay)
        raise AssertionError("unreachable")


def _error_message(response) -> str:
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        return response.text[:300]
    return str(error.get("message", error) if isinstance(error, dict) else error)[:300]


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to the backoff


def image_data_url(path: str | Path) -> str:
    """An image file as a ``data:`` URL (its MIME type from the name; the bytes unchanged)."""
    mime = mimetypes.guess_type(str(path))[0] or "image/png"
    return f"data:{mime};base64,{base64.b64encode(Path(path).read_bytes()).decode()}"


def answer_of(response: dict, described: bool) -> tuple[str, list[tuple[str, float]]]:
    """A chat completion -> (raw answer, top-k with scores). ``described``: a ``vqakit serve`` answer, whose one
    content token is the answer and whose ``top_logprobs`` are the best answers; otherwise the answer's score is
    ``exp`` of the sum of its tokens' logprobs (NaN without logprobs)."""
    try:
        choice = response["choices"][0]
        answer = choice["message"].get("content") or ""
    except (KeyError, IndexError, TypeError, AttributeError) as err:
        raise EndpointError(f"a chat completion without choices[0].message: {json.dumps(response)[:300]}") from err
    tokens = ((choice.get("logprobs") or {}).get("content")) or []
    if described and tokens and tokens[0].get("top_logprobs"):
        return answer, [(t["token"], math.exp(t["logprob"])) for t in tokens[0]["top_logprobs"]]
    score = math.exp(sum(t["logprob"] for t in tokens)) if tokens else float("nan")
    return answer, [(answer, score)]


class AnswerCache:
    """``answers.jsonl``: one JSON line per answer, appended and fsync'd as it arrives; lines of other settings
    (another endpoint, model, template, ...) are kept but not used, and a line cut short by a kill is skipped."""

    def __init__(self, path: str | Path, settings: dict):
        self.path = Path(path)
        self.key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        self.settings = settings
        self.answers: dict[str, dict] = {}
        if self.path.is_file():
            with self.path.open(encoding="utf-8") as f:
                for line in f:
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # the last line of a killed run
                    if isinstance(row, dict) and row.get("key") == self.key:
                        self.answers[str(row["question_id"])] = row
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        if self._file.tell() and not self.path.read_bytes().endswith(b"\n"):
            self._file.write("\n")  # after a cut line, start a fresh one

    def __contains__(self, question_id) -> bool:
        return str(question_id) in self.answers

    def __len__(self) -> int:
        return len(self.answers)

    def add(self, question_id, answer: str, top_k: list[tuple[str, float]]) -> None:
        row = {"key": self.key, "question_id": question_id, "answer": answer, "top_k": top_k, **self.settings}
        self._file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.answers[str(question_id)] = row

    def prediction(self, question_id, question: str) -> Prediction:
        row = self.answers[str(question_id)]
        top_k = [(a, float(s)) for a, s in row["top_k"]]
        score = next((s for a, s in top_k if a == row["answer"]), float("nan"))
        return Prediction(question, row["answer"], score, top_k)

    def close(self) -> None:
        self._file.close()


def evaluate_endpoint(
    endpoint: str,
    model: str,
    data: DataConfig,
    split: str | None = None,
    out_dir: str | Path | None = None,
    prompt_template: str = "{question}",
    system_prompt: str | None = None,
    options: EndpointOptions | None = None,
    progress: bool = True,
    sleep=time.sleep,
) -> dict:
    """Ask ``model`` at ``endpoint`` every question of ``split`` (default ``data.eval_split``) and score the answers
    as ``evaluate_checkpoint`` does; questions already in ``<out_dir>/answers.jsonl`` are not asked again.

    Writes ``metrics.json`` (the checkpoint's fields plus ``endpoint``, ``endpoint_model``, ``prompt_template``,
    ``system_prompt`` and request counts), ``predictions.csv``, ``failures.json`` and the answer cache into
    ``out_dir`` (default ``eval-<model>-<dataset>-<split>``), and returns the metrics.
    """
    from vqakit.eval.evaluate import load_examples, score_and_write

    options = options or EndpointOptions()
    check_template(prompt_template)
    split = split or data.eval_split
    client = EndpointClient(endpoint, model, options, sleep=sleep)
    out = Path(out_dir) if out_dir is not None else Path(f"eval-{model.replace('/', '_')}-{data.dataset}-{split}")
    try:
        card = client.model_card()
        info = (card or {}).get("vqakit") if isinstance((card or {}).get("vqakit"), dict) else None
        examples, skipped = load_examples(data, split, progress)
        settings = {"endpoint": client.url, "model": model, "prompt_template": prompt_template,
                    "system_prompt": system_prompt, "max_tokens": options.max_tokens,
                    "top_logprobs": options.top_logprobs}
        cache = AnswerCache(out / CACHE_NAME, settings)
        todo = [e for e in dict((str(e.question_id), e) for e in examples).values() if e.question_id not in cache]
        cached = len(examples) - len(todo)
        start = time.perf_counter()
        try:
            _ask_all(client, todo, cache, prompt_template, system_prompt, info is not None, progress)
        finally:
            cache.close()
        seconds = time.perf_counter() - start
    finally:
        client.close()
    predictions = [cache.prediction(e.question_id, e.question) for e in examples]
    generative = info is None or bool(info.get("generative"))
    decoding = (info or {}).get("decoding") or {"temperature": 0, "max_tokens": options.max_tokens}
    return score_and_write(
        examples, predictions, out, labels=(info or {}).get("labels"), generative=generative,
        decoding=decoding if generative else None,
        info=dict(dataset=data.dataset, split=split, checkpoint=(info or {}).get("checkpoint"),
                  skipped_images=skipped, predict_seconds=round(seconds, 2),
                  questions_per_second=round(len(todo) / max(seconds, 1e-9), 1),
                  endpoint=client.url, endpoint_model=model, prompt_template=prompt_template,
                  system_prompt=system_prompt,
                  endpoint_requests={"asked": len(todo), "cached": cached, "retries": client.retries,
                                     "concurrency": options.concurrency, "timeout_s": options.timeout_s,
                                     "max_retries": options.max_retries}),
    )  # fmt: skip


def _ask_all(client: EndpointClient, examples: list, cache: AnswerCache, template: str, system: str | None,
             described: bool, progress: bool) -> None:
    """Ask ``examples`` ``concurrency`` at a time, caching each answer as it arrives; on the first failure, stop
    sending and raise (the answers so far stay cached)."""

    def ask(e):
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_data_url(e.image)}},
            {"type": "text", "text": template.format(question=e.question)}]})
        return answer_of(client.chat(messages), described)

    pending = iter(examples)
    bar = tqdm(total=len(examples), desc="asking", disable=not progress)
    failure = None
    with ThreadPoolExecutor(client.options.concurrency) as pool:
        running = {}

        def submit_next() -> None:
            e = next(pending, None)
            if e is not None:
                running[pool.submit(ask, e)] = e

        for _ in range(client.options.concurrency):  # a window: after a failure no new request goes out
            submit_next()
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                e = running.pop(future)
                try:
                    answer, top_k = future.result()
                except Exception as err:  # the requests in flight still finish, and their answers are kept
                    failure = failure or (e, err)
                    continue
                cache.add(e.question_id, answer, top_k)
                bar.update()
                if failure is None:
                    submit_next()
    bar.close()
    if failure is not None:
        e, err = failure
        raise EndpointError(f"question {e.question_id} ({e.image}): {err}; {len(cache)} answers are cached in "
                            f"{cache.path}: run the same command again to ask only the rest") from err
