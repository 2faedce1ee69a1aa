"""The OpenAI-compatible routes: the official ``openai`` client against a real ``vqakit serve`` process (answers,
logprobs and streaming equal ``/predict``'s), a generative checkpoint, and OpenAI-shaped 4xx errors naming the
field for everything a one-image VQA model cannot honour."""

from __future__ import annotations

import base64
import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from vqakit.inference.predict import VQAPredictor  # noqa: E402
from vqakit.serve.app import VQAService, create_app  # noqa: E402
from vqakit.serve.config import ServeConfig  # noqa: E402
from vqakit.serve.openai_api import default_model_id  # noqa: E402

QUESTIONS = ["what is the color of the shape?", "is there a red circle?", "how many shapes?"]


def png(seed: int = 0, size=(48, 40)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def user(question: str, image: bytes, image_first: bool = True) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": data_url(image)}}, {"type": "text", "text": question}]
    return [{"role": "user", "content": parts if image_first else parts[::-1]}]


@pytest.fixture(scope="module")
def server(tiny_checkpoint, serve_process):
    """A real `vqakit serve` process over the tiny classifier checkpoint."""
    return serve_process(tiny_checkpoint, "--server.max_wait_ms", "0", "--server.model_name", "tiny-vqa")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


def predict(server, image: bytes, question: str, top_k: int = 5) -> dict:
    r = httpx.post(f"{server}/predict", json={"question": question, "image_base64": base64.b64encode(image).decode(),
                                              "top_k": top_k}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["predictions"][0]


def test_models(client, tiny_checkpoint):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny-vqa"] and models[0].owned_by == "vqakit"
    info = models[0].model_extra["vqakit"]
    assert info["labels"] == ["yes", "no", "red", "circle", "2"] and info["generative"] is False
    assert info["checkpoint"] == str(tiny_checkpoint) and info["model_type"] == "two_tower"
    assert client.models.retrieve("tiny-vqa").id == "tiny-vqa"
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("gpt-4o")
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_answers_and_logprobs_equal_predict(client, server, seed):
    image = png(seed)
    for i, question in enumerate(QUESTIONS):
        ref = predict(server, image, question, top_k=3)
        r = client.chat.completions.create(model="tiny-vqa", messages=user(question, image, image_first=i % 2 == 0),
                                           temperature=0, max_tokens=8, logprobs=True, top_logprobs=3)
        choice = r.choices[0]
        assert r.object == "chat.completion" and r.model == "tiny-vqa" and r.id.startswith("chatcmpl-")
        assert choice.message.role == "assistant" and choice.message.content == ref["answer"]
        assert choice.finish_reason == "stop"
        token = choice.logprobs.content[0]
        assert token.token == ref["answer"] and token.logprob == pytest.approx(math.log(ref["score"]), abs=1e-6)
        assert [t.token for t in token.top_logprobs] == [a["answer"] for a in ref["top_k"]]
        assert [math.exp(t.logprob) for t in token.top_logprobs] == pytest.approx([a["score"] for a in ref["top_k"]])
        assert bytes(token.bytes).decode() == ref["answer"]
    plain = client.chat.completions.create(model="tiny-vqa", messages=user(QUESTIONS[0], image))
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == predict(
        server, image, QUESTIONS[0])["answer"]


def test_streaming(client, server):
    image = png(3)
    ref = predict(server, image, QUESTIONS[1], top_k=2)
    stream = client.chat.completions.create(model="tiny-vqa", messages=user(QUESTIONS[1], image), stream=True,
                                            logprobs=True, top_logprobs=2)
    chunks = list(stream)
    assert [c.object for c in chunks] == ["chat.completion.chunk"] * 3 and len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref["answer"]
    assert [c.choices[0].finish_reason for c in chunks] == [None, None, "stop"]
    top = chunks[1].choices[0].logprobs.content[0].top_logprobs
    assert [t.token for t in top] == [a["answer"] for a in ref["top_k"]]
    # the wire format: SSE data lines ending in [DONE]
    with httpx.stream("POST", f"{server}/v1/chat/completions", timeout=60, json={
            "model": "tiny-vqa", "messages": user(QUESTIONS[1], image), "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]" and len(lines) == 4


def test_errors_through_the_client(client):
    image = png()
    cases = [
        (dict(messages=user("q?", image) * 2), openai.BadRequestError, "messages[1]", "second user turn"),
        (dict(messages=[*user("q?", image), {"role": "assistant", "content": "red"}]), openai.BadRequestError,
         "messages[1].role", "not a conversation"),
        (dict(messages=[{"role": "user", "content": [*user("q?", image)[0]["content"],
                                                     {"type": "image_url", "image_url": {"url": data_url(image)}}]}]),
         openai.BadRequestError, "messages[0].content[2]", "second image"),
        (dict(messages=user("q?", image), temperature=0.7), openai.BadRequestError, "temperature", "not supported"),
        (dict(messages=user("q?", image), n=2), openai.BadRequestError, "n", "not supported"),
        (dict(messages=user("q?", image), top_logprobs=2), openai.BadRequestError, "top_logprobs", "needs logprobs"),
        (dict(messages=[{"role": "user", "content": "what color?"}]), openai.BadRequestError, "messages[0].content",
         "text only"),
        (dict(messages=user("q" * 600, image)), openai.UnprocessableEntityError, "messages[0].content",
         "max_question_chars=512"),
        (dict(messages=user("q?", b"<html>")), openai.BadRequestError, "messages[0].content[0].image_url.url",
         "not a recognised image format"),
        (dict(messages=user("q?", image), tools=[{"type": "function", "function": {"name": "f"}}]),
         openai.UnprocessableEntityError, "tools", "Extra inputs are not permitted"),
    ]
    for kwargs, kind, param, message in cases:
        with pytest.raises(kind) as err:
            client.chat.completions.create(model="tiny-vqa", **kwargs)
        body = err.value.body
        assert body["param"] == param and message in body["message"], (kwargs.keys(), body)
        assert body["type"] == "invalid_request_error"


@pytest.fixture(scope="module")
def local(tiny_checkpoint):
    """An in-process app (same code) for the error shapes of limits configured low."""
    predictor = VQAPredictor.from_pretrained(tiny_checkpoint, device="cpu", backend="torch")
    service = VQAService(predictor, ServeConfig(max_upload_bytes=4096, max_pixels=64 * 64), checkpoint="x/checkpoint")
    with TestClient(create_app(service), raise_server_exceptions=False) as c:
        yield c


def openai_error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_limits_and_shapes(local):
    assert local.get("/v1/models").json()["data"][0]["id"] == "x"
    flat = io.BytesIO()
    Image.new("RGB", (100, 100), "red").save(flat, "PNG")  # a few hundred bytes, 10,000 pixels
    body = {"model": "x", "messages": user("q?", flat.getvalue())}
    assert "decompression-bomb" in openai_error(local.post("/v1/chat/completions", json=body), 413)["message"]
    big = {"model": "x", "messages": user("q?", b"\x89PNG" + bytes(8000))}
    error = openai_error(local.post("/v1/chat/completions", json=big), 413)
    assert error["param"] == "messages[0].content[0].image_url.url" and "max_upload_bytes" in error["message"]
    too_big_body = local.post("/v1/chat/completions", content=b"x" * 10**6,
                              headers={"content-type": "application/json"})
    assert "request body" in openai_error(too_big_body, 413)["message"]
    not_json = local.post("/v1/chat/completions", content=b"model=x", headers={"content-type": "text/plain"})
    assert openai_error(not_json, 415)["code"] == "unsupported_media_type"
    wrong_role = local.post("/v1/chat/completions", json={"model": "x", "messages": [{"role": "robot"}]})
    assert openai_error(wrong_role, 422)["param"] == "messages[0].role"
    metadata = {"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest"}}
    url = {"model": "x", "messages": [{"role": "user", "content": [metadata, {"type": "text", "text": "q"}]}]}
    error = openai_error(local.post("/v1/chat/completions", json=url), 403)
    assert "image_url is disabled" in error["message"] and error["type"] == "permission_error"
    file_url = {**url, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}, {"type": "text", "text": "q"}]}]}
    assert openai_error(local.post("/v1/chat/completions", json=file_url), 400)["code"] == "invalid_image_url"
    wrong_model = local.post("/v1/chat/completions", json={**body, "model": "gpt-4o"})
    assert openai_error(wrong_model, 404)["code"] == "model_not_found"
    # a system message (a harness's instruction) is accepted and does not change the answer
    image = png(size=(30, 30))
    plain = local.post("/v1/chat/completions", json={"model": "x", "messages": user("is there a red circle?", image)})
    system = local.post("/v1/chat/completions", json={"model": "x", "messages": [
        {"role": "system", "content": "Answer the question using a single word or phrase."},
        *user("is there a red circle?", image)]})
    assert plain.status_code == system.status_code == 200
    assert plain.json()["choices"][0]["message"] == system.json()["choices"][0]["message"]
    # /predict keeps its own error shape
    assert isinstance(local.post("/predict", json={"question": "q"}).json()["error"], str)


def test_default_model_id():
    assert default_model_id("runs/easy-vqa/checkpoint") == "easy-vqa"
    assert default_model_id("/models/my-vqa") == "my-vqa" and default_model_id(None) == "vqakit"


def test_generative_checkpoint(tiny_vision_tower, tiny_text_tower, tmp_path, serve_process):
    """A (random) GRU-decoder checkpoint behind a real server: the generated answer is the content, its
    sequence probability the one logprob."""
    from vqakit.models.gru_decoder import GRUDecoderConfig, GRUDecoderForQuestionAnswering, build_word_vocab
    from vqakit.towers.text import TextTowerConfig, load_tokenizer
    from vqakit.towers.vision import VisionTowerConfig

    torch.manual_seed(0)
    model = GRUDecoderForQuestionAnswering(GRUDecoderConfig(
        vision=VisionTowerConfig(tiny_vision_tower, image_size=32),
        text=TextTowerConfig(tiny_text_tower, max_length=16), hidden_size=32, num_heads=4, word_embed_dim=16,
        vocab=build_word_vocab(["red", "blue triangle", "yes", "no", "2"])))
    path = tmp_path / "gru" / "checkpoint"
    model.save_pretrained(path, tokenizer=load_tokenizer(tiny_text_tower))
    server = serve_process(path, "--server.max_wait_ms", "0")
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)
    card = client.models.list().data[0]
    assert card.id == "gru" and card.model_extra["vqakit"]["generative"] is True
    assert card.model_extra["vqakit"]["decoding"]
    image = png(5)
    for question in QUESTIONS:
        ref = predict(server, image, question)
        r = client.chat.completions.create(model="gru", messages=user(question, image), logprobs=True,
                                           top_logprobs=5)
        token = r.choices[0].logprobs.content[0]
        assert r.choices[0].message.content == ref["answer"] == token.token
        assert math.exp(token.logprob) == pytest.approx(ref["score"], rel=1e-6)
        assert [t.token for t in token.top_logprobs] == [ref["answer"]]  # generation gives one answer
        streamed = client.chat.completions.create(model="gru", messages=user(question, image), stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed) == ref["answer"]
