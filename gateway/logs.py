"""Operational logging (structlog), separate from the audit stream.

Every line carries the level and an ISO timestamp; lines logged while a
request is handled also carry its ``request_id`` (bound by the adapters) and,
when the request is traced, ``trace_id`` and ``span_id``.  Format ``auto``
picks JSON lines under systemd (journald sets ``JOURNAL_STREAM``) and a
readable console format otherwise.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping

import structlog
from structlog.typing import EventDict, WrappedLogger

from gateway.tracing import current_trace_ids


def add_trace_ids(_logger: WrappedLogger, _name: str, event: EventDict) -> EventDict:
    """structlog processor: the current span's ``trace_id``/``span_id``, if any."""
    for key, value in current_trace_ids().items():
        event.setdefault(key, value)
    return event


def resolve_format(fmt: str, env: Mapping[str, str] | None = None) -> str:
    """``auto`` -> ``json`` under systemd (JOURNAL_STREAM set), else ``console``."""
    if fmt != "auto":
        return fmt
    return "json" if (os.environ if env is None else env).get("JOURNAL_STREAM") else "console"


def configure(level: str = "info", fmt: str = "auto") -> None:
    """JSON lines for machines (systemd), readable lines for people."""
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if resolve_format(fmt) == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            add_trace_ids,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
