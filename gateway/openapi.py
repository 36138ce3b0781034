"""The OpenAPI 3.1 document served at ``/openapi.json``."""

from __future__ import annotations

import functools
from typing import Any

from gateway import __version__
from gateway.errors import HTTP_STATUS
from gateway.schema import ExecuteBody

_TASK_ID = {
    "name": "task_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
}
_PATH = {
    "name": "path",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
    "description": "Path relative to the caller's workspace.",
}


def _json(ref: str) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(c): {"description": "Error", **_json("Error")} for c in codes}


_TASK = {
    "type": "object",
    "properties": {
        "task_id": {"type": "string"},
        "state": {
            "type": "string",
            "enum": [
                "CREATED",
                "QUEUED",
                "RUNNING",
                "COMPLETED",
                "FAILED",
                "CANCELLED",
                "TIMED_OUT",
            ],
        },
        "owner": {"type": "string"},
        "command": {"type": "array", "items": {"type": "string"}},
        "exit_code": {"type": ["integer", "null"]},
        "signal": {"type": ["integer", "null"]},
        "reason": {"type": "string"},
        "stdout": {"type": "string"},
        "stdout_base64": {"type": "string"},
        "stderr": {"type": "string"},
        "stderr_base64": {"type": "string"},
        "stdout_truncated": {"type": "boolean"},
        "stderr_truncated": {"type": "boolean"},
        "cpu_time_s": {"type": "number"},
        "max_rss_bytes": {"type": "integer"},
        "duration_s": {"type": ["number", "null"]},
    },
}

_ERROR = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string", "enum": [str(c) for c in HTTP_STATUS]},
                "message": {"type": "string"},
                "field": {"type": "string"},
                "reasons": {"type": "array", "items": {"type": "string"}},
                "retry_after": {"type": "number"},
                "request_id": {"type": "string"},
            },
        }
    },
}


@functools.cache
def openapi_document() -> dict[str, Any]:
    """Built once; describes every route of :mod:`gateway.rest`."""
    bearer: list[dict[str, list[str]]] = [{"bearer": []}]
    return {
        "openapi": "3.1.0",
        "info": {"title": "MCP Security Gateway", "version": __version__},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "ExecuteRequest": ExecuteBody.model_json_schema(),
                "Task": _TASK,
                "Error": _ERROR,
            },
        },
        "security": bearer,
        "paths": {
            "/health": {
                "get": {
                    "summary": "Liveness",
                    "security": [],
                    "responses": {"200": {"description": "alive"}},
                }
            },
            "/ready": {
                "get": {
                    "summary": "Readiness (sandbox, policy engine, disk)",
                    "security": [],
                    "responses": {
                        "200": {"description": "ready"},
                        "503": {"description": "not ready"},
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "security": [],
                    "responses": {"200": {"description": "text exposition"}},
                }
            },
            "/v1/commands": {
                "post": {
                    "summary": "Run a command in the sandbox",
                    "requestBody": {"required": True, **_json("ExecuteRequest")},
                    "responses": {
                        "202": {"description": "queued", **_json("Task")},
                        "200": {"description": "finished (wait=true)", **_json("Task")},
                        **_errors(400, 401, 403, 413, 429, 503),
                    },
                }
            },
            "/v1/tasks/{task_id}": {
                "get": {
                    "summary": "Task status",
                    "parameters": [_TASK_ID],
                    "responses": {
                        "200": {"description": "task", **_json("Task")},
                        **_errors(400, 401, 403, 404),
                    },
                }
            },
            "/v1/tasks/{task_id}/output": {
                "get": {
                    "summary": "Follow a task's output (NDJSON lines, or raw bytes: format=raw)",
                    "parameters": [
                        _TASK_ID,
                        {"name": "format", "in": "query", "schema": {"enum": ["ndjson", "raw"]}},
                    ],
                    "responses": {"200": {"description": "stream"}, **_errors(400, 401, 403, 404)},
                }
            },
            "/v1/tasks/{task_id}/cancel": {
                "post": {
                    "summary": "Cancel a task (kills its process tree)",
                    "parameters": [_TASK_ID],
                    "responses": {
                        "200": {"description": "task", **_json("Task")},
                        **_errors(400, 401, 403, 404, 409),
                    },
                }
            },
            "/v1/files": {
                "get": {
                    "summary": "List the workspace root",
                    "responses": {"200": {"description": "entries"}, **_errors(401, 403)},
                }
            },
            "/v1/files/{path}": {
                "get": {
                    "summary": "Read a file (or list=true / stat=true)",
                    "parameters": [_PATH],
                    "responses": {
                        "200": {"description": "bytes"},
                        **_errors(400, 401, 403, 404, 413),
                    },
                },
                "put": {
                    "summary": "Write a file atomically",
                    "parameters": [_PATH],
                    "requestBody": {"content": {"application/octet-stream": {}}},
                    "responses": {"201": {"description": "written"}, **_errors(400, 401, 403, 413)},
                },
                "delete": {
                    "summary": "Delete a file (recursive=true for directories)",
                    "parameters": [_PATH],
                    "responses": {
                        "200": {"description": "deleted"},
                        **_errors(400, 401, 403, 404, 409),
                    },
                },
            },
        },
    }
