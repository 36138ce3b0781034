"""Shared fixtures: a real gateway (real bwrap, seccomp, policy, SQLite, audit)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from gateway import config as config_mod
from gateway.config import hash_token

# Two cores shared with sandboxes and servers: generation speed and per-example
# time say nothing about correctness here, so they must not fail a run.
settings.register_profile("gateway", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("gateway")

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ROOT / "policies"
# Built by `make opa`; the embedded engine compiles the policies with it.
OPA = ROOT / ".tools" / "bin" / "opa"

# subject -> (token, roles)
USERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "alice": ("alice-token", ("developer",)),
    "bob": ("bob-token", ("developer",)),
    "root-admin": ("admin-token", ("admin",)),
    "reader": ("reader-token", ("readonly",)),
    "agent": ("agent-token", ("agent",)),
}


async def until(condition: Callable[[], object], timeout_s: float = 5.0) -> None:
    """Poll ``condition`` until it holds (the test's own assertion says what if not)."""
    for _ in range(int(timeout_s / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)


def make_config(state_dir: Path, **overrides: object) -> config_mod.Config:
    """A test config: loopback, ephemeral port, real policies, state in ``state_dir``."""
    doc: dict[str, object] = {
        "state_dir": str(state_dir),
        "server": {"host": "127.0.0.1", "port": 0, "shutdown_grace_s": 2},
        "grpc": {"host": "127.0.0.1", "port": 0},
        "auth": {
            "tokens": [
                {"subject": name, "roles": list(roles), "sha256": hash_token(token)}
                for name, (token, roles) in USERS.items()
            ]
        },
        "policy": {"engine": "embedded", "dir": str(POLICIES), "opa_binary": str(OPA)},
        "sandbox": {"cgroup_parent": f"mcp-gateway-test-{state_dir.name}"[:60]},
        "tasks": {"max_concurrent": 4, "max_queue": 8, "retention_s": 3600},
        "audit": {"redact": ["(?i)password=\\S+"]},
    }
    for key, value in overrides.items():
        section = doc.setdefault(key, {})
        if isinstance(section, dict) and isinstance(value, dict):
            section.update(value)
        else:
            doc[key] = value
    return config_mod.parse(doc, env={})


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.mkdir()
    return path
