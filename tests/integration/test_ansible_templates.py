"""The roles' templates, rendered by Ansible itself, give files the gateway and OPA accept."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gateway import config as config_mod
from tests.conftest import OPA, ROOT

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent


def render(template: Path, dest: Path, extra: dict[str, object]) -> str:
    """Render ``template`` with ``extra`` vars through `ansible localhost -m template`."""
    defaults = template.parents[1] / "defaults" / "main.yml"
    vars_file = dest.parent / f"{dest.name}.vars.json"
    vars_file.write_text(json.dumps({**yaml.safe_load(defaults.read_text()), **extra}))
    out = subprocess.run(
        [
            str(BIN / "ansible"),
            "localhost",
            "-i",
            "localhost,",
            "-c",
            "local",
            "-m",
            "ansible.builtin.template",
            "-a",
            f"src={template} dest={dest}",
            "-e",
            f"@{vars_file}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": f"{BIN}:/usr/bin:/bin", "ANSIBLE_NOCOLOR": "1", "HOME": str(dest.parent)},
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return dest.read_text()


@pytest.mark.parametrize(
    ("extra", "engine", "tls"),
    [
        ({}, "opa", True),
        (
            {
                "mcp_gateway_policy_engine": "embedded",
                "mcp_gateway_tls": False,
                "mcp_gateway_otlp_endpoint": "http://127.0.0.1:4317",
                "mcp_gateway_tokens": [
                    {"subject": "ci", "roles": ["developer"], "sha256": "a" * 64},
                    {"subject": "ops", "roles": ["admin", "developer"], "sha256": "b" * 64},
                ],
            },
            "embedded",
            False,
        ),
    ],
    ids=["defaults", "embedded-plaintext-traced"],
)
def test_gateway_config_template_is_a_valid_config(
    tmp_path: Path, extra: dict[str, object], engine: str, tls: bool
) -> None:
    """config.yaml.j2 renders to a config that `mcp-gateway config check` (validate:) accepts."""
    template = ROOT / "roles" / "mcp_gateway" / "templates" / "config.yaml.j2"
    text = render(template, tmp_path / "config.yaml", extra)
    assert text.startswith("# Ansible managed")
    check = subprocess.run(
        [str(BIN / "mcp-gateway"), "config", "check", str(tmp_path / "config.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stderr
    config = config_mod.load(tmp_path / "config.yaml", env={})
    assert config.policy.engine == engine
    assert config.tls.enabled is tls
    assert config.server.host == "0.0.0.0"
    assert config.tracing.enabled is bool(extra.get("mcp_gateway_otlp_endpoint"))
    assert [t.subject for t in config.auth.tokens] == [
        t["subject"]
        for t in extra.get("mcp_gateway_tokens", [])  # type: ignore[attr-defined]
    ]


def test_opa_token_template_lists_hashes_that_opa_loads(tmp_path: Path) -> None:
    """gateway-token.json.j2 holds only SHA-256s, and OPA loads it as data.system.gateway."""
    template = ROOT / "roles" / "opa" / "templates" / "gateway-token.json.j2"
    tokens = ["current-token", "previous-token"]
    text = render(template, tmp_path / "gateway-token.json", {"opa_gateway_tokens": tokens})
    assert "current-token" not in text
    want = [hashlib.sha256(t.encode()).hexdigest() for t in tokens]
    assert json.loads(text) == {"token_sha256": want}
    out = subprocess.run(
        [
            str(OPA),
            "eval",
            "-f",
            "json",
            "-d",
            f"system.gateway:{tmp_path / 'gateway-token.json'}",
            "data.system.gateway.token_sha256",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["result"][0]["expressions"][0]["value"] == want
