"""Settings of the REST service and web UI: the model, micro-batching, and the limits that keep bad input out.

A plain dataclass (no FastAPI import), so ``vqakit serve --help`` lists every field with its documentation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vqakit.inference.predict import BACKENDS, QUANTIZATIONS

MIB = 1 << 20


@dataclass
class ServeConfig:
    """How ``vqakit serve`` / ``vqakit demo`` serve a checkpoint.

    Args:
        backend: ``auto``, ``torch`` or ``onnx`` (as for ``vqakit predict``).
        quantize: ``auto`` (default): INT8 on the CPU's ONNX Runtime backend where the checkpoint's INT8 check found
            it keeps accuracy, else float32; ``int8``: dynamic INT8 quantization of the Linear layers (CPU) always;
            ``null``: float32.
        threads: intra-op threads of the model (default: the runtime's).
        question_cache: keep the text tower's states of this many recent distinct questions, so a repeated
            question skips the text tower (0: off).
        max_batch_size: most questions answered in one forward pass; concurrent requests are grouped up to this.
        max_wait_ms: how long a batch waits for requests that are already being received (0: never wait).
        workers: batches run at once, each on its own thread (ONNX Runtime backend; the PyTorch and generative
            backends always run one).
        max_queue: most requests waiting for the model; more get 503 (the server is overloaded).
        image_root: ``image_path`` requests may read images inside this directory only (no ``..``, no symlink
            out of it). Unset (default): ``image_path`` is disabled.
        allowed_url_hosts: hosts ``image_url`` may fetch from (``example.com``, or ``.example.com`` for its
            subdomains too). Empty (default): ``image_url`` is disabled.
        allow_private_urls: let ``image_url`` reach private, loopback and link-local addresses.
        url_timeout_s: time limit of one ``image_url`` fetch, redirects included.
        max_url_redirects: redirects ``image_url`` follows, each to the same host only.
        max_upload_bytes: largest image file accepted (upload, base64, path or URL).
        max_pixels: largest image accepted, in pixels (decompression-bomb guard, checked before decoding).
        max_question_chars: longest question accepted.
        max_questions: most questions per request.
        max_top_k: largest ``top_k`` a request may ask for (and ``top_logprobs`` on ``/v1/chat/completions``).
        model_name: the model id of the OpenAI-compatible routes (``/v1/models``; requests must name it).
            Default: the checkpoint directory's name, or the run's for ``<run>/checkpoint``.
    """

    backend: str = "auto"
    quantize: str | None = "auto"
    threads: int | None = None
    question_cache: int = 4096
    max_batch_size: int = 32
    max_wait_ms: float = 2.0
    workers: int = 2
    max_queue: int = 256
    image_root: str | None = None
    allowed_url_hosts: list[str] = field(default_factory=list)
    allow_private_urls: bool = False
    url_timeout_s: float = 5.0
    max_url_redirects: int = 3
    max_upload_bytes: int = 10 * MIB
    max_pixels: int = 4096 * 4096
    max_question_chars: int = 512
    max_questions: int = 16
    max_top_k: int = 20
    model_name: str | None = None

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"--server.backend={self.backend!r} is not one of {BACKENDS}")
        if self.quantize not in QUANTIZATIONS:
            raise ValueError(f"--server.quantize={self.quantize!r} is not one of {QUANTIZATIONS}")
        positive = ("max_batch_size", "workers", "max_queue", "max_upload_bytes", "max_pixels", "max_question_chars",
                    "max_questions", "max_top_k", "url_timeout_s")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"--server.{name}={getattr(self, name)} must be positive")
        for name in ("max_wait_ms", "max_url_redirects", "question_cache"):
            if getattr(self, name) < 0:
                raise ValueError(f"--server.{name}={getattr(self, name)} must not be negative")
        if self.model_name is not None and not self.model_name.strip():
            raise ValueError("--server.model_name must not be empty (leave it unset for the checkpoint's name)")
        self.allowed_url_hosts = [h.strip().lower().rstrip(".") for h in self.allowed_url_hosts if h.strip()]

    @property
    def max_request_bytes(self) -> int:
        """Largest request body: an image of ``max_upload_bytes`` as base64 (4/3) plus room for the rest."""
        return -(-self.max_upload_bytes // 3) * 4 + 64 * 1024
