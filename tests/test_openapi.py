"""The OpenAPI documents are valid 3.1 and generated from the models that serve responses."""

from __future__ import annotations

from typing import Any

import pytest
from openapi_spec_validator import validate as validate_spec
from pydantic import BaseModel

from edgetok.agent.http import HANDLERS as SERVER_HANDLERS
from edgetok.agent.http import OPERATIONS as SERVER_OPS
from edgetok.gateway import api_spec
from edgetok.gateway.http import HANDLERS as GATEWAY_HANDLERS
from edgetok.gateway.models import ResultsPage, Status
from edgetok.openapi import ErrorBody, Operation, Reply, document


def _gateway(bearer: bool) -> dict[str, Any]:
    return api_spec.spec(api_spec.operations(["imu", "audio"]), bearer=bearer)


@pytest.mark.parametrize("bearer", [False, True])
def test_documents_are_valid_openapi_31(bearer: bool) -> None:
    for doc in (_gateway(bearer), document("s", "1", "d", SERVER_OPS, bearer)):
        validate_spec(doc)
        assert doc["openapi"] == "3.1.0"
        assert ("securitySchemes" in doc["components"]) is bearer


def test_every_route_is_documented_and_every_documented_path_served() -> None:
    assert set(_gateway(False)["paths"]) == set(GATEWAY_HANDLERS)
    assert {op.path for op in SERVER_OPS} == set(SERVER_HANDLERS)


def test_schemas_are_the_serving_models_own() -> None:
    doc = _gateway(False)
    schemas = doc["components"]["schemas"]
    # The components hold exactly what pydantic generates for the response models.
    for model in (Status, ResultsPage, ErrorBody):
        own = model.model_json_schema(mode="serialization",
                                      ref_template="#/components/schemas/{model}")
        own.pop("$defs", None)
        assert schemas[model.__name__] == own
    ok = doc["paths"]["/v1/status"]["get"]["responses"]["200"]["content"]
    assert ok["application/json"]["schema"] == {"$ref": "#/components/schemas/Status"}


def test_stream_parameter_is_the_configured_names() -> None:
    params = _gateway(False)["paths"]["/v1/results"]["get"]["parameters"]
    stream = next(p for p in params if p["name"] == "stream")
    assert stream["schema"]["enum"] == ["imu", "audio"]


def test_private_operations_declare_401_only_with_a_token() -> None:
    class Thing(BaseModel):
        """A response."""

        n: int

    ops = [Operation("/a", "a", "A.", {200: Reply("ok", Thing)}),
           Operation("/b", "b", "B.", {200: Reply("ok", Thing)}, public=True)]
    plain = document("t", "1", "d", ops, bearer=False)
    guarded = document("t", "1", "d", ops, bearer=True)
    assert "401" not in plain["paths"]["/a"]["get"]["responses"]
    assert "401" in guarded["paths"]["/a"]["get"]["responses"]
    assert guarded["paths"]["/b"]["get"]["security"] == []
    assert "401" not in guarded["paths"]["/b"]["get"]["responses"]
