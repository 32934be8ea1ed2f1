"""The service's error tree. Each edge translates these into one outcome.

CJError
├── StartupRefused        a command (`serve`, `migrate`) cannot start: one line naming why
│   ├── SchemaNotMigrated       the database is not at this build's schema: exit 2
│   ├── MigrationsNotFound      no alembic/ directory (CJ_ALEMBIC_DIR): exit 2
│   ├── TopicsNotCreated        the broker refused to create a topic: exit 2
│   └── DependencyUnavailable   the database or the broker is unreachable: exit 1
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


class StartupRefused(CJError):
    """A command cannot start; the message says why in one line."""


class SchemaNotMigrated(StartupRefused):
    """The database's schema is missing, older or newer than this build's."""


class MigrationsNotFound(StartupRefused):
    """The migrations, which say what schema this build needs, are not where configured."""


class TopicsNotCreated(StartupRefused):
    """The broker refused to create topics the service needs."""


class DependencyUnavailable(StartupRefused):
    """The database or the broker could not be reached at start-up; a supervisor's restart
    tries again."""


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
