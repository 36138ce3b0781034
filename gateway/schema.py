"""Request bodies: parsed and validated once, before any decision is made.

Every failure becomes :class:`~gateway.errors.InvalidArgument` naming the
offending field (``args[3]``, ``env.FOO``, ``timeout``), so no adapter ever
shows a caller a traceback and no half-valid request reaches the policy.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, ValidationError

from gateway.config import LimitsConfig, TasksConfig
from gateway.errors import InvalidArgument
from gateway.models import CommandSpec

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_TASK_ID = re.compile(r"^[0-9a-f]{32}$")


class ExecuteBody(BaseModel):
    """``POST /v1/commands``: run ``command`` with ``args`` in the sandbox."""

    model_config = ConfigDict(extra="forbid", strict=True)

    command: Annotated[StrictStr, Field(min_length=1, max_length=4096)]
    args: list[StrictStr] = []
    cwd: StrictStr = "/workspace"
    env: dict[StrictStr, StrictStr] = {}
    timeout: Annotated[float, Field(ge=0.001)] | None = None
    stdin: StrictStr | None = None
    stdin_base64: StrictStr | None = None
    network: StrictBool = False
    wait: StrictBool = False


def _field_name(loc: tuple[int | str, ...]) -> str:
    name = ""
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        else:
            name += ("." if name else "") + part
    return name or "body"


def pydantic_error(exc: ValidationError) -> InvalidArgument:
    """Translate the first pydantic error into one clear InvalidArgument."""
    err = exc.errors()[0]
    field = _field_name(tuple(err["loc"]))
    msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
    more = len(exc.errors()) - 1
    suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return InvalidArgument(f"{field}: {msg}{suffix}", field=field)


def _no_nul(value: str, field: str) -> None:
    if "\x00" in value:
        raise InvalidArgument(f"{field}: must not contain NUL bytes", field=field)


def parse_execute(
    body: Any, *, tasks: TasksConfig, limits: LimitsConfig
) -> tuple[CommandSpec, bool]:
    """Validate an execute request; return the command and the ``wait`` flag."""
    if not isinstance(body, dict):
        raise InvalidArgument("body: must be a JSON object", field="body")
    try:
        parsed = ExecuteBody.model_validate(body)
    except ValidationError as exc:
        raise pydantic_error(exc) from None
    _no_nul(parsed.command, "command")
    if len(parsed.args) > tasks.max_args:
        raise InvalidArgument(
            f"args: at most {tasks.max_args} arguments are allowed (got {len(parsed.args)})",
            field="args",
        )
    total = len(parsed.command.encode())
    for i, arg in enumerate(parsed.args):
        _no_nul(arg, f"args[{i}]")
        total += len(arg.encode()) + 1
    if total > tasks.max_arg_bytes:
        raise InvalidArgument(
            f"args: the command line is {total} bytes, more than {tasks.max_arg_bytes}",
            field="args",
        )
    _no_nul(parsed.cwd, "cwd")
    if not (parsed.cwd == "/workspace" or parsed.cwd.startswith("/workspace/")):
        raise InvalidArgument("cwd: must be /workspace or a directory below it", field="cwd")
    if any(part == ".." for part in parsed.cwd.split("/")):
        raise InvalidArgument("cwd: must not contain '..'", field="cwd")
    for key, value in parsed.env.items():
        if not _ENV_NAME.match(key):
            raise InvalidArgument(f"env.{key}: not a valid variable name", field=f"env.{key}")
        _no_nul(value, f"env.{key}")
    timeout = limits.timeout_s if parsed.timeout is None else parsed.timeout
    if timeout > limits.max_timeout_s:
        raise InvalidArgument(
            f"timeout: at most {limits.max_timeout_s:g} seconds (got {timeout:g})",
            field="timeout",
        )
    stdin = _stdin(parsed, tasks.max_stdin_bytes)
    spec = CommandSpec(
        name=parsed.command,
        args=tuple(parsed.args),
        cwd=parsed.cwd,
        env=tuple(sorted(parsed.env.items())),
        timeout_s=float(timeout),
        stdin=stdin,
        network=parsed.network,
    )
    return spec, parsed.wait


def _stdin(parsed: ExecuteBody, limit: int) -> bytes | None:
    if parsed.stdin is not None and parsed.stdin_base64 is not None:
        raise InvalidArgument("stdin: give either stdin or stdin_base64, not both", field="stdin")
    data: bytes | None = None
    if parsed.stdin is not None:
        data = parsed.stdin.encode()
    elif parsed.stdin_base64 is not None:
        try:
            data = base64.b64decode(parsed.stdin_base64, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidArgument("stdin_base64: not valid base64", field="stdin_base64") from None
    if data is not None and len(data) > limit:
        raise InvalidArgument(f"stdin: at most {limit} bytes", field="stdin")
    return data


def parse_task_id(value: str) -> str:
    """Task ids are 32 lowercase hex digits; anything else is a clear 400."""
    if not _TASK_ID.match(value):
        raise InvalidArgument("task_id: must be 32 lowercase hex digits", field="task_id")
    return value


def parse_mode(value: str | None) -> int:
    """File mode from an octal string such as ``644`` or ``0o600``."""
    if value is None or value == "":
        return 0o644
    text = value.lower().removeprefix("0o")
    if not re.fullmatch(r"[0-7]{1,4}", text):
        raise InvalidArgument("mode: must be an octal number such as 644", field="mode")
    mode = int(text, 8)
    if mode > 0o777:
        raise InvalidArgument("mode: setuid, setgid and sticky bits are not allowed", field="mode")
    return mode


def parse_bool(value: str | None, field: str) -> bool:
    if value is None or value == "":
        return False
    lowered = value.lower()
    if lowered in ("1", "true", "yes"):
        return True
    if lowered in ("0", "false", "no"):
        return False
    raise InvalidArgument(f"{field}: must be true or false", field=field)
