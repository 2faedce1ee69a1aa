"""The REST service over a generative (GRU-decoder) checkpoint: same routes, same batching, free-text answers
equal to ``GenerativePredictor.predict``, and a named 4xx error for a heatmap it cannot draw."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from vqakit.inference.generative import GenerativePredictor  # noqa: E402
from vqakit.models.gru_decoder import GRUDecoderConfig, GRUDecoderForQuestionAnswering, build_word_vocab  # noqa: E402
from vqakit.towers.processor import VQAProcessor  # noqa: E402
from vqakit.serve.app import create_app, load_service  # noqa: E402
from vqakit.serve.config import ServeConfig  # noqa: E402
from vqakit.towers.text import TextTowerConfig, load_tokenizer  # noqa: E402
from vqakit.towers.vision import VisionTowerConfig  # noqa: E402

QUESTIONS = ["what is the color of the shape?", "is there a red circle?", "how many shapes?"]
# image seed -> the answers the tiny model is trained to give to QUESTIONS about that image
TARGETS = {0: ["red", "yes", "2"], 1: ["blue triangle", "no", "red circle"]}


def png(seed: int, size=(40, 36)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def gru_checkpoint(tiny_vision_tower, tiny_text_tower, tmp_path_factory):
    """A tiny GRU-decoder checkpoint fitted to answer QUESTIONS differently about two images (so a mixed-up
    image or question in a batch shows up as a wrong answer)."""
    answers = [a for targets in TARGETS.values() for a in targets]
    torch.manual_seed(0)
    model = GRUDecoderForQuestionAnswering(GRUDecoderConfig(
        vision=VisionTowerConfig(tiny_vision_tower, image_size=32),
        text=TextTowerConfig(tiny_text_tower, max_length=16), hidden_size=32, num_heads=4, word_embed_dim=16,
        vocab=build_word_vocab(answers)))
    processor = VQAProcessor.from_config(model.config, tokenizer_dir=tiny_text_tower)
    batch = {"pixel_values": processor.images([png(seed) for seed in TARGETS for _ in QUESTIONS]),
             **processor.text(QUESTIONS * len(TARGETS))}
    model.eval()  # no dropout: fit a fixed batch
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(80):
        loss = model(answers=answers, **batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path_factory.mktemp("tiny-gru") / "checkpoint"
    model.save_pretrained(path, tokenizer=load_tokenizer(tiny_text_tower))
    return path


@pytest.fixture(scope="module")
def reference(gru_checkpoint):
    """``GenerativePredictor.predict`` on each image: what the service must answer."""
    predictor = GenerativePredictor.from_pretrained(gru_checkpoint, device="cpu")
    return {seed: predictor.predict(png(seed), QUESTIONS) for seed in TARGETS}


@pytest.fixture(scope="module")
def client(gru_checkpoint):
    service = load_service(str(gru_checkpoint), ServeConfig(max_wait_ms=20))  # backend auto, question cache on
    with TestClient(create_app(service), raise_server_exceptions=False) as c:
        yield c


def check(got: dict, ref) -> None:
    assert got["question"] == ref.question and got["answer"] == ref.answer
    assert got["score"] == pytest.approx(ref.score, abs=1e-4) and 0 < got["score"] <= 1
    assert got["top_k"] == [{"answer": got["answer"], "score": got["score"]}]  # one generated answer
    assert "heatmap" not in got


def test_reference_answers_are_the_trained_ones(reference):
    # the fixture's model really distinguishes images and questions, so the checks below can fail
    for seed, targets in TARGETS.items():
        assert [p.answer for p in reference[seed]] == targets


def test_predict_one_and_several_questions(client, reference):
    r = client.post("/predict", json={"question": QUESTIONS[0], "image_base64": base64.b64encode(png(0)).decode()})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["backend"] == "torch" and body["image"] == {"width": 40, "height": 36}
    assert len(body["predictions"]) == 1
    check(body["predictions"][0], reference[0][0])

    r = client.post("/predict", json={"questions": QUESTIONS, "image_base64": base64.b64encode(png(1)).decode(),
                                      "top_k": 3})
    assert r.status_code == 200, r.text
    for got, ref in zip(r.json()["predictions"], reference[1], strict=True):
        check(got, ref)


def test_upload(client, reference):
    r = client.post("/predict/upload", files={"file": ("img.png", png(1), "image/png")},
                    data={"question": QUESTIONS[:2]})
    assert r.status_code == 200, r.text
    for got, ref in zip(r.json()["predictions"], reference[1][:2], strict=True):
        check(got, ref)


def test_concurrent_requests_about_different_images_are_batched_and_answered_right(client, reference):
    def ask(i):
        seed = i % 2
        r = client.post("/predict", json={"questions": QUESTIONS[i % 3:], "image_base64": base64.b64encode(
            png(seed)).decode()})
        return seed, i % 3, r

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(ask, range(12)))
    for seed, start, r in results:
        assert r.status_code == 200, r.text
        for got, ref in zip(r.json()["predictions"], reference[seed][start:], strict=True):
            check(got, ref)
    batching = client.get("/health").json()["batching"]
    assert batching["questions"] >= 24 and batching["largest_batch"] >= 1


def test_heatmap_is_a_named_4xx_error(client):
    for r in (client.post("/predict", json={"question": QUESTIONS[0], "heatmap": True,
                                            "image_base64": base64.b64encode(png(0)).decode()}),
              client.post("/predict/upload", files={"file": ("img.png", png(0), "image/png")},
                          data={"question": QUESTIONS[0], "heatmap": "true"})):
        assert r.status_code == 422 and "heatmap" in r.json()["error"] and "generative" in r.json()["error"]
    # the service is still fine afterwards
    assert client.post("/predict", json={"question": QUESTIONS[0],
                                         "image_base64": base64.b64encode(png(0)).decode()}).status_code == 200


def test_health_and_bad_input(client):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["generative"] is True and health["answers"] is None
    r = client.post("/predict", json={"question": QUESTIONS[0], "image_base64": base64.b64encode(b"nope").decode()})
    assert r.status_code == 400 and "image" in r.json()["error"]


def test_predict_prepared_matches_predict_and_refuses_attention(gru_checkpoint, reference):
    predictor = GenerativePredictor.from_pretrained(gru_checkpoint, device="cpu")
    pixels = [predictor.prepare_image(png(seed)) for seed in TARGETS]
    out = predictor.predict_prepared(pixels, [QUESTIONS, QUESTIONS[1]])
    assert [p.answer for p in out[0]] == [p.answer for p in reference[0]]
    assert [p.answer for p in out[1]] == [reference[1][1].answer]
    assert out[1][0].score == pytest.approx(reference[1][1].score, abs=1e-4)
    assert predictor.predict_prepared([], []) == []
    with pytest.raises(ValueError, match="heatmap"):
        predictor.predict_prepared(pixels, [QUESTIONS, QUESTIONS], output_attentions=True)
    with pytest.raises(ValueError, match="2 images but 1 question lists"):
        predictor.predict_prepared(pixels, [QUESTIONS])


def test_ui_answers_without_heatmap(gru_checkpoint, reference):
    pytest.importorskip("gradio")
    import asyncio

    from vqakit.serve.app import VQAService
    from vqakit.serve.ui import build_ui

    service = VQAService(GenerativePredictor.from_pretrained(gru_checkpoint, device="cpu"), ServeConfig())
    try:
        ask = next(f.fn for f in build_ui(service).fns.values() if getattr(f.fn, "__name__", "") == "ask")
        answer, top5, overlay = asyncio.run(ask(Image.open(io.BytesIO(png(0))), QUESTIONS[0]))
        ref = reference[0][0]
        assert ref.answer in answer and top5 == {ref.answer: pytest.approx(ref.score, abs=1e-4)} and overlay is None
    finally:
        service.close()
