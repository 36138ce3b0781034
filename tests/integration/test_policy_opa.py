"""The real ``policies/`` through a real OPA daemon (OpaEngine over a unix socket)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from gateway.app import make_policy
from gateway.errors import Unavailable
from gateway.opa import OpaEngine
from gateway.policy import EmbeddedEngine, load_policy_dir
from tests.conftest import POLICIES, make_config
from tests.integration.test_policy_embedded import (
    CASES,
    DEVELOPER_LIMITS,
    MALFORMED,
    _random_inputs,
    command,
    policy_inputs,
)

pytestmark = pytest.mark.integration

OPA = Path(__file__).resolve().parents[2] / ".tools" / "bin" / "opa"
CORPUS_SIZE = 2000


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("opa", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class OpaDaemon:
    """One ``opa run --server`` on a private unix socket, started, killed and restarted for real."""

    def __init__(
        self,
        policy_dir: Path,
        workdir: Path,
        *,
        watch: bool = False,
        extra: tuple[str, ...] = (),
    ) -> None:
        if not OPA.exists():
            pytest.fail(f"OPA is not built at {OPA}: run `make opa` first", pytrace=False)
        self.policy_dir = policy_dir
        self.workdir = workdir
        self.socket = workdir / "opa.sock"
        self.log = workdir / "opa.log"
        self.watch = watch
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self) -> None:
        argv = [
            str(OPA), "run", "--server",
            "--addr", f"unix://{self.socket}", "--unix-socket-perm", "0600",
            "--log-format", "json", "--set", "decision_logs.console=true",
        ]  # fmt: skip
        if self.watch:
            argv.append("--watch")
        argv += [*self.extra, str(self.policy_dir)]
        with self.log.open("ab") as log_file:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(
                    f"OPA exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}"
                )
            if self.health() in (200, 401):  # 401: up, behind --authentication=token
                return
            time.sleep(0.05)
        pytest.fail(f"OPA did not become healthy: {self.log.read_text()[-2000:]}")

    def health(self) -> int | None:
        conn = _UnixHTTPConnection(str(self.socket), timeout=1.0)
        try:
            conn.request("GET", "/health")
            return conn.getresponse().status
        except OSError:
            return None
        finally:
            conn.close()

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def wait_stopped(self, timeout_s: float = 5.0) -> None:
        """Wait until every OPA thread is in stopped state (SIGSTOP is asynchronous)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        states: set[str] = set()
        while time.monotonic() < deadline:
            states = set()
            for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
                with contextlib.suppress(FileNotFoundError):  # a thread that just exited
                    states.add((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
            if states == {"T"}:
                return
            time.sleep(0.01)
        pytest.fail(f"OPA did not stop: thread states {states}")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A private directory with a short path (unix socket paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="opa-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def opa() -> Iterator[OpaDaemon]:
    """OPA serving policies/ for the whole module."""
    workdir = Path(tempfile.mkdtemp(prefix="opa-"))
    daemon = OpaDaemon(POLICIES, workdir)
    daemon.start()
    yield daemon
    daemon.stop()
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def own_opa(short_dir: Path) -> Iterator[OpaDaemon]:
    """An OPA of this test's own, which the test may kill, stop or restart."""
    daemon = OpaDaemon(POLICIES, short_dir)
    daemon.start()
    yield daemon
    daemon.stop()


@pytest.fixture
async def engine(opa: OpaDaemon) -> AsyncIterator[OpaEngine]:
    eng = OpaEngine(opa.url, timeout_s=5.0, policy_dir=POLICIES)
    yield eng
    await eng.close()


def as_dict(decision: Any) -> dict[str, Any]:
    return {
        "allow": decision.allow,
        "deny_reasons": sorted(decision.deny_reasons),
        "warnings": list(decision.warnings),
        "limits": decision.limits,
    }


# --- the default policy ------------------------------------------------------------------


async def test_allow_carries_decision_id_and_revision(engine: OpaEngine) -> None:
    """An allowed echo for a developer carries OPA's decision_id, the revision and the limits."""
    decision = await engine.decide(command("echo", "hi"))
    assert decision.allow, decision.deny_reasons
    assert decision.engine == "opa"
    assert decision.decision_id
    assert decision.revision == load_policy_dir(POLICIES).revision
    assert decision.limits == DEVELOPER_LIMITS
    second = await engine.decide(command("echo", "hi"))
    assert second.decision_id != decision.decision_id


async def test_deny_with_reasons(engine: OpaEngine) -> None:
    """A denied command carries the policy's reason and a decision_id."""
    decision = await engine.decide(command("sh", "-c", "id"))
    assert not decision.allow
    assert decision.deny_reasons == ("argument '-c' to 'sh' executes code",)
    assert decision.decision_id


@pytest.mark.parametrize(
    ("doc", "allow", "reason"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
async def test_default_policy(
    engine: OpaEngine, doc: dict[str, object], allow: bool, reason: str | None
) -> None:
    """The shipped policy decides through OPA as it does embedded (the documented cases)."""
    decision = await engine.decide(doc)
    assert decision.allow is allow, decision.deny_reasons
    if reason is not None:
        assert reason in decision.deny_reasons


async def test_invalid_input_denies_without_asking_opa(engine: OpaEngine) -> None:
    """An input check_policy_input rejects (NUL, huge integer) is denied before OPA sees it."""
    nul = await engine.decide(command("echo", "a\x00b"))
    assert nul.deny_reasons[0].startswith("policy input rejected: ")
    assert nul.decision_id is None
    huge = await engine.decide({**command("echo"), "version": 2**70})
    assert huge.deny_reasons[0].startswith("policy input rejected: ")


async def test_check_reports_health(engine: OpaEngine) -> None:
    """check() reports OPA's health and the revision of a healthy daemon."""
    details = await engine.check()
    assert details["engine"] == "opa"
    assert details["revision"] == load_policy_dir(POLICIES).revision
    assert details["health"] == {}


async def test_closed_engine_denies(opa: OpaDaemon) -> None:
    """After close() every decision is a deny and check() reports unavailable."""
    eng = OpaEngine(opa.url, timeout_s=5.0)
    assert (await eng.decide(command("echo"))).allow
    await eng.close()
    assert (await eng.decide(command("echo"))).deny_reasons == (
        "policy engine error: engine is closed",
    )
    with pytest.raises(Unavailable):
        await eng.check()


# --- failures -----------------------------------------------------------------------------


async def test_killed_opa_denies_and_recovers_on_restart(own_opa: OpaDaemon) -> None:
    """SIGKILLed OPA: decisions deny naming the engine, check() fails; a restart recovers."""
    eng = OpaEngine(own_opa.url, timeout_s=2.0)
    try:
        assert (await eng.decide(command("echo"))).allow  # a pooled connection now exists
        own_opa.kill()
        decision = await eng.decide(command("echo"))
        assert not decision.allow
        assert decision.deny_reasons[0].startswith("policy engine error: OPA"), decision
        with pytest.raises(Unavailable, match="OPA"):
            await eng.check()
        own_opa.start()
        assert (await eng.decide(command("echo"))).allow
        assert (await eng.check())["engine"] == "opa"
    finally:
        await eng.close()


async def test_unreachable_opa_denies(short_dir: Path) -> None:
    """No OPA at all (no socket): a deny naming the engine, and check() is unavailable."""
    eng = OpaEngine(f"unix://{short_dir}/missing.sock", timeout_s=1.0)
    try:
        decision = await eng.decide(command("echo"))
        assert decision.deny_reasons[0].startswith("policy engine error: OPA is unreachable")
        with pytest.raises(Unavailable):
            await eng.check()
    finally:
        await eng.close()


async def test_stopped_opa_times_out(own_opa: OpaDaemon) -> None:
    """A SIGSTOPped (hung) OPA is a timeout deny within the deadline; SIGCONT recovers."""
    eng = OpaEngine(own_opa.url, timeout_s=0.3)
    try:
        assert (await eng.decide(command("echo"))).allow
        own_opa.signal(signal.SIGSTOP)
        try:
            own_opa.wait_stopped()
            started = time.monotonic()
            decision = await eng.decide(command("echo"))
            elapsed = time.monotonic() - started
            assert decision.deny_reasons == ("policy engine error: OPA did not answer within 0.3s",)
            assert elapsed < 1.0
            with pytest.raises(Unavailable, match="timed out"):
                await eng.check()
        finally:
            own_opa.signal(signal.SIGCONT)
        assert (await eng.decide(command("echo"))).allow
    finally:
        await eng.close()


async def test_undefined_decision_denies(opa: OpaDaemon) -> None:
    """A decision path the policy does not define (no "result") is a deny, as is check()."""
    eng = OpaEngine(opa.url, timeout_s=2.0, decision_path="mcp/no_such_rule")
    try:
        decision = await eng.decide(command("echo"))
        assert decision.deny_reasons == ("policy engine error: data.mcp.no_such_rule is undefined",)
        assert decision.decision_id
        with pytest.raises(Unavailable, match="undefined"):
            await eng.check()
    finally:
        await eng.close()


async def test_malformed_decision_denies(opa: OpaDaemon) -> None:
    """A defined result that is not a decision object (here data.gateway) is a malformed deny."""
    eng = OpaEngine(opa.url, timeout_s=2.0, decision_path="gateway/roles")
    try:
        decision = await eng.decide(command("echo"))
        assert not decision.allow
        assert decision.deny_reasons[0].startswith("malformed policy decision: ")
    finally:
        await eng.close()


TOY_POLICY = """package mcp

decision := {"allow": input.allow_value, "deny_reasons": [], "warnings": [], "limits": {}} if {
	input.bad_shape == true
}

decision := {"allow": true, "deny_reasons": [], "warnings": [], "limits": {}} if input.conflict

decision := {"allow": false, "deny_reasons": ["x"], "warnings": [], "limits": {}} if input.conflict
"""


async def test_bad_shape_and_eval_errors_deny(short_dir: Path) -> None:
    """A second OPA on a toy policy: wrong types, OPA eval errors (HTTP 500), undefined all deny."""
    policy_dir = short_dir / "toy"
    policy_dir.mkdir()
    (policy_dir / "toy.rego").write_text(TOY_POLICY)
    daemon = OpaDaemon(policy_dir, short_dir)
    daemon.start()
    eng = OpaEngine(daemon.url, timeout_s=2.0)
    try:
        bad = await eng.decide({"bad_shape": True, "allow_value": "yes"})
        assert bad.deny_reasons == ("malformed policy decision: allow is not a boolean",)
        conflict = await eng.decide({"conflict": True})
        assert conflict.deny_reasons[0].startswith("policy engine error: OPA answered HTTP 500")
        undefined = await eng.decide({})
        assert undefined.deny_reasons == ("policy engine error: data.mcp.decision is undefined",)
    finally:
        await eng.close()
        daemon.stop()


def take_echo_from_developers(policy_dir: Path) -> None:
    """Edit data.json in place (atomically) so the developer role loses echo."""
    data_file = policy_dir / "data.json"
    data = json.loads(data_file.read_text())
    data["gateway"]["roles"]["developer"]["commands"].remove("echo")
    tmp = policy_dir / "data.json.tmp"
    tmp.write_text(json.dumps(data))
    tmp.replace(data_file)


async def test_watch_reload_changes_decisions(short_dir: Path) -> None:
    """OPA --watch picks up an edited data.json; the same engine sees the new decisions."""
    policy_dir = short_dir / "policies"
    shutil.copytree(POLICIES, policy_dir)
    daemon = OpaDaemon(policy_dir, short_dir, watch=True)
    daemon.start()
    eng = OpaEngine(daemon.url, timeout_s=2.0)
    try:
        assert (await eng.decide(command("echo"))).allow
        take_echo_from_developers(policy_dir)
        deadline = time.monotonic() + 20
        decision = await eng.decide(command("echo"))
        while decision.allow and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            decision = await eng.decide(command("echo"))
        assert decision.deny_reasons == ("command 'echo' is not allowed for roles [developer]",)
    finally:
        await eng.close()
        daemon.stop()


async def test_revision_follows_the_watched_files(short_dir: Path) -> None:
    """After OPA --watch reloads, reload() makes decisions record the new files' revision."""
    policy_dir = short_dir / "policies"
    shutil.copytree(POLICIES, policy_dir)
    daemon = OpaDaemon(policy_dir, short_dir, watch=True)
    daemon.start()
    eng = OpaEngine(daemon.url, timeout_s=2.0, policy_dir=policy_dir)
    try:
        before = (await eng.decide(command("echo"))).revision
        assert before == load_policy_dir(policy_dir).revision
        take_echo_from_developers(policy_dir)
        after = await eng.reload()
        assert after == load_policy_dir(policy_dir).revision != before
        deadline = time.monotonic() + 20
        decision = await eng.decide(command("echo"))
        while decision.allow and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            decision = await eng.decide(command("echo"))
        assert not decision.allow
        assert decision.revision == after
    finally:
        await eng.close()
        daemon.stop()


async def test_config_builds_the_opa_engine(short_dir: Path) -> None:
    """policy.engine "opa" with opa_url and opa_token_file makes a working OpaEngine."""
    token_file = short_dir / "token"
    token_file.write_text("s3cret-token\n")
    daemon = OpaDaemon(POLICIES, short_dir, extra=token_auth(short_dir, "s3cret-token"))
    daemon.start()
    config = make_config(
        short_dir,
        policy={"engine": "opa", "opa_url": daemon.url, "opa_token_file": str(token_file)},
    )
    eng = make_policy(config)
    try:
        assert isinstance(eng, OpaEngine)
        decision = await eng.decide(command("echo"))
        assert decision.allow, decision.deny_reasons
        assert decision.revision == load_policy_dir(POLICIES).revision
    finally:
        await eng.close()
        daemon.stop()


def token_auth(workdir: Path, *tokens: str) -> tuple[str, ...]:
    """OPA flags for the shipped system.authz policy, trusting ``tokens`` (by SHA-256)."""
    data = workdir / "gateway-token.json"
    digests = [hashlib.sha256(t.encode()).hexdigest() for t in tokens]
    data.write_text(json.dumps({"token_sha256": digests}))
    return ("--authentication=token", "--authorization=basic", f"system.gateway:{data}")


async def test_bearer_token_for_token_authentication(short_dir: Path) -> None:
    """The shipped system.authz: the gateway's token gets decisions, a wrong one denies (401)."""
    daemon = OpaDaemon(POLICIES, short_dir, extra=token_auth(short_dir, "old", "s3cret-token"))
    daemon.start()
    good = OpaEngine(daemon.url, timeout_s=2.0, token="s3cret-token")
    bad = OpaEngine(daemon.url, timeout_s=2.0, token="wrong")
    try:
        assert (await good.decide(command("echo"))).allow
        assert (await good.check())["engine"] == "opa"
        denied = await bad.decide(command("echo"))
        assert denied.deny_reasons[0].startswith("policy engine error: OPA answered HTTP 401")
        with pytest.raises(Unavailable, match="401"):
            await bad.check()
    finally:
        await good.close()
        await bad.close()
        daemon.stop()


def _raw(daemon: OpaDaemon, method: str, path: str, token: str | None) -> int:
    conn = _UnixHTTPConnection(str(daemon.socket), timeout=5.0)
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    try:
        conn.request(method, path, body=b'{"input": {}}' if method != "GET" else None,
                     headers=headers)  # fmt: skip
        return conn.getresponse().status
    finally:
        conn.close()


def test_shipped_authz_allows_only_decisions_and_health(short_dir: Path) -> None:
    """Even the gateway's token cannot read data, list or write policies; health stays open."""
    daemon = OpaDaemon(POLICIES, short_dir, extra=token_auth(short_dir, "s3cret-token"))
    daemon.start()
    try:
        assert _raw(daemon, "POST", "/v1/data/mcp/decision?provenance", "s3cret-token") == 200
        assert _raw(daemon, "GET", "/health?bundles&plugins", None) == 200
        assert _raw(daemon, "POST", "/v1/data/mcp/decision", None) == 401
        assert _raw(daemon, "GET", "/v1/data", "s3cret-token") == 401
        assert _raw(daemon, "GET", "/v1/policies", "s3cret-token") == 401
        assert _raw(daemon, "PUT", "/v1/policies/evil", "s3cret-token") == 401
        assert _raw(daemon, "POST", "/v1/data/system/authz", "s3cret-token") == 401
    finally:
        daemon.stop()


# --- parity with the embedded engine -------------------------------------------------------


def _corpus(size: int) -> list[dict[str, object]]:
    """``size`` distinct inputs generated by Hypothesis (the embedded tests' ``policy_inputs``)."""
    seen: dict[str, dict[str, object]] = {}

    @settings(
        max_examples=size * 3,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(doc=policy_inputs())
    def collect(doc: dict[str, object]) -> None:
        if len(seen) < size:
            seen.setdefault(json.dumps(doc, sort_keys=True, default=repr), doc)

    collect()
    return list(seen.values())


async def test_opa_agrees_with_embedded_engine(engine: OpaEngine) -> None:
    """OpaEngine and EmbeddedEngine give identical decisions on 2,000+ generated inputs."""
    docs: list[dict[str, object]] = [doc for _, doc, _, _ in CASES]
    docs += [doc for _, doc, _ in MALFORMED]
    docs += _random_inputs(200, seed=7)
    generated = _corpus(CORPUS_SIZE)
    assert len(generated) >= CORPUS_SIZE
    docs += generated
    embedded = EmbeddedEngine(POLICIES, timeout_s=5.0, opa_binary=str(OPA))
    try:
        mismatches = []
        for doc in docs:
            mine, theirs = as_dict(await embedded.decide(doc)), as_dict(await engine.decide(doc))
            if mine != theirs:
                mismatches.append({"doc": repr(doc), "embedded": mine, "opa": theirs})
    finally:
        await embedded.close()
    assert not mismatches, json.dumps(mismatches[:3], indent=1, ensure_ascii=False)
