"""structlog set-up: key-value events carrying ids and counts only."""

from __future__ import annotations

import logging
import sys
import traceback
from typing import Any, TextIO

import structlog

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def configure_logging(
    level: str = "INFO", *, json: bool = True, stream: TextIO | None = None
) -> None:
    """Every line on stderr is one event in one format, the standard library's (aiokafka,
    asyncio, dishka) included; an exception is logged by its class and stack, never its
    message, which may quote a row's values or a payload."""
    stream = stream or sys.stderr
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    stamped: list[structlog.types.Processor] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        exception_without_message,
    ]
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *stamped],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Chatty libraries: their warnings at most, and nothing below the level asked for.
    quiet = max(logging.WARNING, logging.getLevelName(level.upper()))
    for noisy in ("aiokafka", "kafka", "sqlalchemy", "alembic"):
        logging.getLogger(noisy).setLevel(quiet)
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, *stamped, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=True,
    )


def exception_without_message(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    """Render `exc_info` as the exception classes of its chain and their stacks."""
    info = event.pop("exc_info", None)
    if not info:
        return event
    if info is True:
        info = sys.exc_info()
    exc = info if isinstance(info, BaseException) else info[1]
    if exc is None:
        return event
    event.setdefault("error_class", type(exc).__name__)
    event["exception"] = _stack(exc)
    return event


def _stack(exc: BaseException) -> str:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        current = current.__cause__ or (
            None if current.__suppress_context__ else current.__context__
        )
    parts = [
        "Traceback (most recent call last):\n"
        + "".join(traceback.format_tb(link.__traceback__))
        + f"{type(link).__module__}.{type(link).__qualname__} (message withheld)\n"
        for link in reversed(chain)
    ]
    return "\nThe above exception led to the following:\n\n".join(parts)
