"""`vqakit evaluate --endpoint`: the same metrics as `--checkpoint` for the checkpoint behind `vqakit serve`, a
resumable answer cache (a failed or SIGKILLed run asks only the rest), retries with backoff, timeouts, and free-text
scoring of a server that does not describe itself."""

from __future__ import annotations

import asyncio
import csv
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from vqakit.cli import main  # noqa: E402
from vqakit.data.config import DataConfig  # noqa: E402
from vqakit.eval.endpoint import (  # noqa: E402
    AnswerCache,
    EndpointError,
    EndpointOptions,
    answer_of,
    base_url,
    check_template,
    evaluate_endpoint,
)
from vqakit.inference.predict import VQAPredictor  # noqa: E402
from vqakit.serve.app import VQAService, create_app  # noqa: E402
from vqakit.serve.config import ServeConfig  # noqa: E402

LIMIT = "30"  # questions of easy-VQA's test split (whole images, seeded)
# what may differ between a checkpoint's and its endpoint's metrics.json: time, and where the answers came from
RUN_FIELDS = {"predict_seconds", "questions_per_second", "checkpoint", "endpoint", "endpoint_model",
              "prompt_template", "system_prompt", "endpoint_requests", "out_dir", "results_file", "resumed_questions"}


def same_metrics(a: dict, b: dict) -> None:
    a, b = ({k: v for k, v in m.items() if k not in RUN_FIELDS} for m in (a, b))
    assert a == b


def test_endpoint_gives_the_checkpoint_metrics(tiny_checkpoint, serve_process, tmp_path, capsys):
    """The tiny checkpoint evaluated locally and behind a real `vqakit serve`: identical metrics and predictions."""
    url = serve_process(tiny_checkpoint, "--server.max_wait_ms", "2", "--server.model_name", "tiny")
    common = ["--data.limit", LIMIT, "--data.cache_dir", str(tmp_path / "cache")]
    main(["evaluate", "--checkpoint", str(tiny_checkpoint), "--out_dir", str(tmp_path / "local"), *common])
    main(["evaluate", "--endpoint", url, "--endpoint_model", "tiny", "--out_dir", str(tmp_path / "remote"),
          "--endpoint_options.concurrency", "4", *common])
    local, remote = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("local", "remote"))
    assert local["num_questions"] == remote["num_questions"] >= 20
    same_metrics(local, remote)
    local_rows, remote_rows = (list(csv.DictReader((tmp_path / name / "predictions.csv").open()))
                               for name in ("local", "remote"))
    assert len(local_rows) == len(remote_rows) == local["num_questions"]
    # the same answers in the same order; the scores to 4 decimals +- 1 (the feature cache and the server's
    # one-image batches differ by ~1e-7)
    for a, b in zip(local_rows, remote_rows):
        top_a, top_b = ([x.rsplit(":", 1) for x in r.pop("top5").split("|")] for r in (a, b))
        assert [t[0] for t in top_a] == [t[0] for t in top_b]
        assert [float(t[1]) for t in top_a] == pytest.approx([float(t[1]) for t in top_b], abs=2e-4)
        assert float(a.pop("score")) == pytest.approx(float(b.pop("score")), abs=2e-4) and a == b
    written = remote
    assert written["endpoint"] == f"{url}/v1" and written["endpoint_model"] == "tiny"
    assert written["prompt_template"] == "{question}" and written["checkpoint"] == str(tiny_checkpoint)
    assert written["endpoint_requests"]["asked"] == remote["num_questions"]
    assert "VQA accuracy (official)" in capsys.readouterr().out
    # run again: every answer comes from the cache, nothing is asked
    main(["evaluate", "--endpoint", url, "--endpoint_model", "tiny", "--out_dir", str(tmp_path / "remote"), *common])
    again = json.loads((tmp_path / "remote" / "metrics.json").read_text())
    assert again["endpoint_requests"]["asked"] == 0 and again["endpoint_requests"]["cached"] == remote["num_questions"]
    same_metrics(again, local)


# -- an in-process server whose faults the test controls -------------------------------------------------------------


class Faults:
    """ASGI wrapper: counts chat requests, records their bodies, and fails, throttles or stalls some of them."""

    def __init__(self, app, fail_after: int | None = None, throttle: set[int] = frozenset(),
                 stall: set[int] = frozenset(), stall_s: float = 2.0, foreign: bool = False):
        self.app, self.fail_after, self.throttle, self.stall, self.stall_s = app, fail_after, throttle, stall, stall_s
        self.foreign = foreign
        self.count, self.bodies = 0, []

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/v1/models" and self.foreign:
            return await self._json(send, 200, {"object": "list", "data": [{"id": "tiny", "object": "model"}]})
        if scope["type"] != "http" or scope["path"] != "/v1/chat/completions":
            return await self.app(scope, receive, send)
        self.count += 1
        n = self.count
        if self.fail_after is not None and n > self.fail_after:
            return await self._json(send, 503, {"error": {"message": "down for maintenance"}})
        if n in self.throttle:
            return await self._json(send, 429, {"error": {"message": "slow down"}}, [(b"retry-after", b"0.05")])
        if n in self.stall:
            await asyncio.sleep(self.stall_s)
        chunks = []

        async def recording():
            message = await receive()
            chunks.append(message.get("body", b""))
            return message

        await self.app(scope, recording, send)
        if b"".join(chunks):  # not a request whose client gave up during the stall
            self.bodies.append(json.loads(b"".join(chunks)))

    @staticmethod
    async def _json(send, status, body, headers=()):
        data = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), *headers]})
        await send({"type": "http.response.body", "body": data})


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint):
    return VQAPredictor.from_pretrained(tiny_checkpoint, device="cpu", backend="torch")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(predictor, checkpoint, serve: dict | None = None, port: int | None = None, **faults):
    """A uvicorn server in a thread on ``port`` (default: a free loopback port); yields (base URL, the Faults
    wrapper)."""
    config = ServeConfig(max_wait_ms=0, model_name="tiny", **(serve or {}))
    service = VQAService(predictor, config, checkpoint=str(checkpoint))
    app = Faults(create_app(service), **faults)
    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/v1", app
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def data(tmp_path):
    return DataConfig(limit=int(LIMIT), cache_dir=str(tmp_path / "cache"))


def test_a_failed_run_resumes_without_asking_again(predictor, tiny_checkpoint, data, tmp_path):
    out = tmp_path / "eval"
    options = EndpointOptions(concurrency=3, max_retries=1, backoff_s=0)
    port = free_port()  # the same endpoint URL again after the "restart": the cache is keyed by it
    with serving(predictor, tiny_checkpoint, port=port, fail_after=7) as (url, app):
        with pytest.raises(EndpointError, match="7 answers are cached") as err:
            evaluate_endpoint(url, "tiny", data, out_dir=out, options=options, progress=False)
        assert "down for maintenance" in str(err.value) and "failed 2 times" in str(err.value)
    lines = (out / "answers.jsonl").read_text().splitlines()
    assert len(lines) == 7 and all(json.loads(line)["model"] == "tiny" for line in lines)
    with (out / "answers.jsonl").open("a") as f:
        f.write('{"key": "cut short by a kill')  # a half-written last line
    with serving(predictor, tiny_checkpoint, port=port) as (url, app):
        resumed = evaluate_endpoint(url, "tiny", data, out_dir=out, options=options, progress=False)
        asked = {body["messages"][0]["content"][1]["text"] for body in app.bodies}
        total = resumed["num_questions"]
        assert app.count == total - 7 and resumed["endpoint_requests"] == {
            "asked": total - 7, "cached": 7, "retries": 0, "concurrency": 3, "timeout_s": 60.0, "max_retries": 1}
        fresh = evaluate_endpoint(url, "tiny", data, out_dir=tmp_path / "fresh", options=options, progress=False)
    assert len(asked) >= 1 and app.count == 2 * total - 7
    same_metrics(resumed, fresh)
    assert resumed["vqa_accuracy"] == fresh["vqa_accuracy"]
    # another prompt template is another cache key: everything is asked again
    with serving(predictor, tiny_checkpoint, port=port) as (url, app):
        other = evaluate_endpoint(url, "tiny", data, out_dir=out, prompt_template="Q: {question}", options=options,
                                  system_prompt="Answer in one word.", progress=False)
        assert app.count == total and other["prompt_template"] == "Q: {question}"
        body = app.bodies[0]
        assert body["messages"][0] == {"role": "system", "content": "Answer in one word."}
        assert body["messages"][1]["content"][1]["text"].startswith("Q: ")
        assert body["messages"][1]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
        assert body["temperature"] == 0 and body["logprobs"] is True and body["top_logprobs"] == 5


def test_a_killed_run_resumes_and_scores_the_same(predictor, tiny_checkpoint, data, tmp_path):
    """``vqakit evaluate --endpoint`` SIGKILLed part way (a process, not an exception): the rerun asks only the
    questions without a cached answer and writes the metrics and predictions of an uninterrupted run."""
    killed, port = tmp_path / "killed", free_port()  # the same URL after the "restart": the cache is keyed by it
    url = f"http://127.0.0.1:{port}/v1"
    cmd = [sys.executable, "-m", "vqakit.cli", "evaluate", "--endpoint", url, "--endpoint_model", "tiny",
           "--out_dir", str(killed), "--data.limit", LIMIT, "--data.cache_dir", data.cache_dir,
           "--endpoint_options.concurrency", "1"]
    answers = killed / "answers.jsonl"
    # every answer after the 10th takes 0.5 s: the kill lands while the run is asking
    with serving(predictor, tiny_checkpoint, port=port, stall=set(range(11, 1000)), stall_s=0.5):
        with open(tmp_path / "child.log", "wb") as log:
            proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=log, stderr=log)
            deadline = time.time() + 600  # a busy machine: the child may need minutes to import
            while proc.poll() is None and time.time() < deadline:
                if answers.is_file() and answers.read_bytes().count(b"\n") >= 10:
                    break
                time.sleep(0.002)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    child_log = (tmp_path / "child.log").read_text()[-2000:]
    assert proc.returncode == -signal.SIGKILL, f"the evaluation ended before it could be killed: {child_log}"
    assert not (killed / "metrics.json").exists()
    cached = answers.read_bytes().count(b"\n")
    with serving(predictor, tiny_checkpoint, port=port) as (url, app):
        resumed = evaluate_endpoint(url, "tiny", data, out_dir=killed, progress=False)
        total = resumed["num_questions"]
        assert 10 <= cached < total and app.count == total - cached
        assert resumed["endpoint_requests"]["cached"] == cached and resumed["endpoint_requests"]["asked"] == app.count
        fresh = evaluate_endpoint(url, "tiny", data, out_dir=tmp_path / "fresh", progress=False)
    same_metrics(resumed, fresh)
    assert (killed / "predictions.csv").read_text() == (tmp_path / "fresh" / "predictions.csv").read_text()


def test_retries_back_off_and_time_out(predictor, tiny_checkpoint, data, tmp_path):
    waits = []
    options = EndpointOptions(concurrency=2, max_retries=3, backoff_s=0.01, timeout_s=0.5)
    with serving(predictor, tiny_checkpoint, throttle={1, 2, 5}, stall={3}) as (url, app):
        metrics = evaluate_endpoint(url, "tiny", data, out_dir=tmp_path / "a", options=options, progress=False,
                                    sleep=waits.append)
        reference = evaluate_endpoint(url, "tiny", data, out_dir=tmp_path / "b", progress=False)
    assert metrics["endpoint_requests"]["retries"] == len(waits) == 4  # three 429s and one timeout
    assert sum(w >= 0.05 for w in waits) >= 3  # Retry-After: 0.05 is honoured
    assert all(w <= options.max_backoff_s for w in waits)
    same_metrics(metrics, reference)
    one_at_a_time = EndpointOptions(concurrency=1, max_retries=3, backoff_s=0.01)
    with serving(predictor, tiny_checkpoint, fail_after=0) as (url, app):
        with pytest.raises(EndpointError, match=r"failed 4 times; the last: HTTP 503: down for maintenance"):
            evaluate_endpoint(url, "tiny", data, out_dir=tmp_path / "c", options=one_at_a_time, progress=False,
                              sleep=waits.append)
    for k, w in enumerate(waits[-3:]):  # exponential backoff, jittered in [1/2, 1] of 0.01 * 2**k
        assert 0.005 * 2**k <= w <= 0.01 * 2**k


def test_refusals_are_not_retried(predictor, tiny_checkpoint, data, tmp_path):
    with serving(predictor, tiny_checkpoint, serve={"max_top_k": 3}) as (url, app):
        with pytest.raises(ValueError, match=r"--endpoint_model='gpt-4o' is not served by .*\['tiny'\]"):
            evaluate_endpoint(url, "gpt-4o", data, out_dir=tmp_path / "a", progress=False)
        options = EndpointOptions(top_logprobs=5, max_retries=5)  # more than the server's max_top_k
        with pytest.raises(EndpointError, match="was refused .*HTTP 400: top_logprobs=5 is more than"):
            evaluate_endpoint(url, "tiny", data, out_dir=tmp_path / "b", options=options, progress=False)
        assert app.count <= options.concurrency  # the first refusal stopped the run, nothing was retried


def test_a_server_that_does_not_describe_itself_is_scored_as_free_text(predictor, tiny_checkpoint, data, tmp_path):
    with serving(predictor, tiny_checkpoint, foreign=True) as (url, app):
        metrics = evaluate_endpoint(url, "tiny", data, out_dir=tmp_path / "a", progress=False)
    assert metrics["checkpoint"] is None and "generative" in metrics
    assert metrics["decoding"] == {"temperature": 0, "max_tokens": 16}
    rows = [json.loads(line) for line in (tmp_path / "a" / "answers.jsonl").read_text().splitlines()]
    assert all(len(r["top_k"]) == 1 and 0 < r["top_k"][0][1] <= 1 for r in rows)  # exp(sum of token logprobs)


def test_helpers(tmp_path):
    assert base_url("http://h:8000") == base_url("http://h:8000/v1/") == "http://h:8000/v1"
    assert base_url("https://h/api/v1") == "https://h/api/v1"
    with pytest.raises(ValueError, match="must be an http"):
        base_url("h:8000")
    assert check_template("Q: {question} {{json}}")
    for bad in ("no field", "{question} {answer}", "{0}", "{question"):
        with pytest.raises(ValueError, match="--prompt_template"):
            check_template(bad)
    with pytest.raises(ValueError, match="--endpoint_options.concurrency=0 must be positive"):
        EndpointOptions(concurrency=0)
    tokens = [{"token": "red", "logprob": math.log(0.5), "top_logprobs": []},
              {"token": " ball", "logprob": math.log(0.5), "top_logprobs": []}]
    response = {"choices": [{"message": {"content": "red ball"}, "logprobs": {"content": tokens}}]}
    assert answer_of(response, described=False) == ("red ball", [("red ball", pytest.approx(0.25))])
    plain = {"choices": [{"message": {"content": "2"}}]}
    assert answer_of(plain, described=False)[0] == "2" and math.isnan(answer_of(plain, False)[1][0][1])
    with pytest.raises(EndpointError, match="without choices"):
        answer_of({"error": "x"}, described=True)
    cache = AnswerCache(tmp_path / "answers.jsonl", {"model": "a"})
    cache.add(1, "yes", [("yes", 0.9)])
    cache.close()
    assert 1 in AnswerCache(tmp_path / "answers.jsonl", {"model": "a"})
    assert 1 not in AnswerCache(tmp_path / "answers.jsonl", {"model": "b"})


def test_cli_arguments(capsys):
    for argv, message in ((["evaluate"], "exactly one of --checkpoint DIR or --endpoint URL"),
                          (["evaluate", "--endpoint", "http://127.0.0.1:1/v1"], "needs --endpoint_model")):
        with pytest.raises(SystemExit):
            main(argv)
        assert message in capsys.readouterr().err


def test_a_generative_checkpoint_through_the_endpoint(tiny_vision_tower, tiny_text_tower, data, tmp_path):
    """A (random) GRU-decoder checkpoint: free-text answers normalised and scored as `evaluate --checkpoint` does,
    with the generative metrics and the checkpoint's decoding settings."""
    import torch

    from vqakit.eval.evaluate import evaluate_checkpoint
    from vqakit.inference.generative import GenerativePredictor
    from vqakit.models.gru_decoder import GRUDecoderConfig, GRUDecoderForQuestionAnswering, build_word_vocab
    from vqakit.towers.text import TextTowerConfig, load_tokenizer
    from vqakit.towers.vision import VisionTowerConfig

    torch.manual_seed(0)
    model = GRUDecoderForQuestionAnswering(GRUDecoderConfig(
        vision=VisionTowerConfig(tiny_vision_tower, image_size=32),
        text=TextTowerConfig(tiny_text_tower, max_length=16), hidden_size=32, num_heads=4, word_embed_dim=16,
        vocab=build_word_vocab(["red", "blue", "circle", "triangle", "yes", "no", "2"])))
    checkpoint = tmp_path / "gru" / "checkpoint"
    model.save_pretrained(checkpoint, tokenizer=load_tokenizer(tiny_text_tower))
    local = evaluate_checkpoint(checkpoint, data, out_dir=tmp_path / "local", progress=False)
    predictor = GenerativePredictor.from_pretrained(checkpoint, device="cpu")
    with serving(predictor, checkpoint) as (url, app):
        remote = evaluate_endpoint(url, "tiny", data, out_dir=tmp_path / "remote", progress=False)
    assert "generative" in remote and remote["decoding"] == local["decoding"]
    same_metrics(local, remote)
