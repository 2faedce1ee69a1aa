"""OpenAI-compatible routes over the same ``VQAService`` as ``/predict``: one batcher, one set of limits.

    POST /v1/chat/completions   one user message with one image (``image_url``: a ``data:`` URL or an allowed
                                http(s) URL) and the question as text; ``stream``, ``logprobs`` / ``top_logprobs``
    GET  /v1/models             the one model this server holds (``GET /v1/models/{id}`` too)

This is the interface of VLM servers (vLLM, ``transformers serve``) and of the evaluation harnesses that call
them (lmms-eval, VLMEvalKit), following OpenAI's API reference
(https://platform.openai.com/docs/api-reference/chat/create). How vqakit maps onto it:

- The answer is one content *token*: a classifier's answer class, or a generative checkpoint's whole generated
  answer. ``logprobs`` gives its ``logprob = log(score)`` (the classifier's answer probability; the generative
  checkpoint's sequence probability) and ``top_logprobs`` the classifier's best answers with theirs (a
  generative checkpoint has one answer). ``max_tokens`` >= 1 therefore never truncates an answer.
- Decoding is deterministic: ``temperature`` 0 (or omitted), ``top_p`` 1, ``n`` 1, no penalties, no ``stop``.
  Anything else, several images, several user turns, an assistant or tool turn (a conversation), tools or a
  response format is a 4xx that names the field, in OpenAI's error shape::

      {"error": {"message": "...", "type": "invalid_request_error", "param": "messages[0].content[1]", "code": ...}}

- ``system`` / ``developer`` messages are accepted and not used: vqakit checkpoints answer the question alone,
  so a harness's instruction ("Answer the question using a single word or phrase.") can go there.
- Usage (token counts) is not reported: the ``usage`` field is optional in the API and vqakit's answers are
  not counted in tokens.
"""

import json
import math
import time
import uuid
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, create_model

from vqakit.serve.sources import RequestError, decode_base64, fetch_image_url

# OpenAI's floor for "probability zero" in logprobs (JSON has no -inf)
MIN_LOGPROB = -9999.0
# OpenAI's limit on top_logprobs
MAX_TOP_LOGPROBS = 20


class OpenAIError(RequestError):
    """A bad request to the ``/v1`` routes: a ``RequestError`` that also names the ``param`` and an error ``code``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(status, message)
        self.param = param
        self.code = code


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "invalid_request_error", 408: "timeout_error", 413: "invalid_request_error",
               415: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
               503: "server_overloaded"}


def openai_error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def is_openai_path(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def param_of(loc) -> str | None:
    """A pydantic error location -> OpenAI's ``param`` (``("body", "messages", 0, "role")`` -> ``messages[0].role``);
    union-member tags (``str``, ``list[dict[str,any]]``) are left out."""
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        if isinstance(part, int) or (isinstance(part, str) and part.isdigit()):
            out += f"[{part}]"
        elif isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "dict", "list",
                                                                 "none", "function-after")):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out or None


# -- request and response schemas ------------------------------------------------------------------------------------


class ChatMessage(BaseModel):
    """One message. ``content``: a string, or a list of parts ``{"type": "text", "text": ...}`` /
    ``{"type": "image_url", "image_url": {"url": ...}}`` (checked by hand, so errors name the part)."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = Field(None, max_length=256)


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions``: the subset of OpenAI's parameters a VQA model can honour."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "model": "easy-vqa", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,<base64 of a PNG file>"}},
            {"type": "text", "text": "what shape is in the image?"}]}], "logprobs": True, "top_logprobs": 3}]})

    model: str = Field(max_length=256, description="the model id (GET /v1/models)")
    messages: list[ChatMessage] = Field(min_length=1, max_length=16,
                                        description="system/developer messages (not used) and one user message")
    max_tokens: int | None = Field(None, ge=1, description="the answer is one token, so any value >= 1 fits it")
    max_completion_tokens: int | None = Field(None, ge=1, description="the same as max_tokens")
    temperature: float | None = Field(None, ge=0, le=2, description="only 0: answers are deterministic")
    top_p: float | None = Field(None, ge=0, le=1, description="only 1")
    n: int | None = Field(None, ge=1, le=128, description="only 1")
    stream: bool | None = Field(None, description="server-sent events: a role chunk, the answer, the finish chunk, "
                                                   "then data: [DONE]")
    stream_options: dict[str, Any] | None = Field(None, description="accepted; no usage is reported")
    logprobs: bool | None = Field(None, description="return log(score) of the answer")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS,
                                     description="the best answers with their logprobs (needs logprobs: true)")
    presence_penalty: float | None = Field(None, ge=-2, le=2, description="only 0")
    frequency_penalty: float | None = Field(None, ge=-2, le=2, description="only 0")
    stop: str | list[str] | None = Field(None, description="not supported (null only)")
    seed: int | None = Field(None, description="accepted: answers are deterministic anyway")
    user: str | None = Field(None, max_length=256, description="accepted, not used")


class LogprobEntry(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(LogprobEntry):
    top_logprobs: list[LogprobEntry]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: str | None = None


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[Choice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    vqakit: dict | None = Field(None, description="model_type, generative, the answer classes, checkpoint, decoding")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorResponse(BaseModel):
    error: OpenAIErrorDetail


OPENAI_ERRORS = {code: {"model": OpenAIErrorResponse, "description": text} for code, text in {
    400: "an unsupported parameter or message, an unreadable image", 403: "an image URL this server does not fetch",
    404: "no such model", 408: "image URL too slow", 413: "too large (bytes or pixels)",
    415: "the body is not JSON", 422: "an invalid field", 503: "server busy",
}.items()}


# -- the model's id and card -----------------------------------------------------------------------------------------


def default_model_id(checkpoint: str | None) -> str:
    """The checkpoint directory's name, or its run's name for ``<run>/checkpoint`` (``runs/easy-vqa/checkpoint``
    -> ``easy-vqa``); ``vqakit`` without a checkpoint path."""
    if not checkpoint:
        return "vqakit"
    path = Path(checkpoint).resolve()
    return path.parent.name if path.name == "checkpoint" and path.parent.name else path.name


def model_card(service, model_id: str) -> dict:
    """``GET /v1/models`` entry; its ``vqakit`` field lets ``vqakit evaluate --endpoint`` score exactly as
    ``--checkpoint`` does (the classifier's answer classes, or the generative decoding settings)."""
    predictor = service.predictor
    config = getattr(predictor, "config", None) or getattr(getattr(predictor, "model", None), "config", None)
    to_dict = getattr(config, "to_dict", None)
    info = {
        "model_type": to_dict().get("model_type") if callable(to_dict) else None,
        "generative": bool(getattr(predictor, "generative", False)),
        "labels": list(predictor.labels) if predictor.labels is not None else None,
        "checkpoint": service.checkpoint, "backend": predictor.backend,
        "answer_token": "the whole answer is one content token",
    }
    if info["generative"]:
        info["decoding"] = predictor.decoding
    return {"id": model_id, "object": "model", "created": int(service.started), "owned_by": "vqakit", "vqakit": info}


# -- parsing a chat request ------------------------------------------------------------------------------------------


def check_parameters(body: ChatCompletionRequest, model_id: str) -> None:
    """Refuse what a deterministic one-answer VQA model cannot honour, naming the parameter."""
    if body.model != model_id:
        raise OpenAIError(404, f"The model {body.model!r} does not exist on this server; it serves {model_id!r} "
                               "(GET /v1/models)", "model", "model_not_found")
    for name, ok, wanted in (("temperature", body.temperature in (None, 0), "0 (answers are deterministic)"),
                             ("top_p", body.top_p in (None, 1), "1"),
                             ("n", body.n in (None, 1), "1 (one answer per question)"),
                             ("presence_penalty", body.presence_penalty in (None, 0), "0"),
                             ("frequency_penalty", body.frequency_penalty in (None, 0), "0"),
                             ("stop", body.stop in (None, [], ""), "null (answers are one token)")):
        if not ok:
            raise OpenAIError(400, f"{name}={getattr(body, name)!r} is not supported by this VQA server; send "
                                   f"{wanted} or leave it out", name, "unsupported_parameter")
    if body.top_logprobs and not body.logprobs:
        raise OpenAIError(400, "top_logprobs needs logprobs: true", "top_logprobs", "invalid_value")


def parse_messages(messages: list[ChatMessage]) -> tuple[str, str, str]:
    """The one user message -> (question, image URL, the image part's param path)."""
    user = [i for i, m in enumerate(messages) if m.role == "user"]
    for i, m in enumerate(messages):
        if m.role in ("assistant", "tool"):
            raise OpenAIError(400, f"messages[{i}] has role {m.role!r}: this VQA server answers one question about "
                                   "one image (one user message), not a conversation", f"messages[{i}].role",
                                   "unsupported_conversation")
        if m.role in ("system", "developer") and not isinstance(m.content, str | None):
            if any(not (isinstance(p, dict) and p.get("type") == "text") for p in m.content):
                raise OpenAIError(400, f"messages[{i}] ({m.role}) may hold text parts only",
                                  f"messages[{i}].content", "invalid_value")
    if not user:
        raise OpenAIError(400, "no user message: send one user message with an image_url part and the question",
                          "messages", "invalid_value")
    if len(user) > 1:
        raise OpenAIError(400, f"messages[{user[1]}] is a second user turn: this VQA server answers one question "
                               "about one image per request (one user message)", f"messages[{user[1]}]",
                               "unsupported_conversation")
    i = user[0]
    content = messages[i].content
    if not isinstance(content, list):
        raise OpenAIError(400, f"messages[{i}].content is {'text only' if content else 'empty'}: send a list with "
                               "an image_url part and a text part (the question)", f"messages[{i}].content",
                               "image_missing")
    texts, image, image_param = [], None, None
    for j, part in enumerate(content):
        where = f"messages[{i}].content[{j}]"
        kind = part.get("type")
        if kind == "text":
            if not isinstance(part.get("text"), str) or set(part) - {"type", "text"}:
                raise OpenAIError(400, f"{where}: a text part is {{\"type\": \"text\", \"text\": \"...\"}}", where,
                                  "invalid_value")
            texts.append(part["text"])
        elif kind == "image_url":
            spec = part.get("image_url")
            url = spec.get("url") if isinstance(spec, dict) else spec if isinstance(spec, str) else None
            if not isinstance(url, str) or set(part) - {"type", "image_url"} or (
                    isinstance(spec, dict) and set(spec) - {"url", "detail"}):
                raise OpenAIError(400, f"{where}: an image part is {{\"type\": \"image_url\", \"image_url\": "
                                       "{\"url\": \"data:image/png;base64,...\"}}", where, "invalid_value")
            if image is not None:
                raise OpenAIError(400, f"{where} is a second image: this model answers about one image per request",
                                  where, "too_many_images")
            image, image_param = url, f"{where}.image_url.url"
        else:
            raise OpenAIError(400, f"{where} has type {str(kind)[:40]!r}; supported part types are 'text' and "
                                   "'image_url'", f"{where}.type", "unsupported_content_type")
    if image is None:
        raise OpenAIError(400, f"messages[{i}] has no image_url part: a VQA question needs one image",
                          f"messages[{i}].content", "image_missing")
    question = " ".join(t.strip() for t in texts if t.strip())
    if not question:
        raise OpenAIError(400, f"messages[{i}] has no question: add a text part", f"messages[{i}].content",
                          "question_missing")
    return question, image, image_param


async def read_image(url: str, param: str, cfg) -> bytes:
    """A ``data:`` URL (base64) or an http(s) URL under the server's allow-list and SSRF rules -> the file's bytes;
    a failure keeps its status and names ``param``."""
    try:
        if url.startswith("data:"):
            return decode_base64(url, cfg)
        if url.lower().startswith(("http://", "https://")):
            return await fetch_image_url(url, cfg)
    except OpenAIError:
        raise
    except RequestError as err:
        raise OpenAIError(err.status, f"{param}: {err.message}", param) from err
    raise OpenAIError(400, f"{param} must be a data:image/...;base64 URL or an http(s) URL, got {url[:60]!r}",
                      param, "invalid_image_url")


# -- the answer as a completion --------------------------------------------------------------------------------------


def logprob(score: float) -> float:
    return math.log(score) if score > 0 else MIN_LOGPROB


def _entry(token: str, score: float) -> dict:
    return {"token": token, "logprob": logprob(score), "bytes": list(token.encode("utf-8"))}


def answer_logprobs(prediction, top_logprobs: int) -> dict:
    """The answer as one token with ``log(score)``, and the best ``top_logprobs`` answers with theirs."""
    top = [_entry(a, s) for a, s in prediction.top_k[:top_logprobs]]
    return {"content": [{**_entry(prediction.answer, prediction.score), "top_logprobs": top}], "refusal": None}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def chat_request_model(model_id: str) -> type[ChatCompletionRequest]:
    """The request body with this server's model id in its JSON schema (any other name is a 404, as OpenAI's)."""
    return create_model("ChatCompletionRequest", __base__=ChatCompletionRequest, model=(str, Field(
        max_length=256, description=f"the model id: {model_id!r} (GET /v1/models)",
        json_schema_extra={"enum": [model_id]})))


def add_openai_routes(app: FastAPI, service, model_id: str) -> None:
    """Mount ``/v1/chat/completions`` and ``/v1/models`` on ``app``, answering through ``service``."""
    cfg = service.config
    ChatRequest = chat_request_model(model_id)

    @app.get("/v1/models", response_model=ModelList, response_model_exclude_none=True, tags=["openai"],
             summary="The model this server holds (OpenAI-compatible)")
    async def list_models() -> Any:
        return {"object": "list", "data": [model_card(service, model_id)]}

    @app.get("/v1/models/{model}", response_model=ModelCard, response_model_exclude_none=True,
             responses=OPENAI_ERRORS, tags=["openai"], summary="One model (OpenAI-compatible)")
    async def retrieve_model(model: str) -> Any:
        if model != model_id:
            raise OpenAIError(404, f"The model {model!r} does not exist on this server; it serves {model_id!r}",
                              "model", "model_not_found")
        return model_card(service, model_id)

    @app.post("/v1/chat/completions", response_model=ChatCompletion, response_model_exclude_none=True,
              responses={**OPENAI_ERRORS, 200: {"content": {"text/event-stream": {}}}}, tags=["openai"],
              summary="Answer a question about an image (OpenAI chat completions)")
    async def chat_completions(body: ChatRequest) -> Any:  # type: ignore[valid-type]
        check_parameters(body, model_id)
        question, url, image_param = parse_messages(body.messages)
        if body.top_logprobs is not None and body.top_logprobs > cfg.max_top_k:
            raise OpenAIError(400, f"top_logprobs={body.top_logprobs} is more than this server's "
                                   f"max_top_k={cfg.max_top_k}", "top_logprobs", "invalid_value")
        user = next(i for i, m in enumerate(body.messages) if m.role == "user")
        try:
            questions = service.check_questions([question])
        except RequestError as err:
            raise OpenAIError(err.status, f"messages[{user}].content: {err.message}", f"messages[{user}].content",
                              "invalid_value") from err
        data = await read_image(url, image_param, cfg)
        top_k = max(1, body.top_logprobs or 0)
        try:
            predictions, _, _ = await service.run(data, questions, top_k)
        except OpenAIError:
            raise
        except RequestError as err:  # the image does not decode, is too large, or the server is busy
            param = image_param if err.message.startswith("image") else None
            raise OpenAIError(err.status, err.message, param) from err
        p = predictions[0]
        logprobs = answer_logprobs(p, body.top_logprobs or 0) if body.logprobs else None
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        fingerprint = f"vqakit-{service.predictor.backend}"
        if body.stream:
            head = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model_id,
                    "system_fingerprint": fingerprint}

            def chunk(delta: dict, finish: str | None = None, lp: dict | None = None) -> str:
                choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}
                return _sse({**head, "choices": [choice]})

            async def events():
                yield chunk({"role": "assistant", "content": ""})
                yield chunk({"content": p.answer}, lp=logprobs)
                yield chunk({}, "stop")
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        choice = {"index": 0, "message": {"role": "assistant", "content": p.answer}, "finish_reason": "stop"}
        if logprobs is not None:
            choice["logprobs"] = logprobs
        return JSONResponse({"id": completion_id, "object": "chat.completion", "created": created,
                             "model": model_id, "system_fingerprint": fingerprint, "choices": [choice]})
