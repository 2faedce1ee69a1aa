"""Shared fixtures: tiny random-config towers saved as local HF directories. Nothing is downloaded."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

WORDS = (
    "what is the color of shape does image contain a an there not no present in which this circle rectangle "
    "triangle red green blue yellow black gray teal brown white how many ? , . yes"
).split()


@pytest.fixture(scope="session")
def tiny_text_tower(tmp_path_factory) -> str:
    """A 2-layer, 32-wide BERT with a word-level vocabulary, saved with its tokenizer."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    torch.manual_seed(0)  # the same weights whichever tests ran before (the global RNG is shared)
    path = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *dict.fromkeys(WORDS)]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(path / "vocab.txt")).save_pretrained(path)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=64)
    BertModel(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_vision_tower(tmp_path_factory) -> str:
    """A 2-layer, 32-wide ViT for 32px images with 8px patches (16 patch tokens)."""
    import torch
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(1)  # the same weights whichever tests ran before
    path = tmp_path_factory.mktemp("tiny-vit")
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=37)
    ViTModel(config, add_pooling_layer=False).save_pretrained(path)
    return str(path)


@pytest.fixture
def tiny_model_args(tiny_vision_tower, tiny_text_tower) -> list[str]:
    """CLI flags of a tiny model over the tiny towers (32px images, 1 fusion layer of width 32)."""
    return [
        "--model.vision.name", tiny_vision_tower, "--model.text.name", tiny_text_tower,
        "--model.vision.image_size", "32", "--model.hidden_size", "32", "--model.num_heads", "4",
        "--model.num_fusion_layers", "1",
    ]  # fmt: skip


@pytest.fixture
def tiny_config(tiny_vision_tower, tiny_text_tower):
    """A factory of tiny ``TwoTowerConfig``s (5 answers) over the tiny towers; ``vision`` / ``text``: a dict of the
    tower options to change (``vision={"grid_stride": 16}``)."""
    from vqakit.models.two_tower import TwoTowerConfig
    from vqakit.towers.text import TextTowerConfig
    from vqakit.towers.vision import VisionTowerConfig

    def make(vision: dict | None = None, text: dict | None = None, **overrides):
        kwargs = dict(vision=VisionTowerConfig(**{"name": tiny_vision_tower, "image_size": 32, **(vision or {})}),
                      text=TextTowerConfig(**{"name": tiny_text_tower, "max_length": 16, **(text or {})}),
                      hidden_size=32, num_heads=4, num_fusion_layers=2,
                      id2label={i: a for i, a in enumerate(["yes", "no", "red", "circle", "2"])})
        kwargs.update(overrides)
        return TwoTowerConfig(**kwargs)

    return make


@pytest.fixture
def tiny_batch():
    """Raw inputs for a tiny model: 3 random 32px images and 3 questions."""
    import torch

    def make(tokenizer, batch: int = 3, size: int = 32):
        g = torch.Generator().manual_seed(0)
        questions = ["what is the color of the shape?", "is there a red circle?", "how many shapes?"][:batch]
        enc = tokenizer(questions, padding=True, return_tensors="pt")
        return {"pixel_values": torch.randn(batch, 3, size, size, generator=g),
                "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_vision_tower, tiny_text_tower, tmp_path_factory):
    """A saved tiny checkpoint directory (random weights, 5 answers, 2 co-attention layers): shared, read-only."""
    import torch

    from vqakit.models.two_tower import TwoTowerConfig, TwoTowerForQuestionAnswering
    from vqakit.towers.text import TextTowerConfig, load_tokenizer
    from vqakit.towers.vision import VisionTowerConfig

    torch.manual_seed(0)
    config = TwoTowerConfig(VisionTowerConfig(tiny_vision_tower, image_size=32),
                            TextTowerConfig(tiny_text_tower, max_length=16), hidden_size=32, num_heads=4,
                            num_fusion_layers=2,
                            id2label={i: a for i, a in enumerate(["yes", "no", "red", "circle", "2"])})
    path = tmp_path_factory.mktemp("tiny-checkpoint") / "checkpoint"
    TwoTowerForQuestionAnswering(config).save_pretrained(path, tokenizer=load_tokenizer(tiny_text_tower))
    return path


@pytest.fixture(scope="session")
def serve_process(tmp_path_factory):
    """A factory: ``serve_process(checkpoint, *flags)`` starts a real ``vqakit serve`` process on a free loopback
    port, waits for ``/health`` and returns its base URL; every process is stopped at the end of the session."""
    import socket
    import subprocess
    import sys
    import time

    import httpx

    servers = []

    def start(checkpoint, *flags: str) -> str:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        log_path = tmp_path_factory.mktemp("serve-log") / "server.log"
        log = open(log_path, "w")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        proc = subprocess.Popen([sys.executable, "-m", "vqakit.cli", "serve", "--checkpoint", str(checkpoint),
                                 "--port", str(port), "--ui", "false", "--server.backend", "torch", *flags],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
        servers.append((proc, log))
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300  # the 2 shared cores can be busy
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                httpx.get(f"{url}/health", timeout=2).raise_for_status()
                return url
            except httpx.HTTPError:
                assert time.monotonic() < deadline, f"vqakit serve did not start: {log_path.read_text()}"
                time.sleep(0.3)

    yield start
    for proc, log in servers:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
