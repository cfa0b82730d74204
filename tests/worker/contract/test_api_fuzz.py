"""Schema-driven fuzzing of the worker's HTTP API (issue 11 item 4) with schemathesis.

The ingress publishes its request bodies in /openapi.json (``dsi_worker.app.BODY_MODELS``);
schemathesis generates valid and invalid requests for every operation from that document
and sends them to a served tiny model. With a healthy group no answer may be a 5xx, and
every 4xx must be OpenAI's error shape (message and type; for a 400 about a field, the
field named in ``param``). The counts are printed at the end.

It found one bug so far: ``temperature: 5e-324`` (valid, > 0) made inf logits and a sampling
error that failed the whole group, so every request after it got 503 while the group
re-formed (the engine now decodes greedily below 1e-5, as vLLM does).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from sizes import fuzz_examples

pytestmark = pytest.mark.worker

SEEN: Counter[tuple[str, int]] = Counter()
LOG: list[tuple[str, str, str, int]] = []


@pytest.fixture(scope="module")
def api_url(contract_url: str) -> Iterator[str]:
    """The package's served app; prints what the fuzzer sent when the module ends."""
    yield contract_url
    total = sum(SEEN.values())
    by_status = Counter[int]()
    for (_, status), n in SEEN.items():
        by_status[status] += n
    print(f"\n[api-fuzz] {total} requests; by status: {dict(sorted(by_status.items()))}")
    for (op, status), n in sorted(SEEN.items()):
        print(f"[api-fuzz]   {op:32} {status}: {n}")


@pytest.fixture(scope="module")
def api_schema(api_url: str) -> Any:
    """The served OpenAPI document, as schemathesis loads it."""
    return schemathesis.openapi.from_url(f"{api_url}/openapi.json")


def test_openapi_document_describes_every_request_body(api_url: str) -> None:
    import httpx
    from dsi_worker.app import BODY_MODELS

    doc = httpx.get(f"{api_url}/openapi.json", timeout=30).json()
    for path, model in BODY_MODELS.items():
        body = doc["paths"][path]["post"]["requestBody"]
        assert body["required"] is True
        ref = body["content"]["application/json"]["schema"]["$ref"]
        assert ref == f"#/components/schemas/{model.__name__}"
        assert "properties" in doc["components"]["schemas"][model.__name__]


# Hypothesis is driven here directly, operation by operation: schemathesis's own pytest
# integration (schema.parametrize / from_fixture) relies on a pytest internal that pytest 9
# removed (Function._nodeid).
FUZZ = settings(
    max_examples=fuzz_examples(40),
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)


def _check(case: Any) -> None:
    response = case.call(timeout=60)
    SEEN[(f"{case.method} {case.path}", response.status_code)] += 1
    LOG.append((case.method, case.path, repr(case.body)[:300], response.status_code))
    # The requests before it: a 5xx may be the aftermath of an earlier one that broke a group.
    recent = "\n".join(map(str, LOG[-8:]))
    assert response.status_code < 500, f"{case.method} {case.path}: {response.text[:500]}\n{recent}"
    if 400 <= response.status_code < 500:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"], response.text
        assert isinstance(error["type"], str) and error["type"], response.text
        if response.status_code == 400 and error.get("param") is not None:
            assert isinstance(error["param"], str) and error["param"], response.text


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_fuzzed_requests_get_clear_answers_never_5xx(api_schema: Any, mode: Any) -> None:
    operations = [r.ok() for r in api_schema.get_all_operations()]
    assert {f"{o.method.upper()} {o.path}" for o in operations} >= {
        "POST /v1/completions",
        "POST /v1/chat/completions",
        "POST /generate",
        "GET /healthz",
    }
    for op in operations:
        if mode == GenerationMode.NEGATIVE and op.method.upper() != "POST":
            continue  # nothing to break in a GET without parameters

        @FUZZ
        @given(case=op.as_strategy(mode))
        def run(case: Any) -> None:
            _check(case)

        run()
