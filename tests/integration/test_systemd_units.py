"""The shipped units pass systemd-analyze verify and stay within their exposure budgets."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.integration

UNITS = ROOT / "systemd"
# Exposure budgets from the appliance design (systemd-analyze security, 0-10).
BUDGET = {"mcp-gateway.service": 3.0, "opa.service": 1.5}
# Every executable the units name, faked inside the verify root.
EXECUTABLES = ("opt/mcp-gateway/venv/bin/mcp-gateway", "usr/local/bin/opa", "bin/kill")


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("systemd-analyze")
    assert tool is not None, "systemd-analyze is missing (Debian package systemd)"
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=120)


def test_units_verify(tmp_path: Path) -> None:
    """systemd-analyze verify: no unknown keys, bad values or missing dependencies."""
    root = tmp_path / "root"
    (root / "usr" / "lib" / "systemd").mkdir(parents=True)
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    for rel in EXECUTABLES:
        exe = root / rel
        exe.parent.mkdir(parents=True, exist_ok=True)
        exe.write_text("#!/bin/sh\n")
        exe.chmod(0o755)
    units = root / "etc" / "systemd" / "system"
    units.mkdir(parents=True)
    paths = []
    for unit in BUDGET:
        shutil.copy(UNITS / unit, units / unit)
        paths.append(str(units / unit))
    out = analyze("verify", f"--root={root}", "--man=no", "--generators=no", *paths)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout + out.stderr == ""


@pytest.mark.parametrize("unit", sorted(BUDGET))
def test_exposure_within_budget(unit: str) -> None:
    """systemd-analyze security --offline=true scores the unit at or below its budget."""
    out = analyze("security", "--offline=true", "--no-pager", str(UNITS / unit))
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d)", out.stdout)
    assert match, out.stdout + out.stderr
    assert float(match.group(1)) <= BUDGET[unit], out.stdout


def _directives(unit: str) -> list[tuple[str, str, str]]:
    """(key, value, the comment line just above it or "") for every directive."""
    lines = (UNITS / unit).read_text().splitlines()
    found = []
    for i, line in enumerate(lines):
        if "=" in line and not line.startswith(("#", " ", "[")):
            key, value = line.split("=", 1)
            above = lines[i - 1] if i and lines[i - 1].startswith("#") else ""
            found.append((key, value, above))
    return found


def test_gateway_unit_shape() -> None:
    """Type=notify with a watchdog, its own user and directories, delegated cgroups."""
    d = {k: v for k, v, _ in _directives("mcp-gateway.service")}
    assert d["Type"] == "notify"
    assert d["WatchdogSec"] == "30s"
    assert d["User"] == "mcp-gateway"
    assert d["Delegate"] == "yes"
    for key in ("StateDirectory", "LogsDirectory", "RuntimeDirectory"):
        assert d[key] == "mcp-gateway"
    assert d["NoNewPrivileges"] == "yes"
    assert d["CapabilityBoundingSet"] == ""


RELAXATIONS = {
    ("RestrictNamespaces", "user mnt pid net ipc uts cgroup"),
    ("ProtectKernelTunables", "no"),
    ("ProtectKernelLogs", "no"),
    ("ProtectControlGroups", "no"),
    ("PrivateUsers", "no"),
    ("ProcSubset", "all"),
    ("ProtectHostname", "no"),
    ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6 AF_NETLINK"),
    ("SystemCallFilter", "@system-service @mount sethostname setdomainname seccomp"),
}


def test_every_relaxation_says_why() -> None:
    """Each protection the gateway gives up for bubblewrap carries a comment line above it."""
    directives = _directives("mcp-gateway.service")
    relaxed = {(k, v) for k, v, _ in directives} & RELAXATIONS
    assert relaxed == RELAXATIONS
    for key, value, above in directives:
        if (key, value) in RELAXATIONS:
            assert above.startswith("# "), f"{key}={value} has no comment"


def test_opa_unit_has_no_network_and_a_unix_socket() -> None:
    """OPA: no network namespace access, the socket only, token auth on."""
    d = {k: v for k, v, _ in _directives("opa.service")}
    assert d["PrivateNetwork"] == "yes"
    assert d["RestrictAddressFamilies"] == "AF_UNIX"
    start = (UNITS / "opa.service").read_text()
    assert "--addr unix:///run/opa/opa.sock" in start
    assert "--authorization=basic" in start
