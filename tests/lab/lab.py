"""A fleet of Debian 12 machines on one box: systemd-nspawn, network namespaces, a bridge.

Layout (addresses from 198.18.0.0/15, which exist only inside the lab's own
namespaces; nothing is routed off the machine)::

    netns LAB-sw:      br0 ─┬─ veth ── netns LAB-n1: eth0 198.18.0.11  (nspawn machine LAB-n1)
                            ├─ veth ── netns LAB-n2: eth0 198.18.0.12  (nspawn machine LAB-n2)
                            └─ veth ── netns LAB-client: eth0 198.18.0.100 (Ansible, probes)

* The image is a debootstrap'd bookworm (systemd, sshd, Python, bubblewrap)
  built once and cached under ``.tools/lab/image`` (keyed by its package
  list and set-up script); every machine boots a copy with systemd as PID 1.
* Ansible runs on this host inside the client namespace and reaches the
  machines over real SSH with a lab key.
* ``LAB`` is ``mcplab-<random>``: several labs can coexist; :meth:`Lab.down`
  stops the machines and deletes every namespace it created, and is safe to
  call twice.  Every wait is bounded.

Lab-only adjustment: nspawn masks files under ``/proc`` (``/proc/kcore``...),
and the kernel then refuses a fresh procfs in a new user namespace, which
bubblewrap needs.  The image mounts one extra, unmasked procfs at
``/run/lab-proc`` at boot (``lab-proc.service``), which satisfies the kernel's
"a fully visible procfs exists" rule.  Real VMs need nothing of the kind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

ROOT = Path(__file__).resolve().parents[2]
LAB_DIR = ROOT / ".tools" / "lab"
SUBNET = "198.18.0"
VIP_NAME = "gateway.lab.test"
# Figures the lab tests report at the end (seconds).
TIMINGS: dict[str, float] = {}
PACKAGES = (
    "systemd,systemd-sysv,dbus,openssh-server,python3,python3-venv,python3-cffi-backend,"
    "python3-cryptography,python3-apt,python3-packaging,bubblewrap,libseccomp2,iproute2,ca-certificates,"
    "util-linux,procps,curl,keepalived"
)
MIRROR = os.environ.get("MCP_LAB_MIRROR", "http://deb.debian.org/debian")

LAB_PROC_UNIT = """\
[Unit]
Description=Lab only: an unmasked procfs, so bubblewrap may mount /proc in a user namespace
DefaultDependencies=no
Before=sysinit.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/mkdir -p /run/lab-proc
ExecStart=/bin/mount -t proc -o nosuid,nodev,noexec proc /run/lab-proc

[Install]
WantedBy=sysinit.target
"""


def run(*argv: str, check: bool = True, timeout: float = 600, **kw: object) -> str:
    out = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, check=False, **kw
    )  # type: ignore[call-overload]
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({out.returncode}): {out.stderr[-2000:]}")
    return str(out.stdout)


def cgroup_roots() -> list[Path]:
    """This process's cgroups in the hierarchies systemd uses (cgroup2, name=systemd)."""
    own: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        own[controllers] = path
    roots = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, mountpoint, fstype, options = line.split()[:4]
        if fstype == "cgroup2" and "" in own:
            roots.append(Path(mountpoint + own[""]))
        elif fstype == "cgroup" and "name=systemd" in options.split(","):
            roots.append(Path(mountpoint + own.get("name=systemd", "/")))
    return roots


def remove_cgroups(prefix: str) -> None:
    """rmdir (bottom-up) every cgroup named ``prefix*`` below :func:`cgroup_roots`."""
    for root in cgroup_roots():
        for top in root.glob(prefix + "*"):
            for directory in sorted(
                (p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)
            ):
                with contextlib.suppress(OSError):
                    directory.rmdir()
            with contextlib.suppress(OSError):
                top.rmdir()


def image_key() -> str:
    return hashlib.sha256((PACKAGES + LAB_PROC_UNIT + MIRROR).encode()).hexdigest()[:16]


def ssh_key() -> Path:
    key = LAB_DIR / "id_ed25519"
    if not key.exists():
        LAB_DIR.mkdir(parents=True, exist_ok=True)
        run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "mcp-lab", "-f", str(key))
    return key


def build_image() -> Path:
    """The cached machine image (built on first use: a few minutes)."""
    image = LAB_DIR / f"image-{image_key()}"
    if image.exists():
        return image
    tmp = LAB_DIR / f"image-{image_key()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    LAB_DIR.mkdir(parents=True, exist_ok=True)
    run("debootstrap", "--variant=minbase", f"--include={PACKAGES}", "bookworm", str(tmp), MIRROR,
        timeout=1800)  # fmt: skip
    (tmp / "etc/apt/sources.list").write_text("")  # air-gapped: packages come with the image
    ssh_dir = tmp / "root/.ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    (ssh_dir / "authorized_keys").write_text(ssh_key().with_suffix(".pub").read_text())
    (ssh_dir / "authorized_keys").chmod(0o600)
    unit = tmp / "etc/systemd/system/lab-proc.service"
    unit.write_text(LAB_PROC_UNIT)
    wants = tmp / "etc/systemd/system/sysinit.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / "lab-proc.service").symlink_to("/etc/systemd/system/lab-proc.service")
    # Nothing in the lab answers DNS; sshd must not wait for it.
    (tmp / "etc/ssh/sshd_config.d").mkdir(exist_ok=True)
    (tmp / "etc/ssh/sshd_config.d/lab.conf").write_text(
        "UseDNS no\nPermitRootLogin prohibit-password\n"
    )
    tmp.rename(image)
    return image


def build_wheelhouse() -> Path:
    """The gateway's wheels from this tree (plus its dependencies) for the mcp_gateway role.

    Rebuilt every time: the role installs by version, and the lab must test
    this tree's code, not a wheel left from an earlier build.
    """
    wheelhouse = ROOT / ".tools" / "wheelhouse"
    shutil.rmtree(wheelhouse, ignore_errors=True)
    python = ROOT / ".venv" / "bin" / "python"
    run(str(python), "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(wheelhouse), str(ROOT),
        timeout=900)  # fmt: skip
    return wheelhouse


@dataclass
class Machine:
    name: str
    address: str
    netns: str
    root: Path
    proc: subprocess.Popen[bytes] | None = None


@dataclass
class Lab:
    """One lab: ``size`` machines and a client namespace."""

    size: int = 2
    lab_id: str = field(default_factory=lambda: "mcplab-" + secrets.token_hex(3))
    machines: list[Machine] = field(default_factory=list)
    # The API token a lab client uses (subject "lab", role developer) and the
    # gateways' token for OPA; both fresh for every lab.
    api_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    opa_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))

    @property
    def vip(self) -> str:
        """The pair's floating address (keepalived)."""
        return f"{SUBNET}.10"

    @property
    def switch(self) -> str:
        return f"{self.lab_id}-sw"

    @property
    def client(self) -> str:
        return f"{self.lab_id}-client"

    @property
    def workdir(self) -> Path:
        return LAB_DIR / self.lab_id

    # -- network -------------------------------------------------------------------------

    def port(self, index: int) -> str:
        """The bridge-side end of veth ``index`` (0: the client, i: machine n<i>)."""
        return f"{self.lab_id[-6:]}p{index}"

    def _attach(self, netns: str, address: str, index: int) -> None:
        """A veth from ``netns`` (eth0, ``address``/24) to the bridge."""
        outer = self.port(index)
        run("ip", "netns", "add", netns)
        run("ip", "link", "add", outer, "type", "veth", "peer", "name", "eth0", "netns", netns)
        run("ip", "link", "set", outer, "netns", self.switch)
        run("ip", "-n", self.switch, "link", "set", outer, "master", "br0", "up")
        run("ip", "-n", netns, "addr", "add", f"{address}/24", "dev", "eth0")
        run("ip", "-n", netns, "link", "set", "eth0", "up")
        run("ip", "-n", netns, "link", "set", "lo", "up")

    def in_client(self, *argv: str, timeout: float = 600, check: bool = True) -> str:
        return run("ip", "netns", "exec", self.client, *argv, timeout=timeout, check=check)

    # -- lifecycle ---------------------------------------------------------------------------

    def up(self, boot_timeout: float = 120) -> None:
        image = build_image()
        build_wheelhouse()
        self.workdir.mkdir(parents=True)
        run("ip", "netns", "add", self.switch)
        run("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", self.switch, "link", "set", "br0", "up")
        self._attach(self.client, f"{SUBNET}.100", 0)
        for i in range(1, self.size + 1):
            name = f"{self.lab_id}-n{i}"
            machine = Machine(name, f"{SUBNET}.{10 + i}", name, self.workdir / name)
            self.machines.append(machine)
            self._attach(machine.netns, machine.address, i)
            run("cp", "-a", "--reflink=auto", str(image), str(machine.root))
            (machine.root / "etc/hostname").write_text(f"n{i}\n")
            self.boot(machine)
        for machine in self.machines:
            self.wait_ssh(machine, boot_timeout)

    def boot(self, machine: Machine) -> None:
        with (self.workdir / f"{machine.name}.console").open("ab") as log:
            machine.proc = self._nspawn(machine, log)

    @staticmethod
    def _nspawn(machine: Machine, log: BinaryIO) -> subprocess.Popen[bytes]:
        # Without a host systemd, nspawn puts its container in <own cgroup>/payload:
        # two machines started from one process would share one cgroup tree (and
        # their gateways each other's task cgroups).  Each starts in its own.
        procs = []
        for root in cgroup_roots():
            (root / machine.name).mkdir(exist_ok=True)
            procs.append(str(root / machine.name / "cgroup.procs"))

        def own_cgroup() -> None:
            for path in procs:
                with open(path, "w") as f:
                    f.write("0")

        return subprocess.Popen(
            [
                # No host systemd/machined is needed (--register=no --keep-unit).
                "systemd-nspawn",
                "--quiet",
                "--boot",
                "--register=no",
                "--keep-unit",
                f"--directory={machine.root}",
                f"--machine={machine.name}",
                f"--network-namespace-path=/run/netns/{machine.netns}",
                "--console=passive",
                "--kill-signal=SIGRTMIN+3",
                # The machine owns its network namespace (keepalived adds the
                # VIP): what --private-network would grant.
                "--capability=CAP_NET_ADMIN",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            preexec_fn=own_cgroup,
        )

    def ssh_argv(self, machine: Machine) -> list[str]:
        return [
            "ssh", "-i", str(ssh_key()), "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=3", f"root@{machine.address}",
        ]  # fmt: skip

    def ssh(self, machine: Machine, command: str, timeout: float = 120, check: bool = True) -> str:
        return self.in_client(*self.ssh_argv(machine), command, timeout=timeout, check=check)

    def wait_ssh(self, machine: Machine, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if machine.proc is not None and machine.proc.poll() is not None:
                raise RuntimeError(f"{machine.name} exited during boot: {self.console(machine)}")
            try:
                self.ssh(machine, "systemctl is-system-running --wait || true", timeout=60)
                return
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                last = str(exc)
                time.sleep(1)
        raise RuntimeError(
            f"{machine.name}: no SSH within {timeout}s: {last}; console: {self.console(machine)}"
        )

    def console(self, machine: Machine) -> str:
        path = self.workdir / f"{machine.name}.console"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def diagnostics(self) -> str:
        """The units' journals and states on every machine, for a failed converge's report."""
        parts = []
        for machine in self.machines:
            out = self.ssh(
                machine,
                "journalctl --no-pager -o cat -u mcp-gateway.service | grep -m5 'failed to start'; "
                "systemctl --no-pager status mcp-gateway.service opa.service keepalived.service; "
                "journalctl --no-pager -n 40 -u mcp-gateway.service -u keepalived.service",
                check=False,
            )
            parts.append(f"\n--- {machine.name} ---\n{out[:3000]}\n[...]\n{out[-3000:]}")
        return "".join(parts)

    @staticmethod
    def _init_pid(machine: Machine) -> int | None:
        """The machine's PID 1 as seen from here (nspawn's child)."""
        if machine.proc is None:
            return None
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{machine.proc.pid}/task").iterdir():
                children = (task / "children").read_text().split()
                if children:
                    return int(children[0])
        return None

    def poweroff(self, machine: Machine, *, unplug: bool = False) -> None:
        """Pull the plug: SIGKILL the machine's PID 1, so its whole PID namespace dies.

        With ``unplug`` its network namespace goes too, as a powered-off NIC
        does: the addresses it held (a VIP, say) stop answering ARP.
        """
        init = self._init_pid(machine)
        if init is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(init, signal.SIGKILL)
        if machine.proc is not None and machine.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(machine.proc.pid, signal.SIGKILL)
            machine.proc.wait(30)
        if unplug:
            run("ip", "netns", "delete", machine.netns, check=False)

    def set_link(self, machine: Machine, up: bool) -> None:
        """Cable in or out: the machine's port on the bridge up or down."""
        index = self.machines.index(machine) + 1
        run("ip", "-n", self.switch, "link", "set", self.port(index), "up" if up else "down")

    def addresses(self, machine: Machine) -> list[str]:
        """IPv4 addresses on the machine's eth0 (read from its namespace, no SSH)."""
        out = run("ip", "-n", machine.netns, "-4", "-o", "addr", "show", "dev", "eth0", check=False)
        return [line.split()[3].split("/")[0] for line in out.splitlines() if " inet " in line]

    def down(self) -> None:
        for machine in self.machines:
            if machine.proc is not None and machine.proc.poll() is None:
                # nspawn turns SIGTERM into --kill-signal (systemd's orderly poweroff).
                machine.proc.terminate()
        for machine in self.machines:
            if machine.proc is None:
                continue
            try:
                machine.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.poweroff(machine)
        # SSH connection masters of this lab (ansible's ControlPersist).
        run("pkill", "-f", f"ssh: {self.workdir}/cp/", check=False)
        for netns in [m.netns for m in self.machines] + [self.client, self.switch]:
            run("ip", "netns", "delete", netns, check=False)
        remove_cgroups(self.lab_id + "-")
        shutil.rmtree(self.workdir, ignore_errors=True)

    def ansible_env(self) -> dict[str, str]:
        """Environment for ansible-playbook in the client namespace."""
        return {
            "PATH": f"{ROOT / '.venv' / 'bin'}:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": os.environ.get("HOME", "/root"),
            "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
            "ANSIBLE_NOCOLOR": "1",
            # Connection masters per lab: never reuse one into another lab's namespace.
            "ANSIBLE_SSH_CONTROL_PATH_DIR": str(self.workdir / "cp"),
        }

    def playbook(
        self, playbook: str, *args: str, timeout: float = 1200
    ) -> subprocess.CompletedProcess[str]:
        """Run ``playbooks/<playbook>`` against this lab from the client namespace."""
        return subprocess.run(
            ["ip", "netns", "exec", self.client, str(ROOT / ".venv" / "bin" / "ansible-playbook"),
             "-i", str(self.inventory()), str(ROOT / "playbooks" / playbook), *args],
            capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=self.ansible_env(),
            check=False,
        )  # fmt: skip

    # -- Ansible -------------------------------------------------------------------------------

    def inventory(self) -> Path:
        """inventories/lab/hosts.yml for this lab (one pair)."""
        path = ROOT / "inventories" / "lab" / "hosts.yml"
        path.parent.mkdir(parents=True, exist_ok=True)
        hosts = "".join(
            f"        n{i}:\n          ansible_host: {m.address}\n"
            for i, m in enumerate(self.machines, start=1)
        )
        path.write_text(
            "---\n# Generated by tests/lab (do not edit): the lab's one pair.\n"
            "mcp_gateways:\n  children:\n    lab_pair:\n      hosts:\n" + hosts
            + "  vars:\n    ansible_user: root\n"
            f"    ansible_ssh_private_key_file: {ssh_key()}\n"
            "    ansible_ssh_common_args: >-\n"
            "      -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null\n"
            f"    mcp_gateway_opa_token: {json.dumps(self.opa_token)}\n"
            "    mcp_gateway_tokens:\n"
            "      - subject: lab\n        roles: [developer]\n"
            f"        sha256: {hashlib.sha256(self.api_token.encode()).hexdigest()}\n"
            f"    mcp_gateway_vip_names: [{VIP_NAME}]\n"
            f"    mcp_gateway_vip_addresses: [{self.vip}]\n"
            "    keepalived_virtual_router_id: 51\n"
        )  # fmt: skip
        return path


def teardown(lab_id: str) -> None:
    """Tear down a lab by id from any process (make lab-down, or after a crash)."""
    for pid_text in run("pgrep", "-f", "--", f"--machine={lab_id}-", check=False).split():
        nspawn = int(pid_text)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{nspawn}/task").iterdir():
                for child in (task / "children").read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(child), signal.SIGKILL)  # the machine's PID 1
        with contextlib.suppress(ProcessLookupError):
            os.kill(nspawn, signal.SIGKILL)
    run("pkill", "-f", f"ssh: {LAB_DIR / lab_id}/cp/", check=False)
    for line in run("ip", "netns", "list", check=False).splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(lab_id + "-"):
            run("ip", "netns", "delete", name, check=False)
    remove_cgroups(lab_id + "-")
    shutil.rmtree(LAB_DIR / lab_id, ignore_errors=True)
