"""Log lines: one JSON event per line, exceptions without their messages."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from cj_assessment.logs import configure_logging

SECRET = "essay text that must not be logged"


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    configure_logging("DEBUG", json=True, stream=stream)
    yield stream
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)


def _lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line]


def test_an_exception_is_logged_by_class_and_stack_without_its_message(
    json_logs: io.StringIO,
) -> None:
    try:
        try:
            raise ValueError(SECRET)
        except ValueError as inner:
            raise RuntimeError(f"wrapped: {SECRET}") from inner
    except RuntimeError:
        structlog.get_logger("test").exception("records_failed_unexpectedly", topic="t")
    (line,) = _lines(json_logs)
    assert line["event"] == "records_failed_unexpectedly"
    assert line["error_class"] == "RuntimeError"
    assert "builtins.ValueError (message withheld)" in line["exception"]
    assert "builtins.RuntimeError (message withheld)" in line["exception"]
    assert "test_an_exception_is_logged_by_class_and_stack" in line["exception"]
    assert SECRET not in json.dumps(line)


def test_standard_library_loggers_write_the_same_json_events(
    json_logs: io.StringIO,
) -> None:
    logging.getLogger("asyncio").debug("Using selector: %s", "EpollSelector")
    try:
        raise OSError(SECRET)
    except OSError:
        logging.getLogger("dishka").error("failed", exc_info=True)
    first, second = _lines(json_logs)
    assert (first["event"], first["logger"], first["level"]) == (
        "Using selector: EpollSelector",
        "asyncio",
        "debug",
    )
    assert second["error_class"] == "OSError"
    assert SECRET not in json.dumps(second)


def test_library_warnings_are_kept_out_below_an_error_level() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    configure_logging("ERROR", json=True, stream=stream)
    try:
        logging.getLogger("aiokafka").warning("Unable connect to node")
        logging.getLogger("aiokafka").error("Unable to update metadata")
    finally:
        structlog.reset_defaults()
        root.handlers[:] = handlers
        root.setLevel(level)
    assert [line["event"] for line in _lines(stream)] == ["Unable to update metadata"]


def test_an_unhandled_task_exception_is_logged_without_its_message(
    json_logs: io.StringIO,
) -> None:
    from cj_assessment.service import _unhandled_in_loop

    context = {
        "message": "Task exception was never retrieved",
        "exception": ValueError(SECRET),
        "future": f"<Task finished exception=ValueError({SECRET!r})>",
    }
    _unhandled_in_loop(None, context)  # type: ignore[arg-type]
    (line,) = _lines(json_logs)
    assert (line["event"], line["what"], line["error_class"]) == (
        "event_loop_exception",
        "Task exception was never retrieved",
        "ValueError",
    )
    assert SECRET not in json.dumps(line)
