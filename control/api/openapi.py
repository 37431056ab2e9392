"""The OpenAPI document: FastAPI's, with the request-body schemas taken from lb.config's
own models and refined with what their plain validators check."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema

from control.api.models import RealPatch, VipPatch
from control.flows import FlowQuery
from lb import constants as C
from lb.config import Config, QuicServer, Real, SourceRoute, Vip

__all__ = ["openapi_document"]


_IP = {"anyOf": [{"type": "string", "format": "ipv4"}, {"type": "string", "format": "ipv6"}]}
# What lb.config's plain validators check, for readers of the document (and generators)
_REFINE = {
    ("Vip", "address"): _IP,
    ("Vip", "port"): {"type": "integer", "minimum": 0, "maximum": 65535, "description": "0 = any port"},
    ("Vip", "flags"): {"type": "array", "items": {"type": "string", "enum": list(C.VIP_FLAGS)}},
    ("Real", "address"): _IP,
    ("QuicServer", "id"): {"type": "integer", "minimum": 1, "maximum": C.MAX_QUIC_SERVER_ID},
    ("QuicServer", "real"): _IP,
    ("SourceRoute", "prefix"): {"type": "string", "description": "client prefix ADDRESS/LENGTH, host bits zero"},
    ("SourceRoute", "real"): _IP,
    ("Settings", "gateway_mac"): {"type": "string", "pattern": "^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$"},
    ("Settings", "local_addresses"): {"type": "array", "items": _IP},
    ("GueSettings", "source_v4"): {"anyOf": [{"type": "string", "format": "ipv4"}, {"type": "null"}]},
    ("GueSettings", "source_v6"): {"anyOf": [{"type": "string", "format": "ipv6"}, {"type": "null"}]},
    ("HealthCheck", "port"): {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 65535}, {"type": "null"}]},
    ("HealthCheck", "rise"): {"type": "integer", "minimum": 1, "maximum": 100},
    ("HealthCheck", "fall"): {"type": "integer", "minimum": 1, "maximum": 100},
    ("HealthCheck", "interval"): {"type": "number", "exclusiveMinimum": 0, "maximum": 3600},
    ("HealthCheck", "timeout"): {"type": "number", "exclusiveMinimum": 0, "maximum": 3600},
    ("FlowQuery", "src"): _IP,
    ("FlowQuery", "dst"): _IP,
}


def _refine(schemas: dict[str, Any]) -> None:
    for (model, prop), extra in _REFINE.items():
        props = schemas.get(model, {}).get("properties", {})
        if prop in props:
            keep = {k: v for k, v in props[prop].items() if k in ("title", "default", "description")}
            props[prop] = {**extra, **keep}



def openapi_document(app: FastAPI, bearer: bool) -> dict[str, Any]:
    """``app``'s document (built once, then cached on the app); with ``bearer``, every
    operation requires the bearer token."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    _, defs = models_json_schema(
        [(m, "validation") for m in (Vip, Real, Config, QuicServer, SourceRoute, VipPatch, RealPatch, FlowQuery)],
        ref_template="#/components/schemas/{model}")
    comps = schema.setdefault("components", {}).setdefault("schemas", {})
    for name, s in defs.get("$defs", {}).items():
        comps.setdefault(name, s)
    _refine(comps)
    err = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}}
    for ops in schema.get("paths", {}).values():
        for op in ops.values():
            if "requestBody" in op:
                op["responses"].setdefault("413", {**err, "description": "request body too large"})
            if bearer:
                op["responses"].setdefault("401", {**err, "description": "missing or wrong bearer token"})
    if bearer:
        schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        schema["security"] = [{"bearer": []}]
    app.openapi_schema = schema
    return schema
