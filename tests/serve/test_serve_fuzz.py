"""Fuzz the REST API from its own OpenAPI spec (schemathesis): valid and invalid requests alike must get a
response that is not a 5xx, and every 4xx must be a JSON error that says what is wrong."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402

from vqakit.inference.predict import VQAPredictor  # noqa: E402
from vqakit.serve.app import VQAService, create_app  # noqa: E402
from vqakit.serve.config import ServeConfig  # noqa: E402

EXAMPLES = 30  # per operation and mode: ~15 s in all on 2 CPU cores


@pytest.fixture(scope="module")
def api_schema(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("image-root")  # image_path enabled, so the fuzzer reaches the path checks
    predictor = VQAPredictor.from_pretrained(tiny_checkpoint, device="cpu", backend="torch")
    service = VQAService(predictor, ServeConfig(image_root=str(root), max_upload_bytes=64 * 1024))
    yield schemathesis.openapi.from_asgi("/openapi.json", create_app(service))
    service.close()


@pytest.mark.parametrize("mode", list(schemathesis.GenerationMode), ids=lambda m: m.value)
def test_no_server_errors(api_schema, mode):
    # schemathesis' own pytest plumbing (schema.parametrize / from_fixture) does not run on pytest 9: drive
    # each operation's hypothesis strategy directly
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.path for op in operations} == {"/health", "/predict", "/predict/upload", "/v1/chat/completions",
                                              "/v1/models", "/v1/models/{model}"}
    seen = []
    for operation in operations:
        if mode == schemathesis.GenerationMode.NEGATIVE and operation.path in ("/health", "/v1/models",
                                                                               "/v1/models/{model}"):
            continue  # no parameters (or any string): nothing to make invalid

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def fuzz(case):
            response = case.call()
            seen.append(response.status_code)
            assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
            if response.status_code >= 400:
                content_type = response.headers.get("content-type", [""])  # schemathesis: a list per header
                assert str(content_type[0]).startswith("application/json"), response.text[:200]
                error = response.json()["error"]
                assert error, response.text[:200]
                if operation.path.startswith("/v1/"):  # OpenAI's error shape
                    assert isinstance(error, dict) and error["message"] and error["type"], response.text[:200]

        fuzz()
    assert len(seen) >= EXAMPLES and any(400 <= s < 500 for s in seen)  # it sent requests, and bad ones
