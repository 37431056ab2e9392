"""What every route shares: reading a JSON body, the If-Match and ETag headers, and the
request/response entries of the OpenAPI document."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from control.api.models import ErrorBody
from control.errors import Invalid

__all__ = [
    "MAX_PAGE",
    "etag",
    "if_match",
    "json_body",
    "json_body_schema",
    "page_params",
    "paged",
    "problems_of",
    "responses",
]

MAX_PAGE = 1000  # entries per page of a list endpoint (the default and the maximum of ?limit=)


def json_body_schema(name: str, array: bool = False) -> dict[str, Any]:
    """``openapi_extra`` of a route whose JSON body is the component ``name`` (or an array of it)."""
    ref: dict[str, Any] = {"$ref": f"#/components/schemas/{name}"}
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"type": "array", "items": ref} if array else ref}}}}


def responses(model: type[BaseModel] | None, *codes: int) -> dict[int | str, Any]:
    """``responses`` of a route: ``model`` for 200, :class:`ErrorBody` for each error ``codes``."""
    out: dict[int | str, Any] = {}
    if model is not None:
        out[200] = {"model": model}
    for c in codes:
        out[c] = {"model": ErrorBody}
    return out


def problems_of(exc: ValidationError) -> list[tuple[str, str]]:
    """A pydantic error as (path, message) problems."""
    out = []
    for e in exc.errors(include_url=False):
        path = ".".join(str(p) for p in e["loc"]) or "(body)"
        ctx = e.get("ctx") or {}
        out.append((path, str(ctx["error"]) if e["type"] == "value_error" and "error" in ctx else e["msg"]))
    return out


async def json_body(request: Request) -> Any:
    """The request's body as JSON; Invalid if it is missing or not JSON."""
    raw = await request.body()
    if not raw:
        raise Invalid([("(body)", "required: a JSON object")], "missing body")
    try:
        return json.loads(raw)
    except ValueError as e:
        raise Invalid([("(body)", f"not valid JSON: {e}")], "invalid body") from None


def if_match(request: Request) -> int | None:
    """The generation in ``If-Match`` (``"5"``, ``W/"5"``, ``5``), None without the header."""
    v = request.headers.get("if-match")
    if v is None:
        return None
    try:
        return int(v.strip().strip('"').removeprefix("W/").strip('"'))
    except ValueError:
        raise Invalid([("If-Match", f"must be a generation number (got {v!r})")], "invalid header") from None


def etag(gen: int) -> dict[str, str]:
    """The ``ETag`` header naming generation ``gen``."""
    return {"ETag": f'"{gen}"'}


def page_params(limit: int = Query(MAX_PAGE, ge=1, le=MAX_PAGE, description=f"at most this many entries "
                                                                             f"(1..{MAX_PAGE})"),
                offset: int = Query(0, ge=0, le=2**32, description="skip this many entries first")
                ) -> tuple[int, int]:
    """A list endpoint's ``?limit=&offset=`` (a FastAPI dependency)."""
    return limit, offset


def paged(request: Request, rows: list[Any], page: tuple[int, int], headers: dict[str, str] | None = None
          ) -> JSONResponse:
    """One page of ``rows``: ``X-Total-Count`` says how many there are, ``Link: <...>;
    rel="next"`` where the next page is (absent on the last)."""
    limit, offset = page
    out = {**(headers or {}), "X-Total-Count": str(len(rows))}
    if offset + limit < len(rows):
        out["Link"] = f'<{request.url.path}?limit={limit}&offset={offset + limit}>; rel="next"'
    return JSONResponse(rows[offset:offset + limit], headers=out)
