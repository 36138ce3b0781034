"""The policy seam: the input document, the decision, and the engines that decide.

Every request becomes one *policy input* (version 1, built by the pure
:func:`build_policy_input`), one engine evaluates ``data.mcp.decision`` over it,
and :func:`parse_decision` turns whatever came back into a
:class:`~gateway.models.Decision`, failing closed: anything malformed is a deny
with a reason. The Rego policies live in ``policies/`` (see ``docs/policy.md``).

:class:`EmbeddedEngine` runs the policies in-process with regopy (rego-cpp):

* It loads every ``*.rego`` file except ``*_test.rego`` and every ``data.json``
  under the policy directory (each merged at its directory's path, as OPA does),
  compiles them once into a bundle and checks the result with a canary input.
  The revision is the sha256 of the loaded files; every decision carries it.
* A regopy interpreter is not thread safe, so each one is guarded by a lock
  and used by one evaluation at a time.
* Evaluation runs in a dedicated worker thread (ctypes releases the GIL), so
  the event loop never waits on Rego and a runaway evaluation cannot block
  forever: after ``timeout_s`` the request is denied ("policy engine error:
  ... timed out"), the stuck thread and its interpreter are abandoned (a thread
  cannot be killed) and a fresh interpreter and thread take over; a decision
  still queued when its ``timeout_s`` passes is denied as busy. Too many
  stuck evaluations make :meth:`EmbeddedEngine.check` report unavailable.
  The thread hop costs tens of microseconds, small next to the evaluation
  (about 1-3 ms for the shipped policy).
* :meth:`EmbeddedEngine.reload` compiles the files again and swaps the new
  interpreter in atomically only if it compiles and passes the canary; a
  broken policy keeps the old one and raises.

rego-cpp quirks this module works around: its output strings are not escaped
(so results are read node by node instead of parsed as JSON), asking an
undefined result for its expressions aborts the process (so the output is
checked first), integers beyond 64 bits silently become 0 and NUL characters
truncate strings (so :func:`check_policy_input` rejects such documents), and
strings parsed from JSON keep their escapes (so input is passed as values, and
data strings must not need escaping).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import hashlib
import json
import math
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Literal, Protocol, runtime_checkable

import regopy
import structlog
from regopy import rego_shared

from gateway.errors import FailedPrecondition, Unavailable
from gateway.models import CommandSpec, Decision, Subject, Transport

log = structlog.get_logger("gateway.policy")

POLICY_INPUT_VERSION: Final = 1
DECISION_QUERY: Final = "data.mcp.decision"

Action = Literal[
    "command.execute",
    "file.read",
    "file.write",
    "file.delete",
    "file.list",
    "task.read",
    "task.cancel",
]
ACTIONS: Final[frozenset[str]] = frozenset(
    {
        "command.execute",
        "file.read",
        "file.write",
        "file.delete",
        "file.list",
        "task.read",
        "task.cancel",
    }
)

# Bounds for a policy input document (check_policy_input).
MAX_INPUT_DEPTH: Final = 16
MAX_INPUT_NODES: Final = 20_000
MAX_SAFE_INTEGER: Final = 2**53
MIN_NONZERO_FLOAT: Final = 1e-9

# Stuck (timed-out, still running) evaluations tolerated before check() fails.
MAX_STUCK_EVALUATIONS: Final = 2


@runtime_checkable
class PolicyEngine(Protocol):
    """Something that answers ``data.mcp.decision`` for a policy input."""

    name: str

    async def decide(self, doc: Mapping[str, object]) -> Decision:
        """Decide one policy input; failures deny, they never raise."""
        ...

    async def check(self) -> dict[str, object]:
        """Readiness details; raise :class:`~gateway.errors.Unavailable` when broken."""
        ...

    async def close(self) -> None:
        """Release the engine; later decisions deny."""
        ...


# --- the input document ---------------------------------------------------------


def build_policy_input(
    action: Action | str,
    subject: Subject,
    *,
    request_id: str,
    transport: Transport | str,
    source: str,
    command: CommandSpec | None = None,
    file_path: str | None = None,
    file_mode: int | None = None,
    recursive: bool | None = None,
    task_id: str | None = None,
    task_owner: str | None = None,
) -> dict[str, object]:
    """The policy input (version 1) for one request; pure, no validation.

    Sections appear only for their actions (``command`` for command.execute,
    ``file`` for file.*, ``task`` for task.*); a missing section or field is
    the policy's business, and it denies.
    """
    doc: dict[str, object] = {
        "version": POLICY_INPUT_VERSION,
        "action": action,
        "subject": {"id": subject.id, "roles": list(subject.roles), "auth": subject.auth},
        "sandbox": {"network": "full" if command is not None and command.network else "none"},
        "request": {"id": request_id, "transport": transport, "source": source},
    }
    if action == "command.execute" and command is not None:
        doc["command"] = {
            "name": command.name,
            "args": list(command.args),
            "cwd": command.cwd,
            "env": dict(command.env),
            "timeout": command.timeout_s,
        }
    if action.startswith("file.") and file_path is not None:
        file: dict[str, object] = {"path": file_path}
        if file_mode is not None:
            file["mode"] = file_mode
        if recursive is not None:
            file["recursive"] = recursive
        doc["file"] = file
    if action.startswith("task."):
        task: dict[str, object] = {}
        if task_id is not None:
            task["id"] = task_id
        if task_owner is not None:
            task["owner"] = task_owner
        doc["task"] = task
    return doc


def check_policy_input(doc: object) -> str | None:
    """Why ``doc`` cannot be given to a policy engine, or None when it can (pure).

    A policy input is a JSON object of bounded depth and size whose strings
    have no NUL and are valid Unicode and whose numbers are finite with
    |n| <= 2**53 (rego-cpp turns wider integers into 0 and fails on huge floats)
    and, when not zero, |n| >= 1e-9 (rego-cpp reads tinier floats as 0 where OPA
    does not, so the two engines would disagree on ``timeout > 0``).
    """
    if not isinstance(doc, Mapping):
        return f"policy input must be an object, not {type(doc).__name__}"
    nodes = 0
    stack: list[tuple[object, int]] = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        nodes += 1
        if nodes > MAX_INPUT_NODES:
            return f"policy input has more than {MAX_INPUT_NODES} values"
        if depth > MAX_INPUT_DEPTH:
            return f"policy input is nested deeper than {MAX_INPUT_DEPTH}"
        if value is None or isinstance(value, bool):
            continue
        if isinstance(value, str):
            problem = _string_problem(value)
            if problem:
                return problem
        elif isinstance(value, int):
            if abs(value) > MAX_SAFE_INTEGER:
                return f"policy input has an integer out of range ({value})"
        elif isinstance(value, float):
            if not math.isfinite(value):
                return "policy input has a non-finite number"
            if abs(value) > MAX_SAFE_INTEGER or 0 < abs(value) < MIN_NONZERO_FLOAT:
                return f"policy input has a number out of range ({value:g})"
        elif isinstance(value, Mapping):
            for key, item in value.items():
                if not isinstance(key, str):
                    return f"policy input has a non-string key {key!r}"
                problem = _string_problem(key)
                if problem:
                    return problem
                stack.append((item, depth + 1))
        elif isinstance(value, list | tuple):
            stack.extend((item, depth + 1) for item in value)
        else:
            return f"policy input has a value of type {type(value).__name__}"
    return None


def _string_problem(text: str) -> str | None:
    if "\x00" in text:
        return "policy input has a string with a NUL character"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "policy input has a string that is not valid Unicode"
    return None


# --- the decision ---------------------------------------------------------------


def parse_decision(raw: object, engine: str) -> Decision:
    """The :class:`Decision` in a raw ``data.mcp.decision`` result (pure, fails closed).

    ``raw`` must be an object with ``allow`` (bool) and ``deny_reasons`` (list
    of str), optionally ``warnings`` (list of str) and ``limits`` (object with
    string keys). Anything else (undefined, wrong types, allow with reasons)
    is a deny with a reason saying what was wrong; a deny always has a reason.
    """

    def malformed(why: str) -> Decision:
        return Decision.deny(f"malformed policy decision: {why}", engine=engine)

    if raw is None:
        return Decision.deny(f"policy engine error: {DECISION_QUERY} is undefined", engine=engine)
    if not isinstance(raw, Mapping):
        return malformed(f"expected an object, got {type(raw).__name__}")
    allow = raw.get("allow")
    if not isinstance(allow, bool):
        return malformed("allow is not a boolean")
    reasons = raw.get("deny_reasons")
    if not isinstance(reasons, list) or not _all_str(reasons):
        return malformed("deny_reasons is not a list of strings")
    warnings = raw.get("warnings", [])
    if not isinstance(warnings, list) or not _all_str(warnings):
        return malformed("warnings is not a list of strings")
    limits = raw.get("limits", {})
    if not isinstance(limits, Mapping) or not all(isinstance(k, str) for k in limits):
        return malformed("limits is not an object")
    deny_reasons = tuple(str(r) for r in reasons)
    if allow and deny_reasons:
        return Decision(
            allow=False,
            deny_reasons=("malformed policy decision: allow with deny reasons", *deny_reasons),
            engine=engine,
        )
    if not allow and not deny_reasons:
        deny_reasons = ("denied by policy (no reason given)",)
    return Decision(
        allow=allow,
        deny_reasons=deny_reasons,
        warnings=tuple(str(w) for w in warnings),
        limits=dict(limits),
        engine=engine,
    )


def _all_str(items: list[Any]) -> bool:
    return all(isinstance(item, str) for item in items)


# --- loading policy files -------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class PolicySources:
    """The files of one policy directory, read once."""

    modules: tuple[tuple[str, str], ...]  # (path relative to the directory, Rego source)
    data: dict[str, Any]  # every data.json merged at its directory's path
    revision: str  # sha256 over the paths and contents of every loaded file
    files: int


def load_policy_dir(policy_dir: Path) -> PolicySources:
    """Read the Rego modules (not ``*_test.rego``) and ``data.json`` files of a directory.

    Raises :class:`~gateway.errors.FailedPrecondition` when the directory has
    no module, a data file is not a JSON object, two data files disagree, or a
    data string needs JSON escaping (rego-cpp would keep the escapes).
    """
    root = policy_dir.resolve()
    if not root.is_dir():
        raise FailedPrecondition(f"policy directory {policy_dir} does not exist")
    digest = hashlib.sha256()
    modules: list[tuple[str, str]] = []
    data: dict[str, Any] = {}
    files = 0
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if not path.is_file() or any(part.startswith(".") for part in Path(rel).parts):
            continue
        is_module = path.suffix == ".rego" and not path.name.endswith("_test.rego")
        if not is_module and path.name != "data.json":
            continue
        content = path.read_bytes()
        digest.update(f"{rel}\0{len(content)}\0".encode())
        digest.update(content)
        files += 1
        try:
            text = content.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FailedPrecondition(f"policy file {rel} is not UTF-8") from exc
        if is_module:
            modules.append((rel, text))
            continue
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise FailedPrecondition(f"policy data {rel} is not valid JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise FailedPrecondition(f"policy data {rel} must be a JSON object")
        bad = _escaped_string(doc)
        if bad is not None:
            raise FailedPrecondition(
                f"policy data {rel} has a string needing JSON escapes ({bad!r}); "
                "the embedded engine would keep the escapes"
            )
        prefix = [part for part in Path(rel).parent.parts if part != "."]
        _merge_data(data, prefix, doc, rel)
    if not modules:
        raise FailedPrecondition(f"policy directory {policy_dir} has no Rego module")
    return PolicySources(tuple(modules), data, digest.hexdigest(), files)


def _merge_data(target: dict[str, Any], prefix: list[str], doc: dict[str, Any], rel: str) -> None:
    node = target
    for part in prefix:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise FailedPrecondition(f"policy data {rel} conflicts with data at {part!r}")
        node = child
    _deep_merge(node, doc, rel)


def _deep_merge(target: dict[str, Any], doc: dict[str, Any], rel: str) -> None:
    for key, value in doc.items():
        if key not in target:
            target[key] = value
        elif isinstance(target[key], dict) and isinstance(value, dict):
            _deep_merge(target[key], value, rel)
        else:
            raise FailedPrecondition(f"policy data {rel} redefines key {key!r}")


def _escaped_string(value: object) -> str | None:
    """The first string (key or value) JSON would have to escape, if any."""
    if isinstance(value, str):
        if '"' in value or "\\" in value or any(ord(c) < 0x20 for c in value):
            return value
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            found = _escaped_string(key) or _escaped_string(item)
            if found is not None:
                return found
    if isinstance(value, list):
        for item in value:
            found = _escaped_string(item)
            if found is not None:
                return found
    return None


# --- reading rego-cpp output ------------------------------------------------------


class _EngineError(Exception):
    """Evaluation failed inside rego-cpp (a Rego error or an unreadable result)."""


_UNDEFINED: Final = object()

# rego-cpp node kinds (regopy.NodeKind).
_K_TERM: Final = 1002
_K_SCALAR: Final = 1003
_K_ARRAY: Final = 1004
_K_SET: Final = 1005
_K_OBJECT: Final = 1006
_K_OBJECT_ITEM: Final = 1007
_K_INT: Final = 1008
_K_FLOAT: Final = 1009
_K_STRING: Final = 1010
_K_TRUE: Final = 1011
_K_FALSE: Final = 1012
_K_NULL: Final = 1013
_K_UNDEFINED: Final = 1014
_K_TERMS: Final = 1015
_K_RESULTS: Final = 1017
_K_RESULT: Final = 1018
_K_BOOLEAN: Final = 1111


def _node_to_python(impl: Any, depth: int = 0) -> object:
    """Convert one rego-cpp value node to Python, raising _EngineError on anything else."""
    if depth > 64:
        raise _EngineError("result nested too deeply")
    kind = rego_shared.rego_node_type(impl)
    size = rego_shared.rego_node_size(impl)
    if kind in (_K_TERM, _K_SCALAR):
        if size != 1:
            raise _EngineError("malformed term in result")
        return _node_to_python(rego_shared.rego_node_get(impl, 0), depth)
    if kind == _K_STRING:
        return _plain_string(rego_shared.rego_node_value(impl))
    if kind == _K_INT:
        return int(rego_shared.rego_node_value(impl))
    if kind == _K_FLOAT:
        return float(rego_shared.rego_node_value(impl))
    if kind in (_K_BOOLEAN, _K_TRUE, _K_FALSE):
        return rego_shared.rego_node_value(impl) == "true"
    if kind == _K_NULL:
        return None
    if kind in (_K_ARRAY, _K_SET):
        return [_node_to_python(rego_shared.rego_node_get(impl, i), depth + 1) for i in range(size)]
    if kind == _K_OBJECT:
        result: dict[str, object] = {}
        for i in range(size):
            item = rego_shared.rego_node_get(impl, i)
            if rego_shared.rego_node_type(item) != _K_OBJECT_ITEM:
                raise _EngineError("malformed object in result")
            key = _node_to_python(rego_shared.rego_node_get(item, 0), depth + 1)
            if not isinstance(key, str):
                raise _EngineError("non-string object key in result")
            result[key] = _node_to_python(rego_shared.rego_node_get(item, 1), depth + 1)
        return result
    if kind == _K_UNDEFINED:
        raise _EngineError("undefined value inside the result")
    raise _EngineError(f"unexpected node kind {kind} in result")


def _plain_string(value: str) -> str:
    """rego-cpp hands back some strings (built by builtins) still JSON-quoted."""
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        try:
            decoded = json.loads(value)
        except ValueError:
            return value[1:-1]
        if isinstance(decoded, str):
            return decoded
    return value


def _read_output(impl: Any) -> object:
    """The first expression of a rego-cpp output, _UNDEFINED, or _EngineError."""
    if not rego_shared.rego_output_ok(impl):
        message = rego_shared.rego_output_string(impl)
        raise _EngineError(_first_error_line(message))
    root = rego_shared.rego_output_node(impl)
    if rego_shared.rego_node_type(root) == _K_UNDEFINED:
        return _UNDEFINED
    if rego_shared.rego_node_type(root) != _K_RESULTS or rego_shared.rego_node_size(root) < 1:
        raise _EngineError("unexpected result shape")
    result = rego_shared.rego_node_get(root, 0)
    if rego_shared.rego_node_type(result) != _K_RESULT or rego_shared.rego_node_size(result) < 1:
        raise _EngineError("unexpected result shape")
    terms = rego_shared.rego_node_get(result, 0)
    if rego_shared.rego_node_type(terms) != _K_TERMS or rego_shared.rego_node_size(terms) < 1:
        return _UNDEFINED
    return _node_to_python(rego_shared.rego_node_get(terms, 0))


def _first_error_line(message: str) -> str:
    for line in message.splitlines():
        text = line.strip().strip("()")
        if text.startswith("errormsg"):
            return text.split(":", 1)[-1].strip() or "evaluation failed"
    return "evaluation failed"


# --- the embedded engine ----------------------------------------------------------


class _Runtime:
    """One compiled interpreter for one set of sources; one evaluation at a time."""

    def __init__(self, sources: PolicySources) -> None:
        self.sources = sources
        self.lock = threading.Lock()
        self.interpreter = regopy.Interpreter()
        try:
            for name, text in sources.modules:
                self.interpreter.add_module(name, text)
            self.interpreter.add_data_json(json.dumps(sources.data, ensure_ascii=False))
            self.bundle = self.interpreter.build(DECISION_QUERY)
        except regopy.RegoError as exc:
            raise FailedPrecondition(
                f"policy does not compile: {_first_error_line(str(exc))}"
            ) from exc

    def evaluate(self, doc: Mapping[str, object]) -> object:
        """The raw decision for ``doc`` (None when undefined); _EngineError on failure."""
        with self.lock:
            try:
                self.interpreter.set_input(doc)
                impl = rego_shared.rego_bundle_query(self.interpreter._impl, self.bundle._impl)
            except (regopy.RegoError, ValueError, TypeError) as exc:
                raise _EngineError(
                    str(exc).splitlines()[0] if str(exc) else "query failed"
                ) from exc
            try:
                value = _read_output(impl)
            finally:
                rego_shared.rego_free_output(impl)
        return None if value is _UNDEFINED else value


# The canary: an empty input must yield a well-formed deny (missing input denies).
_CANARY: Final[Mapping[str, object]] = {}


def _canary_ok(runtime: _Runtime) -> str | None:
    """Why the runtime fails the canary evaluation, or None."""
    try:
        raw = runtime.evaluate(_CANARY)
    except _EngineError as exc:
        return f"canary evaluation failed: {exc}"
    decision = parse_decision(raw, "canary")
    if decision.allow:
        return "canary evaluation allowed an empty input"
    if any(
        r.startswith(("malformed policy decision", "policy engine error"))
        for r in decision.deny_reasons
    ):
        return f"canary evaluation: {decision.deny_reasons[0]}"
    return None


def _compile(policy_dir: Path) -> _Runtime:
    """Load, compile and canary-check a policy directory (blocking)."""
    runtime = _Runtime(load_policy_dir(policy_dir))
    problem = _canary_ok(runtime)
    if problem is not None:
        raise FailedPrecondition(f"policy rejected: {problem}")
    return runtime


class EmbeddedEngine:
    """In-process Rego (regopy) over the policy directory; see the module docstring."""

    name = "embedded"

    def __init__(self, policy_dir: Path, *, timeout_s: float) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self.policy_dir = Path(policy_dir)
        self.timeout_s = timeout_s
        self._swap_lock = threading.Lock()  # guards _runtime and _executor
        self._closed = False
        self._stuck: list[concurrent.futures.Future[object]] = []
        self._loaded_at = time.time()
        try:
            self._runtime = _compile(self.policy_dir)
        except FailedPrecondition as exc:
            raise Unavailable(f"policy engine unavailable: {exc.message}") from exc
        self._executor = self._new_executor()

    @staticmethod
    def _new_executor() -> concurrent.futures.ThreadPoolExecutor:
        return concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="policy")

    @property
    def revision(self) -> str:
        """sha256 of the loaded policy files."""
        return self._runtime.sources.revision

    async def decide(self, doc: Mapping[str, object]) -> Decision:
        """Evaluate ``data.mcp.decision``; any failure or timeout is a deny."""
        problem = check_policy_input(doc)
        if problem is not None:
            return self._stamp(Decision.deny(f"policy input rejected: {problem}"), self.revision)
        for _attempt in range(2):
            runtime, executor = self._runtime, self._executor
            if self._closed:
                break
            try:
                future = executor.submit(runtime.evaluate, doc)
            except RuntimeError:  # a timeout swapped the executor just now: use the new one
                continue
            return await self._await(runtime, future)
        return self._stamp(Decision.deny("policy engine error: engine is closed"), self.revision)

    async def _await(
        self, runtime: _Runtime, future: concurrent.futures.Future[object]
    ) -> Decision:
        revision = runtime.sources.revision
        try:
            raw = await asyncio.wait_for(asyncio.wrap_future(future), self.timeout_s)
        except TimeoutError:
            # wait_for cancelled the future: that only works while it is queued.
            if future.cancelled():
                log.warning("policy engine busy", timeout_s=self.timeout_s)
                reason = f"no evaluation slot within {self.timeout_s:g}s (engine busy)"
            else:
                log.warning("policy evaluation timed out", timeout_s=self.timeout_s)
                await self._abandon(runtime, future)
                reason = f"evaluation timed out after {self.timeout_s:g}s"
            return self._stamp(Decision.deny(f"policy engine error: {reason}"), revision)
        except _EngineError as exc:
            log.warning("policy evaluation failed", error=str(exc), revision=revision)
            return self._stamp(Decision.deny(f"policy engine error: {exc}"), revision)
        except Exception as exc:  # fail closed on anything unexpected, never raise
            log.exception("policy evaluation crashed", revision=revision)
            return self._stamp(
                Decision.deny(f"policy engine error: {type(exc).__name__}: {exc}"), revision
            )
        return self._stamp(parse_decision(raw, self.name), revision)

    def _stamp(self, decision: Decision, revision: str) -> Decision:
        return dataclasses.replace(
            decision, engine=self.name, revision=revision, decision_id=uuid.uuid4().hex
        )

    async def _abandon(self, runtime: _Runtime, future: concurrent.futures.Future[object]) -> None:
        """Leave a stuck evaluation behind; a fresh interpreter and thread take over."""
        if not future.done():
            self._stuck.append(future)
        if self._runtime is not runtime:
            return  # someone already replaced it
        try:
            fresh = await asyncio.to_thread(_Runtime, runtime.sources)
        except FailedPrecondition:  # compiled before, so only a resource problem
            log.exception("policy engine could not replace a stuck interpreter")
            return
        with self._swap_lock:
            if self._runtime is runtime and not self._closed:
                old_executor = self._executor
                self._runtime = fresh
                self._executor = self._new_executor()
                # Queued evaluations stay queued behind the stuck one: their
                # callers time out as "busy"; the thread exits when it is done.
                old_executor.shutdown(wait=False)

    async def reload(self) -> str:
        """Compile the policy directory again and swap it in; return the new revision.

        A directory that does not load, compile or pass the canary leaves the
        running policy in place and raises :class:`~gateway.errors.FailedPrecondition`.
        """
        try:
            fresh = await asyncio.to_thread(_compile, self.policy_dir)
        except FailedPrecondition as exc:
            log.exception(
                "policy reload failed; keeping the loaded policy",
                error=exc.message,
                revision=self.revision,
            )
            raise
        with self._swap_lock:
            old = self._runtime.sources.revision
            self._runtime = fresh
            self._loaded_at = time.time()
        log.info("policy reloaded", revision=fresh.sources.revision, previous=old)
        return fresh.sources.revision

    async def check(self) -> dict[str, object]:
        """Readiness: the canary evaluates in time and few evaluations are stuck."""
        if self._closed:
            raise Unavailable("policy engine is closed")
        self._stuck = [f for f in self._stuck if not f.done()]
        if len(self._stuck) >= MAX_STUCK_EVALUATIONS:
            raise Unavailable(f"policy engine has {len(self._stuck)} stuck evaluations")
        decision = await self.decide(_CANARY)
        if decision.allow or any(
            r.startswith(("policy engine error", "malformed policy decision"))
            for r in decision.deny_reasons
        ):
            raise Unavailable(f"policy engine unhealthy: {'; '.join(decision.deny_reasons)}")
        runtime = self._runtime
        return {
            "engine": self.name,
            "revision": runtime.sources.revision,
            "modules": len(runtime.sources.modules),
            "files": runtime.sources.files,
            "loaded_at": self._loaded_at,
            "stuck_evaluations": len(self._stuck),
        }

    async def close(self) -> None:
        """Stop the worker thread; later decisions deny."""
        with self._swap_lock:
            self._closed = True
            executor = self._executor
        executor.shutdown(wait=False, cancel_futures=True)

    def __repr__(self) -> str:
        return f"EmbeddedEngine({str(self.policy_dir)!r}, revision={self.revision[:12]})"
