"""OpenAPI 3.1 documents generated from the pydantic models that serve the responses."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

OPENAPI_VERSION = "3.1.0"
REF_TEMPLATE = "#/components/schemas/{model}"


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer of the API."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    error: str = Field(description="What went wrong, for a human.")


@dataclass(frozen=True, slots=True)
class Param:
    """One query parameter or request header of an operation."""

    name: str
    schema: Mapping[str, Any]
    description: str
    where: Literal["query", "header"] = "query"
    required: bool = False


@dataclass(frozen=True, slots=True)
class Body:
    """A response body that is not a pydantic model: text, HTML, an event stream."""

    media_type: str
    schema: Mapping[str, Any] = field(default_factory=lambda: {"type": "string"})


@dataclass(frozen=True, slots=True)
class Reply:
    """One documented status of an operation."""

    description: str
    body: type[BaseModel] | Body


@dataclass(frozen=True, slots=True)
class Operation:
    """One GET endpoint, described once and served by the handler it names."""

    path: str
    operation_id: str
    summary: str
    responses: Mapping[int, Reply]
    params: Sequence[Param] = ()
    tag: str = "api"
    public: bool = False  # served without the bearer token (only /healthz)


# The two endpoints every edgetok daemon serves the same way.
METRICS_AND_SPEC: tuple[Operation, ...] = (
    Operation("/metrics", "metrics", "Prometheus metrics (text exposition format).",
              {200: Reply("Metrics.", Body("text/plain"))}, tag="status"),
    Operation("/openapi.json", "openapi", "This document.",
              {200: Reply("OpenAPI 3.1.", Body("application/json", {"type": "object"}))},
              tag="status"),
)


def _models(ops: Sequence[Operation]) -> list[type[BaseModel]]:
    seen: dict[str, type[BaseModel]] = {"ErrorBody": ErrorBody}
    for op in ops:
        for reply in op.responses.values():
            if isinstance(reply.body, type):
                seen.setdefault(reply.body.__name__, reply.body)
    return list(seen.values())


def _content(body: type[BaseModel] | Body, refs: Mapping[type[BaseModel], Any]
             ) -> dict[str, Any]:
    if isinstance(body, Body):
        return {body.media_type: {"schema": dict(body.schema)}}
    return {"application/json": {"schema": refs[body]}}


def document(title: str, version: str, description: str, ops: Sequence[Operation],
             bearer: bool) -> dict[str, Any]:
    """The OpenAPI 3.1 document for `ops`; with `bearer`, private operations declare 401."""
    models = _models(ops)
    keys, top = models_json_schema([(m, "serialization") for m in models],
                                   ref_template=REF_TEMPLATE)
    refs = {m: keys[(m, "serialization")] for m in models}
    unauthorized = {"description": "Missing or wrong bearer token.",
                    "content": _content(ErrorBody, refs)}
    paths: dict[str, Any] = {}
    for op in ops:
        responses: dict[str, Any] = {
            str(code): {"description": r.description, "content": _content(r.body, refs)}
            for code, r in sorted(op.responses.items())}
        entry: dict[str, Any] = {"operationId": op.operation_id, "summary": op.summary,
                                 "tags": [op.tag], "responses": responses}
        if op.params:
            entry["parameters"] = [{"name": p.name, "in": p.where, "required": p.required,
                                    "description": p.description, "schema": dict(p.schema)}
                                   for p in op.params]
        if bearer and not op.public:
            responses["401"] = unauthorized
            entry["security"] = [{"bearer": []}]
        elif bearer:
            entry["security"] = []
        paths[op.path] = {"get": entry}
    doc: dict[str, Any] = {
        "openapi": OPENAPI_VERSION,
        "info": {"title": title, "version": version, "description": description},
        "paths": paths,
        "components": {"schemas": top.get("$defs", {})},
    }
    if bearer:
        doc["components"]["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer",
                       "description": "EDGETOK_API_TOKEN or the systemd credential api_token."}}
    return doc
