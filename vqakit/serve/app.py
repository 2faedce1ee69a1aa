"""The REST service: FastAPI routes over one ``VQAPredictor``, micro-batched, with every input checked.

    POST /predict          JSON: ``question`` or ``questions``, exactly one of ``image_base64`` / ``image_path`` /
                           ``image_url``, optional ``top_k`` and ``heatmap``
    POST /predict/upload   multipart: ``file``, one or more ``question`` fields, ``top_k``, ``heatmap``
    GET  /health           model, backend, batching statistics
    POST /v1/chat/completions  OpenAI-compatible chat completions (``vqakit.serve.openai_api``), same batcher
    GET  /v1/models            the model id those requests name
    GET  /docs             OpenAPI documentation (``/openapi.json``)
    GET  /ui               the Gradio web UI (``ui=True``)

A bad request gets a 4xx JSON body ``{"error": "<what is wrong, naming the field>", ...}``: 400 unreadable
input, 403 a source the server does not allow, 404 no such file, 408 a URL too slow, 413 too large,
422 an invalid field. Under ``/v1/`` errors take OpenAI's shape ``{"error": {"message", "type", "param",
"code"}}`` (415 for a body that is not JSON). Only an unexpected failure of the model itself is a 500, and the
worker survives it.
"""

import asyncio
import base64
import io
import logging
import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, File, Form, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from vqakit.data.images import ImageLoadError, load_image
from vqakit.serve.batching import MicroBatcher, QueueFull
from vqakit.serve.config import ServeConfig
from vqakit.serve.openai_api import (
    OpenAIError,
    add_openai_routes,
    default_model_id,
    is_openai_path,
    openai_error_body,
    param_of,
)
from vqakit.serve.sources import RequestError, decode_base64, fetch_image_url, read_image_path

logger = logging.getLogger("vqakit")

# image files up to this size are decoded on the event loop; larger ones (slower to decode) in a worker thread
INLINE_DECODE_BYTES = 64 * 1024


# -- the service: predictor + batcher + limits, shared by the REST routes and the web UI ---------------------------


class VQAService:
    """Checks, decodes and batches requests for one predictor. ``answer`` is what every route calls."""

    def __init__(self, predictor, config: ServeConfig | None = None, checkpoint: str | None = None):
        self.predictor = predictor
        self.config = config or ServeConfig()
        self.checkpoint = checkpoint
        # concurrent batches only where the runtime allows concurrent calls (ONNX Runtime sessions)
        workers = self.config.workers if getattr(predictor, "backend", None) == "onnx" else 1
        self.batcher = MicroBatcher(predictor.predict_prepared, self.config.max_batch_size, self.config.max_wait_ms,
                                    self.config.max_queue, workers=workers)
        self.started = time.time()
        # attention heatmaps come from the classifier's fusion layers; generative checkpoints have none
        self.heatmaps = not getattr(predictor, "generative", False)

    def check_questions(self, questions: list[Any]) -> list[str]:
        """The questions, stripped; ``RequestError`` 422 naming the first bad one."""
        cfg = self.config
        if not questions:
            raise RequestError(422, "no question given: send `question` or `questions`")
        if len(questions) > cfg.max_questions:
            raise RequestError(422, f"{len(questions)} questions, more than max_questions={cfg.max_questions}")
        out = []
        for i, q in enumerate(questions):
            if not isinstance(q, str) or not q.strip():
                raise RequestError(422, f"question {i} is empty")
            if len(q) > cfg.max_question_chars:
                raise RequestError(422, f"question {i} has {len(q)} characters, more than "
                                        f"max_question_chars={cfg.max_question_chars}")
            try:
                q.encode("utf-8")
            except UnicodeEncodeError as err:
                raise RequestError(422, f"question {i} is not valid Unicode text ({err.reason})") from err
            out.append(q.strip())
        return out

    def prepare(self, source, keep_image: bool = False):
        """Decode and preprocess one image under ``max_pixels``; (pixels, image if ``keep_image``, (w, h))."""
        try:
            image = load_image(source, max_pixels=self.config.max_pixels)
        except ImageLoadError as err:
            status = 413 if "decompression-bomb" in err.reason else 400
            raise RequestError(status, f"image: {err.reason}") from err
        return self.predictor.prepare_image(image), (image if keep_image else None), image.size

    async def run(self, source, questions: list[str], top_k: int = 5, heatmap: bool = False):
        """Predictions for ``questions`` about one image (bytes or PIL image), batched with concurrent requests;
        returns (predictions, the decoded image if ``heatmap`` else None, (width, height))."""
        if heatmap and not self.heatmaps:
            raise RequestError(422, "heatmap: this is a generative checkpoint (free-text answers), which has no "
                                    "attention heatmaps; send heatmap=false")
        with self.batcher.expect() as ticket:
            if isinstance(source, bytes) and len(source) <= INLINE_DECODE_BYTES:
                pixels, image, size = self.prepare(source, heatmap)  # ~0.5 ms: cheaper than a thread hop
            else:
                pixels, image, size = await run_in_threadpool(self.prepare, source, heatmap)
            try:
                future = self.batcher.submit(pixels, questions, top_k, heatmap, ticket=ticket)
            except QueueFull as err:
                raise RequestError(503, f"server busy: {err}") from err
        return await asyncio.wrap_future(future), image, size

    async def answer(self, source, questions: list[str], top_k: int = 5, heatmap: bool = False) -> dict:
        """``run``, as the JSON body of ``PredictResponse``."""
        start = time.perf_counter()
        predictions, image, size = await self.run(source, questions, top_k, heatmap)
        results = []
        for p in predictions:
            item = {"question": p.question, "answer": p.answer, "score": p.score,
                    "top_k": [{"answer": a, "score": s} for a, s in p.top_k]}
            if heatmap and p.attention is not None:
                item["heatmap"] = await run_in_threadpool(_heatmap, image, p.attention)
            results.append(item)
        return {"predictions": results, "image": {"width": size[0], "height": size[1]},
                "backend": self.predictor.backend, "time_ms": round(1000 * (time.perf_counter() - start), 2)}

    def health(self) -> dict:
        cfg = self.config
        stats = dict(self.batcher.stats)
        stats["mean_batch"] = round(stats["questions"] / stats["batches"], 2) if stats["batches"] else 0.0
        return {
            "status": "ok", "checkpoint": self.checkpoint, "backend": self.predictor.backend,
            "quantize": getattr(self.predictor, "quantize", None), "generative": not self.heatmaps,
            "answers": len(self.predictor.labels) if self.predictor.labels is not None else None,
            "uptime_s": round(time.time() - self.started, 1),
            "batching": {"max_batch_size": cfg.max_batch_size, "max_wait_ms": cfg.max_wait_ms,
                         "workers": self.batcher.workers, **stats},
            "question_cache": _cache_stats(getattr(self.predictor, "question_cache", None)),
            "sources": {"image_base64": True, "image_path": cfg.image_root is not None,
                        "image_url": bool(cfg.allowed_url_hosts)},
        }

    def close(self) -> None:
        self.batcher.close()


def _cache_stats(cache) -> dict | None:
    if cache is None:
        return None
    return {"size": cache.size, "questions": len(cache), "hits": cache.hits, "misses": cache.misses}


def _heatmap(image, attention) -> dict:
    from vqakit.inference.visualize import heatmap_overlay

    buf = io.BytesIO()
    heatmap_overlay(image, attention).save(buf, "PNG")
    return {"grid": attention.round(5).tolist(), "png_base64": base64.b64encode(buf.getvalue()).decode()}


# -- schemas ---------------------------------------------------------------------------------------------------------


class AnswerScore(BaseModel):
    answer: str
    score: float


class Heatmap(BaseModel):
    grid: list[list[float]] = Field(description="question->image attention over the vision tower's grid (h, w)")
    png_base64: str = Field(description="the image with the attention heatmap blended over it, PNG, base64")


class QuestionResult(BaseModel):
    question: str
    answer: str
    score: float
    top_k: list[AnswerScore]
    heatmap: Heatmap | None = None


class ImageSize(BaseModel):
    width: int
    height: int


class PredictResponse(BaseModel):
    predictions: list[QuestionResult]
    image: ImageSize
    backend: str
    time_ms: float


class ErrorResponse(BaseModel):
    error: str = Field(description="what is wrong, naming the field")
    detail: list[dict] | None = None


ERRORS = {code: {"model": ErrorResponse, "description": text} for code, text in {
    400: "unreadable input (bad base64, not an image, URL failed)",
    403: "a source this server does not allow (path outside the root, host not allowed, private address)",
    404: "image_path: no such file under the image root",
    408: "image_url: too slow",
    413: "too large (bytes or pixels)",
    422: "an invalid field",
    503: "server busy",
}.items()}


def predict_request_model(cfg: ServeConfig) -> type[BaseModel]:
    """The ``POST /predict`` body, with this server's limits in its JSON schema."""
    question = Annotated[str, Field(min_length=1, max_length=cfg.max_question_chars)]
    sources = ("image_base64", "image_path", "image_url")

    def one_image_one_question_field(self):
        given = [name for name in sources if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(sources)}; got {len(given)}"
                             + (f" ({', '.join(given)})" if given else ""))
        if (self.question is None) == (self.questions is None):
            raise ValueError("give exactly one of question, questions")
        return self

    return create_model(
        "PredictRequest",
        __config__=ConfigDict(extra="forbid", json_schema_extra={"examples": [
            {"question": "what shape is in the image?", "image_base64": "<base64 of a PNG or JPEG file>"},
            {"questions": ["what color is the shape?", "is there a circle?"], "image_path": "test/images/0.png",
             "top_k": 3, "heatmap": True},
        ]}),
        __validators__={"one_image_one_question_field": model_validator(mode="after")(one_image_one_question_field)},
        question=(question | None, Field(None, description="one question")),
        questions=(list[question] | None,
                   Field(None, min_length=1, max_length=cfg.max_questions, description="several questions")),
        image_base64=(str | None, Field(None, max_length=cfg.max_request_bytes,
                                        description="the image file (PNG, JPEG, ...), base64")),
        image_path=(str | None, Field(None, max_length=4096,
                                      description="a file under the server's image root (disabled by default)")),
        image_url=(str | None, Field(None, max_length=2048,
                                     description="an http(s) URL on an allowed host (disabled by default)")),
        top_k=(int, Field(5, ge=1, le=cfg.max_top_k, description="answers returned per question")),
        heatmap=(bool, Field(False, description="return the question->image attention heatmap")),
    )


# -- request body size -----------------------------------------------------------------------------------------------


class BodySizeLimit:
    """ASGI middleware: a request body over ``max_bytes`` is refused with 413 before it is parsed or spooled,
    by its ``Content-Length`` or, for a chunked body, as soon as the bytes read pass the limit."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        openai = is_openai_path(scope.get("path", ""))
        if declared is not None:
            if not declared.isdigit():
                shown = declared[:40].decode(errors="replace")
                return await _send_error(send, 400, openai, f"Content-Length {shown!r} is not a number")
            if int(declared) > self.max_bytes:
                return await _send_error(send, 413, openai, f"request body of {int(declared):,} bytes is more "
                                         f"than {self.max_bytes:,} (max_upload_bytes plus room for the fields)")
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:  # FastAPI re-raises HTTPExceptions from reading the body
                    raise StarletteHTTPException(413, f"request body is more than {self.max_bytes:,} bytes")
            return message

        return await self.app(scope, limited_receive, send)


async def _send_error(send, status: int, openai: bool, message: str) -> None:
    response = JSONResponse(openai_error_body(status, message) if openai else {"error": message}, status_code=status)
    await send({"type": "http.response.start", "status": status, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


# -- the application -------------------------------------------------------------------------------------------------


def create_app(service: VQAService, ui: bool = False, ui_examples: list | None = None) -> FastAPI:
    """The FastAPI app over ``service``; ``ui`` mounts the Gradio page at ``/ui``."""
    from contextlib import asynccontextmanager

    cfg = service.config

    @asynccontextmanager
    async def lifespan(app):
        yield
        service.close()

    app = FastAPI(title="vqakit", version="0.1.0", lifespan=lifespan,
                  description="Visual question answering: send an image and questions, get answers with scores, "
                              "top-k and optional attention heatmaps. Errors are JSON `{\"error\": ...}` with a 4xx "
                              "status that names the problem.")
    app.state.service = service
    app.add_middleware(BodySizeLimit, max_bytes=cfg.max_request_bytes)

    def error(request, status: int, message: str, param: str | None = None, code: str | None = None, **extra):
        """``{"error": message}`` (``/predict``), or OpenAI's error object under ``/v1/``."""
        if is_openai_path(request.url.path):
            return JSONResponse(openai_error_body(status, message, param, code), status_code=status,
                                headers=extra.get("headers"))
        return JSONResponse({"error": message, **({"detail": extra["detail"]} if "detail" in extra else {})},
                            status_code=status, headers=extra.get("headers"))

    @app.exception_handler(RequestError)
    async def request_error(request, err: RequestError):
        if isinstance(err, OpenAIError):
            return error(request, err.status, err.message, err.param, err.code)
        return error(request, err.status, err.message)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, err: RequestValidationError):
        detail = [{"loc": [str(x) for x in e.get("loc", ())], "msg": str(e.get("msg", "")), "type": str(e.get("type"))}
                  for e in err.errors()]
        summary = "; ".join(f"{'.'.join(d['loc'][1:] or d['loc'])}: {d['msg']}" for d in detail[:5])
        if is_openai_path(request.url.path):
            content_type = request.headers.get("content-type", "")
            if request.method == "POST" and not content_type.split(";")[0].strip().endswith("json"):
                return error(request, 415, f"the body must be JSON (Content-Type: application/json), got "
                                           f"{content_type[:60]!r}", None, "unsupported_media_type")
            first = err.errors()[0] if err.errors() else {}
            return error(request, 422, f"invalid request: {summary}", param_of(first.get("loc", ())),
                         str(first.get("type")) if first else None)
        return error(request, 422, f"invalid request: {summary}", detail=detail)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, err: StarletteHTTPException):
        return error(request, err.status_code, str(err.detail), headers=err.headers)

    @app.exception_handler(Exception)
    async def internal_error(request, err: Exception):  # the model failed: not the client's fault
        logger.exception("internal error on %s", request.url.path)
        return error(request, 500, f"internal error: {type(err).__name__}: {err}")

    PredictRequest = predict_request_model(cfg)

    @app.get("/health", summary="Liveness, model and batching statistics")
    async def health() -> dict:
        return service.health()

    @app.post("/predict", response_model=PredictResponse, response_model_exclude_none=True, responses=ERRORS, summary="Answer questions about an image")
    async def predict(body: PredictRequest) -> Any:  # type: ignore[valid-type]
        questions = service.check_questions([body.question] if body.question is not None else body.questions)
        if body.image_base64 is not None:
            data = decode_base64(body.image_base64, cfg)
        elif body.image_path is not None:
            data = await run_in_threadpool(read_image_path, body.image_path, cfg)
        else:
            data = await fetch_image_url(body.image_url, cfg)
        return await service.answer(data, questions, body.top_k, body.heatmap)

    @app.post("/predict/upload", response_model=PredictResponse, response_model_exclude_none=True, responses=ERRORS,
              summary="Answer questions about an uploaded image (multipart)")
    async def predict_upload(
        file: Annotated[UploadFile, File(description="the image file")],
        question: Annotated[list[str], Form(description="a question; repeat the field for several")],
        top_k: Annotated[int, Form(ge=1, le=cfg.max_top_k)] = 5,
        heatmap: Annotated[bool, Form()] = False,
    ) -> Any:
        questions = service.check_questions(question)
        data = await file.read(cfg.max_upload_bytes + 1)
        if len(data) > cfg.max_upload_bytes:
            raise RequestError(413, f"file is more than max_upload_bytes={cfg.max_upload_bytes:,} bytes")
        if not data:
            raise RequestError(400, "file is empty (0 bytes)")
        return await service.answer(data, questions, top_k, heatmap)

    add_openai_routes(app, service, cfg.model_name or default_model_id(service.checkpoint))

    if ui:
        import gradio as gr

        from vqakit.serve.ui import THEME, build_ui

        allowed = sorted({str(Path(image).parent) for image, _ in ui_examples or []})
        gr.mount_gradio_app(app, build_ui(service, ui_examples), path="/ui", theme=THEME, ssr_mode=False,
                            max_file_size=cfg.max_upload_bytes, allowed_paths=allowed, footer_links=[])

    @app.get("/", include_in_schema=False)
    async def root():
        return RedirectResponse("/ui/" if ui else "/docs")

    return app


def load_service(checkpoint: str, config: ServeConfig | None = None) -> VQAService:
    """Load a checkpoint (any model family ``VQAPredictor`` dispatches to: classifier or generative) and wrap it in
    a ``VQAService``."""
    from vqakit.inference.predict import VQAPredictor

    config = config or ServeConfig()
    predictor = VQAPredictor.from_pretrained(checkpoint, backend=config.backend, threads=config.threads,
                                             quantize=config.quantize, question_cache=config.question_cache)
    return VQAService(predictor, config, checkpoint=str(checkpoint))
