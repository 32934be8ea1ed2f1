"""The service's error tree. Each edge translates these into one outcome.

CJError
├── ServiceStalled        the process cannot make progress (offsets uncommittable for too long):
│                         `serve` exits with status 1 for its supervisor to restart it
├── TransientError        broker or database away, timeouts: retry with backoff, never dead-letter
└── PermanentError        the record can never succeed: dead-letter it, commit, move on
    ├── PoisonMessage     undecodable bytes, schema-invalid envelope or result, a request with
    │                     no readable identity, unstorable text
    └── RequestRejected   a request the domain refuses (schema-invalid data included, once its
        │                 identity is readable): one failed event
        └── ContentUnavailable   an essay's text could not be fetched from the Content Service
"""

from __future__ import annotations

from typing import Any


class CJError(Exception):
    """Root of every error this service raises on purpose."""


class ServiceStalled(CJError):
    """Progress is impossible in this process; a fresh one (re-joining the group) may do."""


class TransientError(CJError):
    """Retrying later can succeed."""


class PermanentError(CJError):
    """Retrying cannot succeed."""


class PoisonMessage(PermanentError):
    """A consumed record that cannot be decoded or validated."""


class RequestRejected(PermanentError):
    """A valid message whose request the domain refuses; ends in a failed event."""

    def __init__(self, error_code: str, message: str, context: dict[str, Any] | None = None):
        super().__init__(message)
        self.error_code = error_code
        self.message = message
        self.context = context or {}


class ContentUnavailable(RequestRejected):
    def __init__(self, essay_id: str, reason: str):
        super().__init__(
            "CONTENT_UNAVAILABLE",
            f"text of essay {essay_id!r} could not be fetched: {reason}",
            {"essay_id": essay_id},
        )
