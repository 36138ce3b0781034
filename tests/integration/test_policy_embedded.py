"""The real ``policies/`` through the embedded engine (OPA-compiled Wasm run by wasmtime)."""

from __future__ import annotations

import asyncio
import json
import random
import re
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import wasm
from gateway.errors import FailedPrecondition, Unavailable
from gateway.models import CommandSpec, Decision, Subject
from gateway.policy import ACTIONS, EmbeddedEngine, build_policy_input
from tests.conftest import POLICIES, ROOT, until

pytestmark = pytest.mark.integration

OPA = ROOT / ".tools" / "bin" / "opa"
REQUEST: dict[str, Any] = {"request_id": "r-1", "transport": "rest", "source": "127.0.0.1"}
DEVELOPER_LIMITS = {
    "timeout_s": 30.0,
    "memory_bytes": 1073741824,
    "pids": 256,
    "cpu_seconds": 600,
    "output_bytes": 4194304,
    "network": False,
}


@pytest.fixture(scope="module")
def engine() -> Iterator[EmbeddedEngine]:
    eng = EmbeddedEngine(POLICIES, timeout_s=5.0, opa_binary=str(OPA))
    yield eng
    asyncio.run(eng.close())


@pytest.fixture
async def copy_engine(tmp_path: Path) -> AsyncIterator[tuple[EmbeddedEngine, Path]]:
    """An engine over a private copy of policies/ that a test may break."""
    policy_dir = tmp_path / "policies"
    shutil.copytree(POLICIES, policy_dir)
    eng = EmbeddedEngine(policy_dir, timeout_s=5.0, opa_binary=str(OPA))
    yield eng, policy_dir
    await eng.close()


def command(
    name: str,
    *args: str,
    roles: tuple[str, ...] = ("developer",),
    subject: str = "alice",
    **spec: Any,
) -> dict[str, object]:
    return build_policy_input(
        "command.execute",
        Subject(subject, roles),
        command=CommandSpec(name, args, **spec),
        **REQUEST,
    )


def file(action: str, path: str, roles: tuple[str, ...] = ("developer",)) -> dict[str, object]:
    return build_policy_input(action, Subject("alice", roles), file_path=path, **REQUEST)


def task(action: str, subject: str, roles: tuple[str, ...], owner: str) -> dict[str, object]:
    return build_policy_input(
        action, Subject(subject, roles), task_id="t-1", task_owner=owner, **REQUEST
    )


def well_formed(decision: Decision, eng: EmbeddedEngine) -> None:
    assert isinstance(decision.allow, bool)
    assert all(isinstance(r, str) for r in decision.deny_reasons)
    assert all(isinstance(w, str) for w in decision.warnings)
    assert isinstance(decision.limits, dict)
    assert decision.engine == "embedded"
    assert decision.revision == eng.revision
    assert decision.decision_id
    if decision.allow:
        assert decision.deny_reasons == ()
    else:
        assert decision.deny_reasons


# --- the default policy ------------------------------------------------------------------

CASES: list[tuple[str, dict[str, object], bool, str | None]] = [
    ("echo for developer", command("echo", "hi"), True, None),
    ("ls by absolute path", command("/usr/bin/ls", "-l"), True, None),
    (
        "sh -c",
        command("sh", "-c", "id"),
        False,
        "argument '-c' to 'sh' executes code",
    ),
    (
        "bash -lc",
        command("bash", "-lc", "id"),
        False,
        "argument '-lc' to 'bash' executes code",
    ),
    (
        "python3 -c",
        command("python3", "-c", "import os"),
        False,
        "argument '-c' to 'python3' executes code",
    ),
    ("python3 script", command("python3", "tool.py", "-c", "x.yaml"), True, None),
    (
        "python3 -m timeit after many options",
        command("python3", *["-W", "x"] * 4, "-m", "timeit", "import os"),
        False,
        "module 'timeit' run by 'python3' executes inline code",
    ),
    (
        "python3 from stdin",
        command("python3"),
        False,
        "'python3' without a script file reads code from stdin",
    ),
    (
        "perl -e",
        command("perl", "-e", "exec 'sh'"),
        False,
        "argument '-e' to 'perl' executes code",
    ),
    (
        "find -exec",
        command("find", ".", "-exec", "sh", ";"),
        False,
        "argument '-exec' to 'find' runs another program",
    ),
    (
        "find -delete",
        command("find", ".", "-delete"),
        False,
        "argument '-delete' to 'find' deletes files",
    ),
    (
        "env sh",
        command("env", "FOO=1", "sh"),
        False,
        "command 'env' runs another program 'sh'",
    ),
    (
        "xargs",
        command("xargs", "rm", roles=("admin",)),
        False,
        "command 'xargs' runs another program and is never allowed",
    ),
    (
        "git -c",
        command("git", "-c", "core.pager=sh", "log"),
        False,
        "argument '-c' to 'git' sets configuration that can run programs",
    ),
    (
        "tar --to-command",
        command("tar", "-xf", "a.tar", "--to-command=sh"),
        False,
        "argument '--to-command=sh' to 'tar' runs another program",
    ),
    (
        "sed e",
        command("sed", "1e id", "f"),
        False,
        "argument '1e id' to 'sed' executes a shell command (the e command or flag)",
    ),
    (
        "LD_PRELOAD",
        command("echo", env=(("LD_PRELOAD", "/tmp/x.so"),)),
        False,
        "environment variable 'LD_PRELOAD' is not allowed: it changes how programs start",
    ),
    (
        "PYTHONSTARTUP",
        command("python3", "x.py", env=(("PYTHONSTARTUP", "x"),)),
        False,
        "environment variable 'PYTHONSTARTUP' is not allowed: it changes how programs start",
    ),
    (
        "cwd outside workspace",
        command("ls", cwd="/etc"),
        False,
        "working directory '/etc' is outside /workspace",
    ),
    (
        "cwd dot-dot",
        command("ls", cwd="/workspace/../etc"),
        False,
        "working directory '/workspace/../etc' is outside /workspace",
    ),
    (
        "rm for readonly",
        command("rm", "x", roles=("readonly",)),
        False,
        "command 'rm' is not allowed for roles [readonly]",
    ),
    (
        "network for agent",
        command("git", "status", roles=("agent",), network=True),
        False,
        "network access is not allowed for roles [agent]",
    ),
    ("read src", file("file.read", "src/a.txt"), True, None),
    (
        "read ssh key",
        file("file.read", ".ssh/id_rsa"),
        False,
        "file path '.ssh/id_rsa' is in a protected location (.ssh)",
    ),
    (
        "read dot-dot",
        file("file.read", "../x"),
        False,
        "file path '../x' must not contain '..'",
    ),
    (
        "read absolute",
        file("file.read", "/etc/passwd"),
        False,
        "file path '/etc/passwd' must be relative to the workspace",
    ),
    (
        "write hooks",
        file("file.write", ".git/hooks/pre-commit"),
        False,
        "file path '.git/hooks/pre-commit' is in a protected location (.git/hooks)",
    ),
    (
        "agent writes README",
        file("file.write", "README.md", roles=("agent",)),
        False,
        "file write of 'README.md' is not allowed for roles [agent]",
    ),
    ("agent writes src", file("file.write", "src/a.py", roles=("agent",)), True, None),
    ("owner reads task", task("task.read", "alice", ("developer",), "alice"), True, None),
    (
        "non-owner reads task",
        task("task.read", "bob", ("developer",), "alice"),
        False,
        "subject 'bob' may not read task 't-1' owned by 'alice'",
    ),
    ("admin reads task", task("task.read", "root", ("admin",), "alice"), True, None),
    ("admin cancels task", task("task.cancel", "root", ("admin",), "alice"), True, None),
    (
        "non-owner cancels task",
        task("task.cancel", "bob", ("agent",), "alice"),
        False,
        "subject 'bob' may not cancel task 't-1' owned by 'alice'",
    ),
]


@pytest.mark.parametrize(
    ("doc", "allow", "reason"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
async def test_default_policy(
    engine: EmbeddedEngine, doc: dict[str, object], allow: bool, reason: str | None
) -> None:
    """The shipped policy allows and denies as documented, naming the problem."""
    decision = await engine.decide(doc)
    well_formed(decision, engine)
    assert decision.allow is allow, decision.deny_reasons
    if reason is not None:
        assert reason in decision.deny_reasons


def _without(doc: dict[str, object], *keys: str) -> dict[str, object]:
    return {k: v for k, v in doc.items() if k not in keys}


MALFORMED: list[tuple[str, dict[str, object], str]] = [
    ("empty", {}, "policy input has no action"),
    ("no subject", _without(command("echo"), "subject"), "policy input has no subject id"),
    ("no action", _without(command("echo"), "action"), "policy input has no action"),
    ("no version", _without(command("echo"), "version"), "policy input has no version"),
    (
        "version 2",
        {**command("echo"), "version": 2},
        "unsupported policy input version (this policy reads version 1)",
    ),
    ("unknown action", {**command("echo"), "action": "shell"}, "unknown action 'shell'"),
    (
        "no command",
        _without(command("echo"), "command"),
        "command.execute needs a command object",
    ),
    (
        "roles not a list",
        {**command("echo"), "subject": {"id": "alice", "roles": "admin"}},
        "subject roles must be a list of strings",
    ),
    (
        "unknown role only",
        command("echo", roles=("wizard",)),
        "subject 'alice' has no recognised role",
    ),
    ("no file", file("file.read", "x") | {"file": {}}, "file path is missing"),
    ("no task", _without(task("task.read", "a", ("admin",), "a"), "task"), "task id is missing"),
    ("NUL in argument", command("echo", "a\x00b"), "policy input rejected: "),
]


@pytest.mark.parametrize(
    ("doc", "reason"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED]
)
async def test_malformed_input_denies(
    engine: EmbeddedEngine, doc: dict[str, object], reason: str
) -> None:
    """Missing or malformed input is denied with a reason saying what is wrong."""
    decision = await engine.decide(doc)
    well_formed(decision, engine)
    assert not decision.allow
    assert any(r.startswith(reason) for r in decision.deny_reasons), decision.deny_reasons


async def test_limits_are_the_role_caps(engine: EmbeddedEngine) -> None:
    """Each limit is its own role cap (a regression test kept from an earlier engine)."""
    decision = await engine.decide(command("echo", timeout_s=30.0))
    assert decision.limits == DEVELOPER_LIMITS


async def test_timeout_is_capped_with_a_warning(engine: EmbeddedEngine) -> None:
    """A timeout above the role cap is lowered to the cap and the caller is told."""
    decision = await engine.decide(command("echo", roles=("readonly",), timeout_s=300.0))
    assert decision.allow
    assert decision.limits["timeout_s"] == 30
    assert decision.warnings == (
        "timeout 300s exceeds the cap for roles [readonly]; capped to 30s",
    )


async def test_network_granted_only_when_asked(engine: EmbeddedEngine) -> None:
    """limits.network is true only for a role with network that asked for it."""
    asked = await engine.decide(command("curl", "https://example.org", network=True))
    assert asked.allow
    assert asked.limits["network"] is True
    not_asked = await engine.decide(command("curl", "https://example.org"))
    assert not_asked.limits["network"] is False


async def test_special_characters_survive(engine: EmbeddedEngine) -> None:
    """Quotes, backslashes, newlines and non-ASCII text reach the policy and the reasons intact."""
    allowed = await engine.decide(command("echo", 'say "hi"', "back\\slash", "a\nb", "é🎉"))
    assert allowed.allow, allowed.deny_reasons
    denied = await engine.decide(command("awk", '{print | "sh"}'))
    assert denied.deny_reasons == (
        """argument '{print | "sh"}' to 'awk' pipes to or from a shell command""",
    )


async def test_decisions_carry_the_revision(engine: EmbeddedEngine) -> None:
    """The revision is the sha256 of the loaded files; each decision gets its own id."""
    first = await engine.decide(command("echo"))
    second = await engine.decide(command("echo"))
    assert re.fullmatch(r"[0-9a-f]{64}", engine.revision)
    assert first.revision == second.revision == engine.revision
    assert first.decision_id != second.decision_id


async def test_check_reports_readiness(engine: EmbeddedEngine) -> None:
    """check() evaluates the canary and reports the loaded policy."""
    details = await engine.check()
    assert details["engine"] == "embedded"
    assert details["revision"] == engine.revision
    assert details["modules"] == len(list(POLICIES.rglob("*.rego"))) - len(
        list(POLICIES.rglob("*_test.rego"))
    )
    assert details["runtime"] == "opa-wasm"


async def test_concurrent_decisions(engine: EmbeddedEngine) -> None:
    """Many concurrent decisions share one interpreter safely and each gets its own answer."""
    docs = [command("echo", str(i)) if i % 2 else command("sh", "-c", str(i)) for i in range(40)]
    decisions = await asyncio.gather(*(engine.decide(d) for d in docs))
    assert [d.allow for d in decisions] == [bool(i % 2) for i in range(40)]
    assert decisions[2].deny_reasons == ("argument '-c' to 'sh' executes code",)


# --- generated inputs --------------------------------------------------------------------------

TEXT = st.text(max_size=12)
NAME = (
    st.sampled_from(
        [
            "echo", "sh", "bash", "python3", "python3.12", "perl", "ruby", "node", "env", "find",
            "git", "tar", "make", "awk", "sed", "xargs", "rm", "/usr/bin/ls", "/tmp/x", "./a",
            "", "-rf",
        ]
    )
    | TEXT
)  # fmt: skip
ARG = (
    st.sampled_from(
        [
            "-c", "-e", "-m", "-i", "-s", "-", "--", "-exec", "-delete", "--to-command=sh", "-x",
            "ext::sh", "config", "s/x/y/e", "system(1)", "a|b", "x.py", "build.sh", "FOO=1",
            "-Ixz", "--eval=1", "timeit", "run", "foreach",
        ]
    )
    | TEXT
)  # fmt: skip
ROLE = st.sampled_from(["admin", "developer", "readonly", "agent", "wizard"]) | TEXT
JSON_SCALAR = st.none() | st.booleans() | st.integers(-(2**60), 2**60) | st.floats() | TEXT
PATH = st.sampled_from(["src/a", ".ssh/id_rsa", "../x", "/etc/passwd", "", ".", "a/.git/hooks/x"])


@st.composite
def policy_inputs(draw: st.DrawFn) -> dict[str, object]:
    """Mostly contract-shaped documents with random values, missing parts and wrong types."""
    action = draw(st.sampled_from(sorted(ACTIONS)) | TEXT | JSON_SCALAR)
    doc: dict[str, object] = {
        "version": draw(st.sampled_from([1, 1, 1, 2, "1"]) | JSON_SCALAR),
        "action": action,
        "subject": {
            "id": draw(st.sampled_from(["alice", "bob", ""]) | JSON_SCALAR),
            "roles": draw(st.lists(ROLE, max_size=3) | JSON_SCALAR),
            "auth": draw(st.sampled_from(["token", "jwt", "none"])),
        },
        "command": {
            "name": draw(NAME | JSON_SCALAR),
            "args": draw(st.lists(ARG, max_size=6) | JSON_SCALAR),
            "cwd": draw(st.sampled_from(["/workspace", "/workspace/a", "/etc"]) | JSON_SCALAR),
            "env": draw(
                st.dictionaries(
                    st.sampled_from(["LD_PRELOAD", "LANG", "PYTHONPATH", "A-B"]) | TEXT,
                    TEXT | JSON_SCALAR,
                    max_size=3,
                )
                | JSON_SCALAR
            ),
            "timeout": draw(st.integers(-5, 5000) | JSON_SCALAR),
        },
        "file": {
            "path": draw(PATH | TEXT | JSON_SCALAR),
            "mode": draw(st.sampled_from([420, 438, 2048]) | JSON_SCALAR),
            "recursive": draw(JSON_SCALAR),
        },
        "task": {"id": draw(TEXT | JSON_SCALAR), "owner": draw(TEXT | JSON_SCALAR)},
        "sandbox": {"network": draw(st.sampled_from(["none", "full", "host"]) | JSON_SCALAR)},
        "request": {"id": "r", "transport": "rest", "source": "127.0.0.1"},
    }
    for key in draw(st.sets(st.sampled_from(sorted(doc)), max_size=3)):
        del doc[key]
    return doc


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(doc=policy_inputs())
def test_generated_inputs_give_well_formed_decisions(
    engine: EmbeddedEngine, doc: dict[str, object]
) -> None:
    """Any generated input yields a well-formed decision, never an engine error or a crash."""
    decision = asyncio.run(engine.decide(doc))
    well_formed(decision, engine)
    if not any(r.startswith("policy input rejected") for r in decision.deny_reasons):
        assert not any(r.startswith("policy engine error") for r in decision.deny_reasons)
        assert not any(r.startswith("malformed policy decision") for r in decision.deny_reasons)
    if decision.allow:
        assert doc.get("version") == 1
        assert doc.get("action") in ACTIONS
        assert isinstance(doc.get("subject"), dict)


@settings(max_examples=100, deadline=None)
@given(
    doc=st.recursive(
        JSON_SCALAR,
        lambda children: (
            st.lists(children, max_size=4) | st.dictionaries(TEXT, children, max_size=4)
        ),
        max_leaves=20,
    )
)
def test_arbitrary_json_denies(engine: EmbeddedEngine, doc: object) -> None:
    """Documents that are not policy inputs at all are denied with a reason."""
    decision = asyncio.run(engine.decide(doc))  # type: ignore[arg-type]
    well_formed(decision, engine)
    assert not decision.allow


# --- parity with OPA ---------------------------------------------------------------------------


def _random_inputs(count: int, seed: int) -> list[dict[str, object]]:
    """Contract-shaped inputs from a fixed seed (the vocabulary of policy_inputs)."""
    rng = random.Random(seed)  # noqa: S311 - reproducible test data, not secrets
    names = ["echo", "sh", "bash", "python3", "perl", "node", "env", "find", "git", "tar"]
    names += ["make", "awk", "sed", "xargs", "rm", "/usr/bin/ls", "/tmp/x", "curl", "cat"]
    args = ["-c", "-e", "-m", "-i", "-", "--", "-exec", "-delete", "--to-command=sh", "-x"]
    args += ["ext::sh", "config", "s/x/y/e", "system(1)", "a|b", "x.py", "FOO=1", "-Ixz"]
    args += ["timeit", "run", "hi", 'q"uote', "back\\slash", "é", "--get", "-u", "x\ny"]
    roles = ["admin", "developer", "readonly", "agent", "wizard"]
    paths = ["src/a", ".ssh/id_rsa", "../x", "/etc/passwd", "", ".", "a/.git/hooks/x", "tmp/é"]
    docs: list[dict[str, object]] = []
    for _ in range(count):
        action = rng.choice([*sorted(ACTIONS), "bogus"])
        doc: dict[str, object] = {
            "version": rng.choice([1, 1, 1, 2]),
            "action": action,
            "subject": {
                "id": rng.choice(["alice", "bob"]),
                "roles": rng.sample(roles, rng.randint(0, 2)),
                "auth": rng.choice(["token", "none"]),
            },
            "command": {
                "name": rng.choice(names),
                "args": [rng.choice(args) for _ in range(rng.randint(0, 4))],
                "cwd": rng.choice(["/workspace", "/workspace/src", "/etc", "/workspace/../x"]),
                "env": dict(
                    rng.sample(
                        [("LANG", "C"), ("LD_PRELOAD", "x"), ("A-B", "1"), ("PYTHONPATH", "")],
                        rng.randint(0, 2),
                    )
                ),
                "timeout": rng.choice([1, 30, 30.5, 300, 5000, 0, -1]),
            },
            "file": {"path": rng.choice(paths), "mode": rng.choice([420, 438, 2048])},
            "task": {"id": "t", "owner": rng.choice(["alice", "bob", ""])},
            "sandbox": {"network": rng.choice(["none", "none", "full", "host"])},
        }
        for key in rng.sample(["version", "subject", "command", "file", "task", "sandbox"], 1):
            if rng.random() < 0.15:
                del doc[key]
        docs.append(doc)
    return docs


def _opa_decisions(docs: list[dict[str, object]], tmp_path: Path) -> list[Any]:
    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps({"cases": docs}))
    query = "[d | some c in input.cases; d := data.mcp.decision with input as c]"
    out = subprocess.run(
        [str(OPA), "eval", "-f", "json", "-d", str(POLICIES), "-i", str(cases), query],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return list(json.loads(out.stdout)["result"][0]["expressions"][0]["value"])


@pytest.mark.skipif(not OPA.exists(), reason="OPA is not built (make opa)")
async def test_embedded_engine_agrees_with_opa(engine: EmbeddedEngine, tmp_path: Path) -> None:
    """The embedded engine and OPA give the same decisions (allow, reasons, warnings, limits)."""
    docs = [doc for _, doc, _, _ in CASES] + [doc for _, doc, _ in MALFORMED[:-1]]
    docs += _random_inputs(400, seed=20240601)
    expected = _opa_decisions(docs, tmp_path)
    mismatches = []
    for doc, want in zip(docs, expected, strict=True):
        got = await engine.decide(doc)
        mine = {
            "allow": got.allow,
            "deny_reasons": list(got.deny_reasons),
            "warnings": list(got.warnings),
            "limits": got.limits,
        }
        if mine != want:
            mismatches.append((doc, mine, want))
    assert not mismatches, json.dumps(mismatches[:3], indent=1, ensure_ascii=False)


# --- loading, reloading, failures ----------------------------------------------------------------


async def test_reload_keeps_the_old_policy_when_the_new_one_is_broken(
    copy_engine: tuple[EmbeddedEngine, Path],
) -> None:
    """A policy that does not compile is refused; the loaded one keeps deciding."""
    eng, policy_dir = copy_engine
    before = eng.revision
    broken = policy_dir / "mcp" / "broken.rego"
    broken.write_text("package mcp.broken\n\nallow if {\n")
    with pytest.raises(FailedPrecondition, match="policy does not compile"):
        await eng.reload()
    assert eng.revision == before
    decision = await eng.decide(command("echo"))
    assert decision.allow
    assert decision.revision == before


async def test_reload_refuses_a_policy_that_fails_the_canary(
    copy_engine: tuple[EmbeddedEngine, Path],
) -> None:
    """A policy that compiles but allows an empty input is refused."""
    eng, policy_dir = copy_engine
    before = eng.revision
    (policy_dir / "mcp" / "decision.rego").write_text(
        'package mcp\n\ndecision := {"allow": true, "deny_reasons": [], "warnings": [], '
        '"limits": {}}\n'
    )
    with pytest.raises(FailedPrecondition, match="canary evaluation allowed an empty input"):
        await eng.reload()
    assert eng.revision == before
    assert not (await eng.decide(command("sh", "-c", "id"))).allow


async def test_reload_swaps_in_a_good_policy(copy_engine: tuple[EmbeddedEngine, Path]) -> None:
    """A changed data.json is picked up by reload with a new revision."""
    eng, policy_dir = copy_engine
    before = eng.revision
    data_file = policy_dir / "data.json"
    data = json.loads(data_file.read_text())
    data["gateway"]["roles"]["developer"]["commands"].remove("echo")
    data_file.write_text(json.dumps(data))
    revision = await eng.reload()
    assert revision != before
    assert eng.revision == revision
    decision = await eng.decide(command("echo"))
    assert decision.deny_reasons == ("command 'echo' is not allowed for roles [developer]",)
    assert decision.revision == revision


async def test_test_files_do_not_change_the_revision(
    copy_engine: tuple[EmbeddedEngine, Path],
) -> None:
    """Only what is loaded counts: editing a _test.rego file leaves the revision alone."""
    eng, policy_dir = copy_engine
    before = eng.revision
    test_file = policy_dir / "mcp" / "decision_test.rego"
    test_file.write_text(test_file.read_text() + "\n# a comment\n")
    assert await eng.reload() == before


def test_broken_policy_at_startup_is_unavailable(tmp_path: Path) -> None:
    """An engine cannot start on a policy that does not compile."""
    (tmp_path / "p.rego").write_text("package mcp\n\ndecision := \n")
    with pytest.raises(Unavailable, match="policy does not compile"):
        EmbeddedEngine(tmp_path, timeout_s=1.0, opa_binary=str(OPA))


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({}, "has no Rego module"),
        ({"a/data.json": "[1]"}, "must be a JSON object"),
        ({"a/data.json": "{"}, "is not valid JSON"),
        ({"data.json": '{"a": {"x": 1}}', "a/data.json": '{"x": 2}'}, "redefines key 'x'"),
    ],
    ids=["no-module", "not-object", "bad-json", "conflict"],
)
def test_bad_policy_directories_are_refused(
    tmp_path: Path, files: dict[str, str], message: str
) -> None:
    """Loading problems are reported with the file and the reason."""
    if files:
        (tmp_path / "mcp").mkdir()
        (tmp_path / "mcp" / "d.rego").write_text(TOY_POLICY)
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    with pytest.raises(Unavailable, match=message):
        EmbeddedEngine(tmp_path, timeout_s=1.0, opa_binary=str(OPA))


TOY_POLICY = """package mcp

default decision := {
	"allow": false, "deny_reasons": ["nothing allowed"], "warnings": [], "limits": {},
}

_allow := {"allow": true, "deny_reasons": [], "warnings": [], "limits": {}}

decision := _allow if {
	input.ok == true
	data.flags.root == true
	data.extra.nested.flag == true
}

_nums := numbers.range(1, 300)

decision := {"allow": false, "deny_reasons": [reason], "warnings": [], "limits": {}} if {
	input.slow == true
	n := count([1 |
		some a in _nums
		some b in _nums
		some c in _nums
		some d in _nums
		a > b
		c > d
		b < 0
	])
	reason := sprintf("%d", [n])
}

decision := {"allow": false, "deny_reasons": [reason], "warnings": [], "limits": {}} if {
	input.hungry == true
	n := count({x | some i in numbers.range(1, 1000); some j in numbers.range(1, 1000); x := i - i})
	reason := sprintf("%d", [n])
}

decision := _allow if input.conflict == true

decision := {"allow": false, "deny_reasons": ["x"], "warnings": [], "limits": {}} if {
	input.conflict == true
}

decision := {"allow": input.allow_value, "deny_reasons": [], "warnings": [], "limits": {}} if {
	input.bad_shape == true
}
"""


@pytest.fixture
async def toy_engine(tmp_path: Path) -> AsyncIterator[EmbeddedEngine]:
    """An engine over a toy policy with data.json files at two levels."""
    (tmp_path / "mcp").mkdir()
    (tmp_path / "mcp" / "decision.rego").write_text(TOY_POLICY)
    (tmp_path / "mcp" / "decision_test.rego").write_text("this is not Rego and is not loaded\n")
    (tmp_path / "data.json").write_text('{"flags": {"root": true}}')
    (tmp_path / "extra" / "nested").mkdir(parents=True)
    (tmp_path / "extra" / "nested" / "data.json").write_text('{"flag": true}')
    eng = EmbeddedEngine(tmp_path, timeout_s=0.3, opa_binary=str(OPA))
    yield eng
    await eng.close()


async def test_data_files_merge_by_directory(toy_engine: EmbeddedEngine) -> None:
    """extra/nested/data.json is data.extra.nested and data.json is the root, as in OPA."""
    assert (await toy_engine.decide({"ok": True})).allow
    assert not (await toy_engine.decide({})).allow


async def test_evaluation_errors_deny(toy_engine: EmbeddedEngine) -> None:
    """A Rego evaluation error is a deny naming the engine error."""
    decision = await toy_engine.decide({"conflict": True})
    assert not decision.allow
    assert decision.deny_reasons[0].startswith("policy engine error: ")
    assert decision.revision == toy_engine.revision


async def test_malformed_decision_denies(toy_engine: EmbeddedEngine) -> None:
    """A decision whose allow is not a boolean is a deny (fail closed)."""
    decision = await toy_engine.decide({"bad_shape": True, "allow_value": "yes"})
    assert decision.deny_reasons == ("malformed policy decision: allow is not a boolean",)


async def test_runaway_evaluation_is_interrupted(
    toy_engine: EmbeddedEngine,
) -> None:
    """A slow evaluation is interrupted and denied after timeout_s, not before; the next
    one is served."""
    started = time.monotonic()
    decision = await toy_engine.decide({"slow": True})
    assert 0.3 <= time.monotonic() - started < 1.0
    assert decision.deny_reasons == ("policy engine error: evaluation timed out after 0.3s",)
    assert (await toy_engine.decide({"ok": True})).allow


async def test_epoch_period_follows_the_timeout(toy_engine: EmbeddedEngine) -> None:
    """The ticker ticks at a tenth of the timeout, within its bounds, and never slower
    than the shortest timeout needs (its deadlines are counted in ticks)."""
    assert (await toy_engine.decide({"ok": True})).allow
    policy = toy_engine._runtime.policy
    assert policy.tick_s == pytest.approx(0.03)
    policy.evaluate({"ok": True}, timeout_s=10.0)
    assert policy.tick_s == pytest.approx(0.03)  # a longer timeout keeps the period
    policy.evaluate({"ok": True}, timeout_s=1e-6)
    assert policy.tick_s == wasm.TICK_MIN_S
    started = time.monotonic()
    with pytest.raises(wasm.EvaluationTimeout):
        policy.evaluate({"slow": True}, timeout_s=0.05)
    assert 0.05 <= time.monotonic() - started < 1.0
    assert (await toy_engine.check())["runtime"] == "opa-wasm"


async def test_idle_engine_sleeps_and_still_interrupts_a_runaway(
    toy_engine: EmbeddedEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without evaluations the epoch ticker stops; a runaway begun then is still interrupted."""
    monkeypatch.setattr(wasm, "TICK_IDLE_S", 0.05)
    assert (await toy_engine.decide({"ok": True})).allow
    policy = toy_engine._runtime.policy
    # The ticker stops after TICK_IDLE_S without evaluations.
    await until(lambda: not policy.ticking)
    assert not policy.ticking
    started = time.monotonic()
    decision = await toy_engine.decide({"slow": True})
    assert time.monotonic() - started < 1.0
    assert decision.deny_reasons == ("policy engine error: evaluation timed out after 0.3s",)
    assert (await toy_engine.decide({"ok": True})).allow


async def test_memory_hungry_evaluation_is_denied(toy_engine: EmbeddedEngine) -> None:
    """An evaluation that exhausts the module's memory cap is a deny; the engine recovers."""
    decision = await toy_engine.decide({"hungry": True})
    assert not decision.allow
    assert decision.deny_reasons[0].startswith("policy engine error: policy aborted: ")
    assert (await toy_engine.decide({"ok": True})).allow


async def test_decisions_around_a_runaway_are_served(toy_engine: EmbeddedEngine) -> None:
    """Decisions issued together with a runaway one get their own answers."""
    before, slow, after = await asyncio.gather(
        toy_engine.decide({"ok": True}),
        toy_engine.decide({"slow": True}),
        toy_engine.decide({"ok": True}),
    )
    assert slow.deny_reasons == ("policy engine error: evaluation timed out after 0.3s",)
    assert before.allow
    assert after.allow


async def test_closed_engine_denies_and_is_not_ready(toy_engine: EmbeddedEngine) -> None:
    """After close() every decision is a deny and check() reports unavailable."""
    await toy_engine.close()
    decision = await toy_engine.decide({"ok": True})
    assert decision.deny_reasons == ("policy engine error: engine is closed",)
    with pytest.raises(Unavailable):
        await toy_engine.check()
