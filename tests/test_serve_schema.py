"""Schemathesis against the server's own OpenAPI schema (issue #7 item 5): every operation,
with requests that follow the schema and requests that break it. No 5xx, ever.

Cases come from schemathesis' Hypothesis strategies and run under plain `@given` (its pytest
plugin does not support this pytest version)."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from fromage.apps.serve import ServeConfig, create_app

from .test_pipeline import bot  # noqa: F401  (fixture)
from .test_train import tiny_world  # noqa: F401  (fixture)

EXAMPLES = 30


@pytest.fixture(scope="module")
def schema(bot):  # noqa: F811
    fromage, _ = bot
    app = create_app(fromage, ServeConfig(max_body_bytes=100_000, max_tokens_limit=4))
    return schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.mark.parametrize("mode", [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE])
def test_no_server_error_on_any_operation(schema, mode):
    operations = [result.ok() for result in schema.get_all_operations()]
    names = sorted(f"{op.method.upper()} {op.path}" for op in operations)
    # The schema must describe the whole API, or the fuzzing would miss part of it.
    assert names == [
        "GET /health",
        "GET /v1/images/{image_id}",
        "GET /v1/models",
        "POST /v1/caption",
        "POST /v1/chat/completions",
        "POST /v1/retrieve",
    ]
    if mode == schemathesis.GenerationMode.NEGATIVE:
        # These two take no input at all: there is nothing to break.
        operations = [op for op in operations if op.path not in ("/health", "/v1/models")]
    seen: dict[str, int] = {}
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
        )
        def run(case):
            response = case.call()
            seen[f"{case.method} {case.path}"] = seen.get(f"{case.method} {case.path}", 0) + 1
            assert response.status_code < 500, (case.method, case.path, case.body, response.text[:300])

        run()
    assert len(seen) == len(operations)
