"""High availability on the lab pair: keepalived VRRP, one floating VIP, measured failovers.

Runs after the appliance tests on the same lab (the session's ``lab``
fixture): the pair was converged by site.yml, which installs keepalived with
the gateway's readiness check.  Each failover case runs a probe loop in the
client namespace (25 probes a second, each a new TLS connection to the VIP),
breaks the active node, and reports the longest run of failed probes.  The
last two cases (link down, power off) leave the pair degraded.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest
from cryptography import x509

from tests.lab.lab import ROOT, TIMINGS, VIP_NAME, Lab, Machine

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.timeout(1800)]

CA = ROOT / ".tools" / "pki" / "ca.pem"
PYTHON = ROOT / ".venv" / "bin" / "python"
MAX_GAP_S = 3.0
MIN_PROBE_RATE = 20.0
# A probe that takes longer has failed.  Each probe is a new TLS handshake
# with a gateway in a machine on a shared 2-core host: 0.3 s was once too
# short before any fault.  Probes run in their own threads, so a longer
# timeout does not lower the rate, and a gap is measured from probe starts.
PROBE_TIMEOUT_S = 1.0
PORT = 8081


# -- observations -----------------------------------------------------------------------


def holders(lab: Lab) -> list[Machine]:
    """The machines whose interface carries the VIP."""
    return [m for m in lab.machines if lab.vip in lab.addresses(m)]


def role(lab: Lab, machine: Machine) -> str:
    """The role keepalived's notify hook last recorded on ``machine``."""
    out = lab.ssh(machine, "cat /run/mcp-vrrp/state 2>/dev/null || true", timeout=20)
    return out.split()[0] if out.split() else "none"


def curl(lab: Lab, url: str, *extra: str) -> tuple[int, str]:
    """(HTTP status, body) of a request from the client namespace (token and lab CA)."""
    argv = ["curl", "-sS", "--max-time", "20", "--cacert", str(CA), "-w", "\n%{http_code}"]
    argv += ["-H", f"Authorization: Bearer {lab.api_token}", *extra, url]
    out = lab.in_client(*argv, timeout=30)
    body, _, status = out.rpartition("\n")
    return int(status), body


def echo_via_vip(lab: Lab, text: str) -> str:
    """``echo text`` run through the VIP (REST, wait); its stdout."""
    status, body = curl(
        lab, f"https://{lab.vip}:{PORT}/v1/commands", "-H", "Content-Type: application/json",
        "-d", json.dumps({"command": "echo", "args": [text], "wait": True}),
    )  # fmt: skip
    assert status == 200, body
    return str(json.loads(body)["stdout"])


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out ({timeout}s) waiting until {what}")


def wait_stable(lab: Lab, timeout: float = 120) -> tuple[Machine, Machine]:
    """Exactly one node holds the VIP and reports master; the other reports backup."""
    deadline = time.monotonic() + timeout
    seen = ""
    while time.monotonic() < deadline:
        held = holders(lab)
        if len(held) == 1:
            master = held[0]
            backup = next(m for m in lab.machines if m is not master)
            roles = (role(lab, master), role(lab, backup))
            seen = f"{master.name} holds the VIP; roles {roles}"
            if roles == ("master", "backup"):
                return master, backup
        else:
            seen = f"VIP holders: {[m.name for m in held]}"
        time.sleep(0.5)
    raise AssertionError(f"the pair did not settle within {timeout}s: {seen}" + lab.diagnostics())


def main_pid(lab: Lab, machine: Machine) -> str:
    return lab.ssh(machine, "systemctl show -P MainPID mcp-gateway").strip()


def inventory_name(lab: Lab, machine: Machine) -> str:
    return f"n{lab.machines.index(machine) + 1}"


def client_loop(lab: Lab, module: str, url: str, *options: str) -> subprocess.Popen[str]:
    """``python -m module url`` in the client namespace, with the lab's token and CA.

    The token goes as ``--token=VALUE``: a fresh token may begin with ``-``,
    and argparse takes a separate argument that does for an option.
    """
    return subprocess.Popen(
        ["ip", "netns", "exec", lab.client, str(PYTHON), "-m", module, url,
         f"--token={lab.api_token}", "--ca", str(CA), *options],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip


class Probe:
    """The probe loop (tests/lab/probe.py) against the VIP, in the client namespace."""

    def __init__(self, lab: Lab) -> None:
        self.proc = client_loop(
            lab, "tests.lab.probe", f"https://{lab.vip}:{PORT}/v1/files",
            "--interval", "0.04", "--timeout", str(PROBE_TIMEOUT_S), "--max-seconds", "120",
        )  # fmt: skip

    def stop(self) -> list[tuple[float, bool]]:
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=30)
        return [(float(t), bool(ok)) for t, ok in json.loads(out)["probes"]]


def outage(probes: list[tuple[float, bool]], since: float) -> float:
    """The longest run of failed probes started after ``since``, first failure to next success.

    Infinite when the probes never succeeded again.
    """
    worst = 0.0
    first_failed: float | None = None
    for started, ok in probes:
        if started < since:
            continue
        if not ok and first_failed is None:
            first_failed = started
        elif ok and first_failed is not None:
            worst = max(worst, started - first_failed)
            first_failed = None
    return math.inf if first_failed is not None else worst


class Repairs:
    """Faults undone at teardown, even when the test failed.

    A failed case must not leave the pair broken for the next ones (a link
    still down, a gateway still stopped).  A repair must be harmless when
    the test has undone its fault already.
    """

    def __init__(self) -> None:
        self.steps: list[Callable[[], object]] = []

    def fault(
        self, fault: Callable[[Machine], object], repair: Callable[[Machine], object]
    ) -> Callable[[Machine], None]:
        """``fault`` for :func:`failover`, with ``repair`` of the same machine at teardown."""

        def apply(machine: Machine) -> None:
            self.steps.append(lambda: repair(machine))
            fault(machine)

        return apply


@pytest.fixture
def repairs() -> Iterator[Repairs]:
    pending = Repairs()
    yield pending
    for step in reversed(pending.steps):
        step()


def failover(
    lab: Lab, case: str, fault: Callable[[Machine], object], *, moved_timeout: float = 30
) -> tuple[Machine, Machine]:
    """Break the active node under a probe loop; check the VIP moved and measure the gap."""
    master, backup = wait_stable(lab)
    probe = Probe(lab)
    try:
        time.sleep(2)
        started = time.monotonic()
        fault(master)
        wait_for(lambda: backup in holders(lab), moved_timeout, f"{backup.name} holds the VIP")
        time.sleep(3)
    finally:
        probes = probe.stop()
    span = probes[-1][0] - probes[0][0]
    rate = len(probes) / span
    gap = outage(probes, started)
    TIMINGS[f"failover_gap_{case}_s"] = gap
    failed = sum(1 for t, ok in probes if t >= started and not ok)
    print(f"\nfailover {case}: gap {gap:.2f}s, {failed} failed of {len(probes)} ({rate:.0f}/s)")
    assert rate >= MIN_PROBE_RATE, f"only {rate:.1f} probes/s"
    assert all(ok for t, ok in probes if t < started), "probes failed before the fault"
    assert probes[-1][1], "the last probe failed: service did not resume"
    assert gap <= MAX_GAP_S, f"{case}: {gap:.2f}s of failed probes (at most {MAX_GAP_S}s)"
    return master, backup


def assert_no_failback(lab: Lab, recovered: Machine, serving: Machine) -> None:
    """The recovered node rejoins as backup and the VIP stays where it is (nopreempt)."""
    wait_for(lambda: role(lab, recovered) == "backup", 90, f"{recovered.name} rejoins as backup")
    for _ in range(10):
        assert holders(lab) == [serving], "the VIP moved back to the recovered node (flapping)"
        time.sleep(0.5)


# -- the pair ---------------------------------------------------------------------------------


def test_exactly_one_node_holds_the_vip_and_serves_through_it(lab: Lab) -> None:
    master, backup = wait_stable(lab)
    assert echo_via_vip(lab, "via the VIP") == "via the VIP\n"
    # The gateway reports its role in /ready and as a metric, on both nodes.
    for machine, expected in ((master, "master"), (backup, "backup")):
        status, body = curl(lab, f"https://{machine.address}:{PORT}/ready")
        assert status == 200, body
        assert json.loads(body)["checks"]["vrrp"] == {"role": expected}, body
        status, metrics = curl(lab, f"https://{machine.address}:{PORT}/metrics")
        assert f'mcp_vrrp_role{{role="{expected}"}} 1.0' in metrics
    # Clients verify one name whichever node serves: the VIP's name is in both certificates.
    for machine in lab.machines:
        out = lab.in_client(
            "curl", "-sS", "--cacert", str(CA),
            "--resolve", f"{VIP_NAME}:{PORT}:{machine.address}", f"https://{VIP_NAME}:{PORT}/health",
        )  # fmt: skip
        assert "ok" in out, out


def test_failover_when_the_gateway_is_killed(lab: Lab) -> None:
    master, backup = failover(
        lab, "gateway_killed", lambda m: lab.ssh(m, "systemctl kill -s KILL mcp-gateway")
    )
    # systemd restarts it; it rejoins as backup and the VIP stays.
    assert_no_failback(lab, master, backup)


def test_failover_when_the_gateway_hangs(lab: Lab, repairs: Repairs) -> None:
    def resume(machine: Machine) -> None:
        lab.ssh(machine, "systemctl kill -s CONT mcp-gateway")

    hang = repairs.fault(lambda m: lab.ssh(m, "systemctl kill -s STOP mcp-gateway"), resume)
    master, backup = failover(lab, "gateway_hung", hang)
    resume(master)
    assert_no_failback(lab, master, backup)


def test_failover_when_opa_stops(lab: Lab, repairs: Repairs) -> None:
    def start_opa(machine: Machine) -> None:
        lab.ssh(machine, "systemctl start opa")

    stop_opa = repairs.fault(lambda m: lab.ssh(m, "systemctl stop opa"), start_opa)
    master, backup = failover(lab, "opa_stopped", stop_opa)
    status, body = curl(lab, f"https://{master.address}:{PORT}/ready")
    assert status == 503, body
    assert json.loads(body)["checks"]["policy"]["ok"] is False, body
    start_opa(master)
    assert_no_failback(lab, master, backup)


def test_failover_when_keepalived_is_killed(lab: Lab) -> None:
    master, backup = failover(
        lab, "keepalived_killed", lambda m: lab.ssh(m, "systemctl kill -s KILL keepalived")
    )
    # Restart=on-failure brings keepalived back; it drops the stale VIP first.
    assert_no_failback(lab, master, backup)


def test_a_task_polled_after_a_failover_is_reported_lost_not_missing(lab: Lab) -> None:
    master, backup = wait_stable(lab)
    status, body = curl(
        lab, f"https://{lab.vip}:{PORT}/v1/commands", "-H", "Content-Type: application/json",
        "-d", json.dumps({"command": "sleep", "args": ["120"], "timeout": 300}),
    )  # fmt: skip
    assert status in (200, 202), body
    task_id = json.loads(body)["task_id"]
    lab.ssh(master, "systemctl stop keepalived")  # a controlled failover
    try:
        wait_for(lambda: holders(lab) == [backup], 30, f"{backup.name} holds the VIP")
        status, body = curl(lab, f"https://{lab.vip}:{PORT}/v1/tasks/{task_id}")
        assert status == 409, body
        error = json.loads(body)["error"]
        assert error["code"] == "FAILED_PRECONDITION"
        assert "task_state=LOST" in error["reasons"], error
        assert f"node={inventory_name(lab, master)}" in error["reasons"], error
        # The node that runs it still has it.
        status, body = curl(lab, f"https://{master.address}:{PORT}/v1/tasks/{task_id}")
        assert status == 200, body
        assert json.loads(body)["state"] == "RUNNING", body
        curl(lab, f"https://{master.address}:{PORT}/v1/tasks/{task_id}/cancel", "-X", "POST")
    finally:
        lab.ssh(master, "systemctl start keepalived")
    assert_no_failback(lab, master, backup)


def rolling(lab: Lab, playbook: str) -> dict[str, object]:
    """Run a rolling playbook with a client-library loop on the VIP; return the loop's report."""
    wait_stable(lab)
    pids = {m.name: main_pid(lab, m) for m in lab.machines}
    loop = client_loop(lab, "tests.lab.client_loop", f"https://{lab.vip}:{PORT}")
    try:
        time.sleep(2)
        started = time.monotonic()
        result = lab.playbook(playbook)
        TIMINGS[f"{playbook}_s"] = time.monotonic() - started
        time.sleep(2)
    finally:
        loop.send_signal(signal.SIGTERM)
        out, _ = loop.communicate(timeout=60)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
    report: dict[str, object] = json.loads(out)
    TIMINGS[f"{playbook}_client_requests"] = float(str(report["requests"]))
    TIMINGS[f"{playbook}_client_retries"] = float(str(report["retries"]))
    print(f"\n{playbook}: {report['requests']} requests, {report['retries']} retries")
    assert report["failures"] == [], report["failures"]
    assert int(str(report["requests"])) > 100
    # Every gateway was restarted, and the pair is whole again.
    after = {m.name: main_pid(lab, m) for m in lab.machines}
    assert all(after[name] != pids[name] for name in pids), (pids, after)
    wait_stable(lab)
    return report


def server_certificate(lab: Lab, machine: Machine) -> x509.Certificate:
    pem = lab.in_client(
        str(PYTHON), "-c",
        f"import ssl; print(ssl.get_server_certificate(('{machine.address}', {PORT})))",
    )  # fmt: skip
    return x509.load_pem_x509_certificate(pem.encode())


def test_rolling_upgrade_fails_no_request(lab: Lab) -> None:
    """upgrade.yml with a client-library loop on the VIP: zero failed requests."""
    rolling(lab, "upgrade.yml")


def test_certificate_rotation_is_rolling_and_keeps_the_vip_name(lab: Lab) -> None:
    before = {m.name: server_certificate(lab, m).serial_number for m in lab.machines}
    rolling(lab, "rotate-certs.yml")
    for machine in lab.machines:
        cert = server_certificate(lab, machine)
        assert cert.serial_number != before[machine.name]
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert VIP_NAME in names.get_values_for_type(x509.DNSName)
        assert lab.vip in [str(ip) for ip in names.get_values_for_type(x509.IPAddress)]


def test_failover_when_the_link_goes_down(lab: Lab, repairs: Repairs) -> None:
    def plug(machine: Machine) -> None:
        lab.set_link(machine, True)

    master, _ = failover(lab, "link_down", repairs.fault(lambda m: lab.set_link(m, False), plug))
    plug(master)
    # Two masters meet again: one yields, and the pair settles with one VIP holder.
    wait_stable(lab)


def test_failover_when_the_node_is_powered_off(lab: Lab) -> None:
    _, backup = failover(
        lab, "powered_off", lambda m: lab.poweroff(m, unplug=True), moved_timeout=30
    )
    assert holders(lab) == [backup]
    assert echo_via_vip(lab, "still here") == "still here\n"
