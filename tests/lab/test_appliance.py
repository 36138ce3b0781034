"""The appliance on a fleet of real systemd machines: site.yml over SSH, then probes from a client.

Two fresh Debian 12 machines (systemd-nspawn, systemd as PID 1, sshd) in their
own network namespaces on a bridge; Ansible converges them from the client
namespace; everything below is checked from there or over SSH.
"""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest

from tests.lab.lab import ROOT, TIMINGS, Lab, Machine

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.timeout(1800)]

CA = ROOT / ".tools" / "pki" / "ca.pem"
GRPCURL = ROOT / ".tools" / "bin" / "grpcurl"


def recap(stdout: str) -> dict[str, dict[str, int]]:
    """PLAY RECAP counters per host."""
    found = {}
    for line in stdout.splitlines():
        match = re.match(r"^(\S+)\s+: (.*)$", line)
        if match and "ok=" in match.group(2):
            counts = dict(re.findall(r"(\w+)=(\d+)", match.group(2)))
            found[match.group(1)] = {k: int(v) for k, v in counts.items()}
    return found


def rest(lab: Lab, machine: Machine, path: str, body: object | None = None) -> dict[str, object]:
    argv = ["curl", "-sS", "--fail-with-body", "--max-time", "30", "--cacert", str(CA)]
    argv += ["-H", f"Authorization: Bearer {lab.api_token}"]
    if body is not None:
        argv += ["-H", "Content-Type: application/json", "-d", json.dumps(body)]
    out = lab.in_client(*argv, f"https://{machine.address}:8081{path}", timeout=60)
    result: dict[str, object] = json.loads(out)
    return result


def unit_property(lab: Lab, machine: Machine, unit: str, prop: str) -> str:
    return lab.ssh(machine, f"systemctl show -P {prop} {unit}").strip()


def test_both_gateways_run_commands_over_rest_and_grpc_with_tls(lab: Lab) -> None:
    """REST and gRPC over TLS (the internal CA, the node's address in the SANs) with a token."""
    for machine in lab.machines:
        task = rest(lab, machine, "/v1/commands", {"command": "echo", "args": ["hi"], "wait": True})
        assert (task["state"], task["stdout"], task["owner"]) == ("COMPLETED", "hi\n", "lab")
        body = json.dumps({"command": "echo", "args": ["rpc"], "timeout": 30, "wait": True})
        argv = [str(GRPCURL), "-cacert", str(CA), "-H", f"authorization: Bearer {lab.api_token}"]
        argv += ["-d", body, f"{machine.address}:50051", "mcp.McpService/ExecuteCommand"]
        reply = lab.in_client(*argv)
        assert json.loads(reply)["result"]["stdout"] == "rpc\n"


def test_the_sandbox_works_under_the_hardened_unit(lab: Lab) -> None:
    """bwrap inside the machine: nested pid namespace, no capabilities, seccomp, no network."""
    machine = lab.machines[0]
    ready = rest(lab, machine, "/ready")
    assert ready["ready"] is True, ready
    task = rest(
        lab,
        machine,
        "/v1/commands",
        {"command": "cat", "args": ["/proc/self/status"], "wait": True},
    )
    status = str(task["stdout"])
    # Its own pid namespace: the command is pid 2 under the sandbox's init.
    assert re.search(r"^Pid:\s+2$", status, re.M), status
    assert re.search(r"^PPid:\s+1$", status, re.M), status
    assert re.search(r"^CapEff:\s+0+$", status, re.M), status
    assert re.search(r"^Seccomp:\s+2$", status, re.M), status
    net = rest(
        lab, machine, "/v1/commands", {"command": "cat", "args": ["/proc/net/dev"], "wait": True}
    )
    interfaces = [ln.split(":")[0].strip() for ln in str(net["stdout"]).splitlines()[2:]]
    assert interfaces == ["lo"]


def test_units_are_active_and_opa_answers_only_on_its_socket(lab: Lab) -> None:
    """systemctl is-active for both units; OPA has no TCP listener, only a 0660 socket."""
    for machine in lab.machines:
        assert lab.ssh(machine, "systemctl is-active mcp-gateway opa").split() == ["active"] * 2
        listeners = lab.ssh(machine, "ss -Hltnp")
        assert "opa" not in listeners, listeners
        sock = lab.ssh(machine, "stat -c '%F %a %U %G' /run/opa/opa.sock").strip()
        assert sock == "socket 660 opa opa"
        assert unit_property(lab, machine, "opa.service", "PrivateNetwork") == "yes"


def test_journald_holds_the_audit_stream(lab: Lab) -> None:
    """Audit records reach journald (identifier mcp-gateway-audit) besides the file."""
    machine = lab.machines[0]
    rest(lab, machine, "/v1/commands", {"command": "true", "wait": True})
    out = lab.ssh(machine, "journalctl -t mcp-gateway-audit -o cat --no-pager | tail -50")
    events = [json.loads(line)["event"] for line in out.splitlines() if line.startswith("{")]
    assert "policy.decision" in events
    assert "task.completed" in events
    verify = lab.ssh(
        machine,
        "runuser -u mcp-gateway -- /opt/mcp-gateway/venv/bin/mcp-gateway audit verify "
        "/var/lib/mcp-gateway/audit.log",
    )
    assert "ok" in verify.lower()


def test_second_run_changes_nothing(lab: Lab) -> None:
    """site.yml is idempotent: changed=0 on every host."""
    started = time.monotonic()
    result = lab.playbook("site.yml")
    TIMINGS["second_converge_s"] = time.monotonic() - started
    assert result.returncode == 0, result.stdout[-3000:]
    counts = recap(result.stdout)
    assert set(counts) == {f"n{i}" for i in range(1, len(lab.machines) + 1)}, result.stdout[-2000:]
    changed = {host: c["changed"] for host, c in counts.items()}
    assert changed == dict.fromkeys(counts, 0), result.stdout[-6000:]


def test_molecule_scenario_converges_is_idempotent_and_verifies(lab: Lab) -> None:
    """molecule (default driver, managed: false) on the lab: converge, idempotence, verify."""
    lab.inventory()
    env = {**lab.ansible_env(), "MOLECULE_NO_LOG": "false", "PY_COLORS": "0"}
    started = time.monotonic()
    result = subprocess.run(
        ["ip", "netns", "exec", lab.client, str(ROOT / ".venv" / "bin" / "molecule"),
         "test", "--scenario-name", "appliance"],
        capture_output=True, text=True, timeout=1200, cwd=ROOT / "tests" / "lab", env=env,
        check=False,
    )  # fmt: skip
    TIMINGS["molecule_s"] = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    # The scenario recap: syntax, converge, idempotence and verify all succeeded.
    assert re.search(r"appliance\s+: actions=4\s+successful=4\s", output), output[-4000:]
    for step in ("converge", "idempotence", "verify"):
        assert f"[appliance > {step}] Executed: Successful" in output, output[-4000:]


def _wait_restarted(lab: Lab, machine: Machine, before: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        restarts = int(unit_property(lab, machine, "mcp-gateway.service", "NRestarts"))
        state = unit_property(lab, machine, "mcp-gateway.service", "ActiveState")
        if restarts > before and state == "active":
            return restarts
        time.sleep(0.5)
    raise AssertionError(lab.ssh(machine, "journalctl -u mcp-gateway --no-pager -n 30"))


def test_systemd_restarts_a_killed_gateway(lab: Lab) -> None:
    """systemctl kill -s KILL: Restart=on-failure brings it back, and it serves again."""
    machine = lab.machines[1]
    before = int(unit_property(lab, machine, "mcp-gateway.service", "NRestarts"))
    lab.ssh(machine, "systemctl kill -s KILL --kill-whom=main mcp-gateway")
    _wait_restarted(lab, machine, before)
    task = rest(lab, machine, "/v1/commands", {"command": "echo", "args": ["back"], "wait": True})
    assert task["stdout"] == "back\n"


def test_watchdog_detects_a_stalled_gateway(lab: Lab) -> None:
    """A stopped (SIGSTOP) gateway misses its watchdog pings; systemd kills and restarts it."""
    machine = lab.machines[1]
    lab.ssh(
        machine,
        "mkdir -p /run/systemd/system/mcp-gateway.service.d && "
        "printf '[Service]\\nWatchdogSec=3s\\n' > /run/systemd/system/mcp-gateway.service.d/wd.conf"
        " && systemctl daemon-reload && systemctl restart mcp-gateway",
    )
    try:
        before = int(unit_property(lab, machine, "mcp-gateway.service", "NRestarts"))
        lab.ssh(machine, "systemctl kill -s STOP --kill-whom=main mcp-gateway")
        _wait_restarted(lab, machine, before)
        journal = lab.ssh(machine, "journalctl -u mcp-gateway --no-pager -n 50")
        assert "Watchdog timeout" in journal, journal
    finally:
        lab.ssh(
            machine,
            "rm -rf /run/systemd/system/mcp-gateway.service.d && systemctl daemon-reload && "
            "systemctl restart mcp-gateway",
            check=False,
        )


def test_lab_addresses_exist_only_in_its_namespaces(lab: Lab) -> None:
    """The host itself has no lab address: nothing of the lab is reachable from outside it."""
    host = subprocess.run(["ip", "-o", "addr", "show"], capture_output=True, text=True, check=True)
    assert "198.18.0." not in host.stdout
    assert lab.machines[0].address in lab.ssh(lab.machines[0], "ip -o addr show dev eth0")
