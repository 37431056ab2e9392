"""Errors of the control plane, split by whose fault they are.

:class:`CallerError` and its subclasses are the caller's fault: invalid input, a name
that does not exist, a conflict with the current state. They map to 4xx and nothing has
changed. :class:`SystemError_` and its subclasses are ours: a map write or the state file
failed. They map to 5xx; a request that fails this way has been rolled back.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["ControlError", "CallerError", "Invalid", "NotFound", "Conflict", "PreconditionFailed",
           "SystemError_", "DatapathFailure", "PersistFailure"]


class ControlError(Exception):
    """Base: ``status`` is the HTTP status; ``problems`` lists (path, message)."""

    status = 500
    kind = "error"

    def __init__(self, message: str, problems: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.problems = list(problems)

    def to_json(self) -> dict[str, Any]:
        return {"error": self.message, "kind": self.kind,
                "problems": [{"path": p, "message": m} for p, m in self.problems]}


class CallerError(ControlError):
    status = 400
    kind = "bad_request"


class Invalid(CallerError):
    """The request is malformed or fails validation; ``problems`` name the fields."""

    status = 422
    kind = "invalid"

    def __init__(self, problems: Iterable[tuple[str, str]], what: str = "invalid request") -> None:
        problems = list(problems)
        detail = "; ".join(f"{p}: {m}" for p, m in problems)
        super().__init__(f"{what}: {detail}" if detail else what, problems)


class NotFound(CallerError):
    status = 404
    kind = "not_found"


class Conflict(CallerError):
    """Valid on its own, but not with the current state (exists already, table full,
    a setting that cannot change while running)."""

    status = 409
    kind = "conflict"


class PreconditionFailed(CallerError):
    """If-Match named a generation that is no longer current."""

    status = 412
    kind = "precondition_failed"


class SystemError_(ControlError):  # noqa: N801 - the builtin name is taken
    """Ours. The API answers with :attr:`public` (and a request id), never the message:
    that names files, addresses and exception text, and goes to the log."""

    status = 500
    kind = "internal"
    public = "internal error"


class DatapathFailure(SystemError_):
    """Writing the maps failed; the writes already made were undone."""

    status = 503
    kind = "datapath"
    public = "writing the datapath failed; the change was undone"


class PersistFailure(SystemError_):
    """The state file could not be written; the map writes were undone."""

    status = 503
    kind = "persist"
    public = "saving the desired state failed; the change was undone"
