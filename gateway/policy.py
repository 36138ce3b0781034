"""The policy seam: the input document, the decision, and the engines that decide.

Every request becomes one *policy input* (version 1, built by the pure
:func:`build_policy_input`), one engine evaluates ``data.mcp.decision`` over it,
and :func:`parse_decision` turns whatever came back into a
:class:`~gateway.models.Decision`, failing closed: anything malformed is a deny
with a reason. The Rego policies live in ``policies/`` (see ``docs/policy.md``).

:class:`EmbeddedEngine` runs the policies in-process, compiled by OPA itself
to WebAssembly and evaluated with wasmtime (:mod:`gateway.wasm`):

* It loads every ``*.rego`` file except ``*_test.rego`` and every ``data.json``
  under the policy directory (each merged at its directory's path, as OPA does),
  compiles them once with ``opa build -t wasm`` (the same compiler as the OPA
  daemon, hence the same decisions) and checks the result with a canary input.
  The revision is the sha256 of the loaded files; every decision carries it.
* Evaluation runs inline on the caller's thread: one decision takes tens to a
  few hundred microseconds, less than handing it to a worker thread would
  cost.  After ``timeout_s`` a runaway evaluation is interrupted (wasmtime's
  epoch deadline) and denied ("policy engine error: evaluation timed out");
  one that exhausts the module's memory cap is denied too.
* :meth:`EmbeddedEngine.reload` compiles the files again and swaps the new
  module in atomically only if it compiles and passes the canary; a broken
  policy keeps the old one and raises.

:func:`check_policy_input` still refuses integers beyond 2**53, floats below
1e-9 and NUL characters: the input document stays within what every Rego
engine (and JSON implementation) reads the same way.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import math
import secrets
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Literal, Protocol, runtime_checkable

import structlog

from gateway.errors import FailedPrecondition, Unavailable
from gateway.models import CommandSpec, Decision, Subject, Transport
from gateway.wasm import (
    EvaluationTimeout,
    PolicyBuildError,
    WasmError,
    WasmPolicy,
    compile_policy,
)

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
    probe: bool | None = None,
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
        if probe is not None:
            file["probe"] = probe
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
    |n| <= 2**53 (some Rego engines turn wider integers into 0 or fail on huge floats)
    and, when not zero, |n| >= 1e-9 (some engines read tinier floats as 0 where OPA
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
    if text.isascii():  # the usual case; only non-ASCII text can hold a lone surrogate
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "policy input has a string that is not valid Unicode"
    return None


# --- the decision ---------------------------------------------------------------


def parse_decision(
    raw: object, engine: str, *, revision: str | None = None, decision_id: str | None = None
) -> Decision:
    """The :class:`Decision` in a raw ``data.mcp.decision`` result (pure, fails closed).

    ``raw`` must be an object with ``allow`` (bool) and ``deny_reasons`` (list
    of str), optionally ``warnings`` (list of str) and ``limits`` (object with
    string keys). Anything else (undefined, wrong types, allow with reasons)
    is a deny with a reason saying what was wrong; a deny always has a reason.
    Every decision returned carries ``engine``, ``revision`` and ``decision_id``.
    """

    def deny(*reasons: str) -> Decision:
        return Decision(
            allow=False,
            deny_reasons=reasons,
            engine=engine,
            revision=revision,
            decision_id=decision_id,
        )

    def malformed(why: str) -> Decision:
        return deny(f"malformed policy decision: {why}")

    if raw is None:
        return deny(f"policy engine error: {DECISION_QUERY} is undefined")
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
        return deny("malformed policy decision: allow with deny reasons", *deny_reasons)
    if not allow and not deny_reasons:
        deny_reasons = ("denied by policy (no reason given)",)
    return Decision(
        allow=allow,
        deny_reasons=deny_reasons,
        warnings=tuple(str(w) for w in warnings),
        limits=dict(limits),
        engine=engine,
        revision=revision,
        decision_id=decision_id,
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
    no module, a data file is not a JSON object, or two data files disagree.
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


# --- the embedded engine ----------------------------------------------------------


class _Runtime:
    """One compiled policy module for one set of sources."""

    def __init__(self, sources: PolicySources, opa_binary: str) -> None:
        self.sources = sources
        try:
            wasm = compile_policy(sources.modules, sources.data, opa=opa_binary)
            self.policy = WasmPolicy(wasm, sources.data)
        except PolicyBuildError as exc:
            raise FailedPrecondition(f"policy does not compile: {exc}") from exc
        except WasmError as exc:
            raise FailedPrecondition(f"policy cannot be loaded: {exc}") from exc

    def evaluate(self, doc: Mapping[str, object], timeout_s: float) -> object:
        """The raw decision for ``doc`` (None when undefined); WasmError on failure."""
        defined, value = self.policy.evaluate(doc, timeout_s)
        return value if defined else None

    def close(self) -> None:
        self.policy.close()


# The canary: an empty input must yield a well-formed deny (missing input denies).
_CANARY: Final[Mapping[str, object]] = {}


def _canary_ok(runtime: _Runtime, timeout_s: float) -> str | None:
    """Why the runtime fails the canary evaluation, or None."""
    try:
        raw = runtime.evaluate(_CANARY, timeout_s)
    except WasmError as exc:
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


def _compile(policy_dir: Path, opa_binary: str, timeout_s: float) -> _Runtime:
    """Load, compile and canary-check a policy directory (blocking)."""
    runtime = _Runtime(load_policy_dir(policy_dir), opa_binary)
    problem = _canary_ok(runtime, timeout_s)
    if problem is not None:
        runtime.close()
        raise FailedPrecondition(f"policy rejected: {problem}")
    return runtime


class EmbeddedEngine:
    """In-process Rego: the policy directory compiled by OPA to Wasm, run by wasmtime.

    Evaluations run on the caller's thread (the event loop): one takes tens
    to a few hundred microseconds, less than a thread hop would add.  A
    runaway evaluation is interrupted after ``timeout_s`` (wasmtime's epoch
    deadline) and denied; the loop is blocked for at most that long.
    ``opa_binary`` (a name on PATH or a path) compiles the policies, at
    start-up and on every reload.
    """

    name = "embedded"

    def __init__(self, policy_dir: Path, *, timeout_s: float, opa_binary: str = "opa") -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self.policy_dir = Path(policy_dir)
        self.timeout_s = timeout_s
        self.opa_binary = opa_binary
        self._swap_lock = threading.Lock()  # guards _runtime
        self._closed = False
        self._loaded_at = time.time()
        try:
            self._runtime = _compile(self.policy_dir, opa_binary, timeout_s)
        except FailedPrecondition as exc:
            raise Unavailable(f"policy engine unavailable: {exc.message}") from exc

    @property
    def revision(self) -> str:
        """sha256 of the loaded policy files."""
        return self._runtime.sources.revision

    async def decide(self, doc: Mapping[str, object]) -> Decision:
        """Evaluate ``data.mcp.decision``; any failure or timeout is a deny."""
        runtime = self._runtime
        revision = runtime.sources.revision
        if self._closed:
            return self._stamp(Decision.deny("policy engine error: engine is closed"), revision)
        problem = check_policy_input(doc)
        if problem is not None:
            return self._stamp(Decision.deny(f"policy input rejected: {problem}"), revision)
        try:
            raw = runtime.evaluate(doc, self.timeout_s)
        except EvaluationTimeout as exc:
            log.warning("policy evaluation timed out", timeout_s=self.timeout_s)
            return self._stamp(Decision.deny(f"policy engine error: {exc}"), revision)
        except WasmError as exc:
            log.warning("policy evaluation failed", error=str(exc), revision=revision)
            return self._stamp(Decision.deny(f"policy engine error: {exc}"), revision)
        except Exception as exc:  # fail closed on anything unexpected, never raise
            log.exception("policy evaluation crashed", revision=revision)
            return self._stamp(
                Decision.deny(f"policy engine error: {type(exc).__name__}: {exc}"), revision
            )
        return parse_decision(raw, self.name, revision=revision, decision_id=secrets.token_hex(16))

    def _stamp(self, decision: Decision, revision: str) -> Decision:
        return dataclasses.replace(
            decision, engine=self.name, revision=revision, decision_id=secrets.token_hex(16)
        )

    async def reload(self) -> str:
        """Compile the policy directory again and swap it in; return the new revision.

        A directory that does not load, compile or pass the canary leaves the
        running policy in place and raises :class:`~gateway.errors.FailedPrecondition`.
        """
        try:
            fresh = await asyncio.to_thread(
                _compile, self.policy_dir, self.opa_binary, self.timeout_s
            )
        except FailedPrecondition as exc:
            log.exception(
                "policy reload failed; keeping the loaded policy",
                error=exc.message,
                revision=self.revision,
            )
            raise
        with self._swap_lock:
            old = self._runtime
            self._runtime = fresh
            self._loaded_at = time.time()
        old.close()
        log.info("policy reloaded", revision=fresh.sources.revision, previous=old.sources.revision)
        return fresh.sources.revision

    async def check(self) -> dict[str, object]:
        """Readiness: the canary evaluates to a well-formed deny."""
        if self._closed:
            raise Unavailable("policy engine is closed")
        decision = await self.decide(_CANARY)
        if decision.allow or any(
            r.startswith(("policy engine error", "malformed policy decision"))
            for r in decision.deny_reasons
        ):
            raise Unavailable(f"policy engine unhealthy: {'; '.join(decision.deny_reasons)}")
        runtime = self._runtime
        return {
            "engine": self.name,
            "runtime": "opa-wasm",
            "revision": runtime.sources.revision,
            "modules": len(runtime.sources.modules),
            "files": runtime.sources.files,
            "loaded_at": self._loaded_at,
        }

    async def close(self) -> None:
        """Release the module; later decisions deny."""
        with self._swap_lock:
            self._closed = True
            runtime = self._runtime
        runtime.close()

    def __repr__(self) -> str:
        return f"EmbeddedEngine({str(self.policy_dir)!r}, revision={self.revision[:12]})"
