"""The OPA-daemon policy engine: ``data.mcp.decision`` asked of a local OPA server.

:class:`OpaEngine` implements :class:`~gateway.policy.PolicyEngine` over OPA's
REST data API (``POST /v1/data/mcp/decision?provenance`` with
``{"input": doc}``), on a unix socket (``unix:///run/opa/opa.sock``, the
default) or a loopback ``http://`` / ``https://`` URL.

* One :class:`aiohttp.ClientSession` (created on first use, inside the running
  loop) keeps a pool of persistent connections to OPA.
* Every decision is bounded by ``timeout_s`` (:func:`asyncio.timeout`) and
  fails closed: an input :func:`~gateway.policy.check_policy_input` rejects, a
  refused connection, a timeout, an HTTP error, an undefined result (no
  ``result`` key) or a malformed one (:func:`~gateway.policy.parse_decision`)
  is a deny whose reason starts with ``policy engine error`` (or ``malformed
  policy decision`` / ``policy input rejected``). :meth:`OpaEngine.decide`
  never raises.
* A pooled connection OPA closed (OPA restarted) is retried once on a fresh
  connection within the same deadline; a decision is a pure read, so this is
  safe.
* ``Decision.decision_id`` is OPA's ``decision_id`` (present when decision
  logging is on, so the gateway audit log and OPA's decision log can be
  joined); ``Decision.revision`` is the bundle revision OPA reports through
  ``?provenance`` (``name:revision`` pairs, sorted, comma-joined) when OPA
  serves bundles, otherwise the sha256 revision of ``policy_dir``
  (:func:`~gateway.policy.load_policy_dir`), computed when the engine is built
  and again by :meth:`OpaEngine.reload` (on SIGHUP and whenever the gateway's
  policy watch sees the files change), otherwise None.  With ``opa run
  --watch`` on the same directory, a decision made in the moment between
  OPA's reload and the gateway's next look (``policy.watch_interval_s``)
  still carries the previous revision.
* An optional bearer token is sent as ``Authorization: Bearer ...`` for an OPA
  run with ``--authentication=token``.
* :meth:`OpaEngine.check` asks ``GET /health?bundles&plugins`` and then
  decides the empty canary input, which must be a policy deny; anything else
  raises :class:`~gateway.errors.Unavailable`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import aiohttp
import structlog

from gateway.errors import FailedPrecondition, Unavailable
from gateway.models import Decision
from gateway.policy import check_policy_input, load_policy_dir, parse_decision

log = structlog.get_logger("gateway.opa")

DEFAULT_OPA_URL: Final = "unix:///run/opa/opa.sock"
DEFAULT_DECISION_PATH: Final = "mcp/decision"
_MAX_ERROR_TEXT: Final = 200
_CANARY: Final[Mapping[str, object]] = {}


class _OpaError(Exception):
    """A failure talking to OPA; the message becomes the deny reason."""


class OpaEngine:
    """``data.mcp.decision`` from an OPA daemon; see the module docstring."""

    name = "opa"

    def __init__(
        self,
        url: str = DEFAULT_OPA_URL,
        *,
        timeout_s: float,
        token: str | None = None,
        policy_dir: Path | None = None,
        decision_path: str = DEFAULT_DECISION_PATH,
        pool_size: int = 32,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        parts = urlsplit(url)
        if parts.scheme == "unix":
            if parts.netloc or not parts.path.startswith("/"):
                raise ValueError(f"OPA unix URL must be unix:///absolute/path, not {url!r}")
            self._socket: str | None = parts.path
            self._base = "http://opa"
        elif parts.scheme in ("http", "https") and parts.hostname:
            self._socket = None
            self._base = url.rstrip("/")
        else:
            raise ValueError(f"OPA URL must be unix:///path or http(s)://host:port, not {url!r}")
        path = decision_path.strip("/")
        if not path or any(not part for part in path.split("/")):
            raise ValueError(f"bad decision path {decision_path!r}")
        self.url = url
        self.timeout_s = timeout_s
        self.decision_path = path
        self.query = "data." + path.replace("/", ".")
        self._decision_url = f"{self._base}/v1/data/{path}?provenance"
        self._health_url = f"{self._base}/health?bundles&plugins"
        self._headers = {"Content-Type": "application/json"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._pool_size = pool_size
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self.local_revision: str | None = None
        self._policy_dir = None if policy_dir is None else Path(policy_dir)
        if self._policy_dir is not None:
            try:
                self.local_revision = load_policy_dir(self._policy_dir).revision
            except FailedPrecondition as exc:
                raise Unavailable(f"policy engine unavailable: {exc.message}") from exc

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector: aiohttp.BaseConnector
            if self._socket is not None:
                connector = aiohttp.UnixConnector(path=self._socket, limit=self._pool_size)
            else:
                connector = aiohttp.TCPConnector(limit=self._pool_size)
            self._session = aiohttp.ClientSession(
                connector=connector, headers=self._headers, raise_for_status=False
            )
        return self._session

    # --- deciding --------------------------------------------------------------------------

    async def decide(self, doc: Mapping[str, object]) -> Decision:
        """Ask OPA for the decision; any failure or timeout is a deny (never raises)."""
        revision = self.local_revision
        problem = check_policy_input(doc)
        if problem is not None:
            return self._stamp(Decision.deny(f"policy input rejected: {problem}"), None, revision)
        if self._closed:
            return self._stamp(
                Decision.deny("policy engine error: engine is closed"), None, revision
            )
        try:
            body = json.dumps({"input": doc}, ensure_ascii=False, allow_nan=False)
            async with asyncio.timeout(self.timeout_s):
                reply = await self._post(body.encode("utf-8"))
        except TimeoutError:
            log.warning("OPA decision timed out", timeout_s=self.timeout_s, url=self.url)
            reason = f"OPA did not answer within {self.timeout_s:g}s"
            return self._stamp(Decision.deny(f"policy engine error: {reason}"), None, revision)
        except _OpaError as exc:
            log.warning("OPA decision failed", error=str(exc), url=self.url)
            return self._stamp(Decision.deny(f"policy engine error: {exc}"), None, revision)
        except Exception as exc:  # fail closed on anything unexpected, never raise
            log.exception("OPA decision crashed", url=self.url)
            reason = f"policy engine error: OPA {type(exc).__name__}: {exc}"
            return self._stamp(Decision.deny(reason), None, revision)
        decision_id = reply.get("decision_id")
        decision_id = decision_id if isinstance(decision_id, str) and decision_id else None
        revision = _bundle_revision(reply.get("provenance")) or revision
        if "result" not in reply:
            reason = f"policy engine error: {self.query} is undefined"
            return self._stamp(Decision.deny(reason), decision_id, revision)
        raw = reply["result"]
        if raw is None:  # a defined null is malformed, not undefined
            decision = Decision.deny("malformed policy decision: expected an object, got null")
        else:
            decision = parse_decision(raw, self.name)
        return self._stamp(decision, decision_id, revision)

    async def _post(self, body: bytes) -> dict[str, Any]:
        """POST the input and return the JSON reply object; retry once on a dead pooled link."""
        session = self._client()
        for attempt in range(2):
            try:
                async with session.post(self._decision_url, data=body) as resp:
                    text = await resp.text(encoding="utf-8", errors="replace")
                    status = resp.status
                break
            except aiohttp.ServerDisconnectedError as exc:
                if attempt:
                    raise _OpaError(f"OPA closed the connection ({self.url})") from exc
            except aiohttp.ClientConnectionError as exc:
                raise _OpaError(f"OPA is unreachable at {self.url}: {exc}") from exc
        if status != 200:
            raise _OpaError(f"OPA answered HTTP {status}: {_error_text(text)}")
        try:
            reply = json.loads(text)
        except json.JSONDecodeError as exc:
            raise _OpaError(f"OPA answered with invalid JSON: {exc}") from exc
        if not isinstance(reply, dict):
            raise _OpaError("OPA answered with a JSON value that is not an object")
        return reply

    def _stamp(self, decision: Decision, decision_id: str | None, revision: str | None) -> Decision:
        return Decision(
            allow=decision.allow,
            deny_reasons=decision.deny_reasons,
            warnings=decision.warnings,
            limits=decision.limits,
            engine=self.name,
            decision_id=decision_id,
            revision=revision,
        )

    # --- readiness and shutdown --------------------------------------------------------------

    async def check(self) -> dict[str, object]:
        """Readiness: OPA's /health is 200 and the canary input is a policy deny."""
        if self._closed:
            raise Unavailable("policy engine is closed")
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout_s):
                async with self._client().get(self._health_url) as resp:
                    status = resp.status
                    text = await resp.text(encoding="utf-8", errors="replace")
        except TimeoutError as exc:
            raise Unavailable(f"OPA health check timed out after {self.timeout_s:g}s") from exc
        except aiohttp.ClientError as exc:
            raise Unavailable(f"OPA is unreachable at {self.url}: {exc}") from exc
        if status != 200:
            raise Unavailable(f"OPA is not healthy (HTTP {status}): {_error_text(text)}")
        try:
            health: object = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError:
            health = text[:_MAX_ERROR_TEXT]
        canary = await self.decide(_CANARY)
        if canary.allow or any(
            r.startswith(("policy engine error", "malformed policy decision"))
            for r in canary.deny_reasons
        ):
            raise Unavailable(f"policy engine unhealthy: {'; '.join(canary.deny_reasons)}")
        return {
            "engine": self.name,
            "url": self.url,
            "query": self.query,
            "revision": canary.revision,
            "health": health,
            "latency_s": round(time.monotonic() - started, 6),
        }

    async def reload(self) -> str:
        """Recompute the revision of ``policy_dir`` (OPA itself reloads with ``--watch``).

        Called on SIGHUP and when the policy files change (the gateway's
        policy watch), so decisions record the revision of the files OPA
        watches rather than the one at start-up.  Raises FailedPrecondition
        (the old revision stays) when the directory cannot be read; without
        a ``policy_dir`` there is nothing to recompute.
        """
        if self._policy_dir is None:
            return self.local_revision or ""
        sources = await asyncio.to_thread(load_policy_dir, self._policy_dir)
        self.local_revision = sources.revision
        return sources.revision

    async def close(self) -> None:
        """Close the connection pool; later decisions deny."""
        self._closed = True
        if self._session is not None:
            await self._session.close()

    def __repr__(self) -> str:
        return f"OpaEngine({self.url!r}, query={self.query!r})"


def _bundle_revision(provenance: object) -> str | None:
    """``name:revision`` of each bundle OPA reports in ``provenance.bundles``, or None."""
    if not isinstance(provenance, Mapping):
        return None
    bundles = provenance.get("bundles")
    if not isinstance(bundles, Mapping) or not bundles:
        return None
    pairs = []
    for name, info in sorted(bundles.items()):
        rev = info.get("revision") if isinstance(info, Mapping) else None
        pairs.append(f"{name}:{rev if isinstance(rev, str) else ''}")
    return ",".join(pairs)


def _error_text(text: str) -> str:
    """OPA's ``code: message`` from an error body, else the start of the body."""
    try:
        body = json.loads(text)
    except json.JSONDecodeError:
        body = None
    if isinstance(body, dict) and "code" in body:
        text = f"{body.get('code')}: {body.get('message', '')}"
    text = " ".join(text.split())
    return text[:_MAX_ERROR_TEXT] or "(empty body)"
