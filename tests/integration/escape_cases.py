"""The sandbox escape battery: a table of attempts and what containment looks like.

Each :class:`EscapeCase` is a command line (plus optional stdin, limit
overrides, a cancel delay), a check over the run's :class:`Outcome`, and an
optional host-side post-condition.  Nothing here knows *how* a command is
run: a runner (``Callable[[EscapeCase, HostContext], Awaitable[Outcome]]``)
does that, so the same table can be run directly through
:class:`gateway.sandbox.BwrapSandbox` or through the REST API.

Command lines may contain ``@NAME@`` placeholders for the fields of
:class:`HostContext` (``@TOKEN@``, ``@SECRET@``, ``@OTHER@``, ``@PORT@``,
``@ABSTRACT@``); :meth:`HostContext.fill` substitutes them.  Raw system
calls are made with ``python3 -c`` and ctypes (python3 lives in ``/usr``,
so it exists inside the sandbox); their numbers are resolved on the host by
libseccomp, so the table is not tied to x86-64.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import secrets
import socket
import stat
import subprocess
from collections.abc import Awaitable, Callable, Mapping

import pyseccomp

__all__ = ["ESCAPE_CASES", "EscapeCase", "HostContext", "Outcome", "Runner"]


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What a runner observed: the command's status and (capped) output."""

    exit_code: int | None
    signal: int | None
    stdout: bytes
    stderr: bytes
    timed_out: bool = False
    cancelled: bool = False
    stdout_bytes: int = 0
    stdout_truncated: bool = False
    error: str | None = None

    @property
    def text(self) -> str:
        return (self.stdout + self.stderr).decode("utf-8", "replace")

    def __str__(self) -> str:
        return (
            f"exit={self.exit_code} signal={self.signal} timed_out={self.timed_out} "
            f"cancelled={self.cancelled} error={self.error}\n"
            f"stdout={self.stdout[:2000]!r}\nstderr={self.stderr[:2000]!r}"
        )


@dataclasses.dataclass(frozen=True)
class HostContext:
    """Host-side facts and bait the fixture prepared for one case.

    ``secret`` is the value of the environment variable ``secret_env`` in
    the gateway process and the content of ``<other_workspace>/secret.txt``;
    ``host_port`` and ``abstract_name`` are listening sockets on the host
    (``connections()`` says whether anything reached them).
    """

    token: str
    secret: str
    secret_env: str
    workspace: str
    other_workspace: str
    host_port: int
    abstract_name: str
    connections: Callable[[], int]
    cgroup_controllers: frozenset[str]
    gateway_is_root: bool

    def fill(self, arg: str) -> str:
        values = {
            "TOKEN": self.token,
            "SECRET": self.secret,
            "OTHER": self.other_workspace,
            "PORT": str(self.host_port),
            "ABSTRACT": self.abstract_name,
        }
        return re.sub(r"@([A-Z]+)@", lambda m: values.get(m.group(1), m.group(0)), arg)


Check = Callable[[Outcome, HostContext], None]
After = Callable[[HostContext], None]


@dataclasses.dataclass(frozen=True)
class EscapeCase:
    """One escape attempt and how to recognise containment."""

    name: str
    argv: tuple[str, ...]
    check: Check
    stdin: bytes | None = None
    limits: Mapping[str, object] = dataclasses.field(default_factory=dict)
    cancel_after_s: float | None = None
    after: After | None = None


Runner = Callable[[EscapeCase, HostContext], Awaitable[Outcome]]


class BaitListeners:
    """A TCP listener on host loopback and one in the abstract unix namespace.

    Sandboxed commands must reach neither; :meth:`connections` counts (and
    drops) whatever did.
    """

    def __init__(self, prefix: str) -> None:
        self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.tcp.bind(("127.0.0.1", 0))
        self.tcp.listen(8)
        self.abstract_name = prefix + secrets.token_hex(6)
        self.unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.unix.bind("\0" + self.abstract_name)
        self.unix.listen(8)

    @property
    def port(self) -> int:
        port: int = self.tcp.getsockname()[1]
        return port

    def connections(self) -> int:
        count = 0
        for sock in (self.tcp, self.unix):
            sock.setblocking(False)
            while True:
                try:
                    conn, _ = sock.accept()
                except BlockingIOError:
                    break
                conn.close()
                count += 1
        return count

    def close(self) -> None:
        self.tcp.close()
        self.unix.close()


# -- building blocks ---------------------------------------------------------------------


def sh(script: str) -> tuple[str, ...]:
    return ("/bin/sh", "-c", script)


def py(code: str) -> tuple[str, ...]:
    return ("python3", "-c", code)


def nr(name: str) -> int:
    """The native syscall number of ``name`` (resolved on the host)."""
    number = pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name)
    if number < 0:
        raise LookupError(name)
    return int(number)


_SYSCALL = """\
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
ret = libc.syscall(ctypes.c_long({nr}), *[ctypes.c_long(a) for a in {args!r}])
print("ret", ret, "errno", ctypes.get_errno() if ret == -1 else 0)
"""


def raw_syscall(name: str, *args: int) -> tuple[str, ...]:
    """Command line making one raw system call and printing ``ret R errno E``."""
    return py(_SYSCALL.format(nr=nr(name), args=list(args)))


def refused_with(code: int) -> Check:
    """The raw syscall returned -1 with errno ``code``."""

    def check(o: Outcome, ctx: HostContext) -> None:
        assert f"ret -1 errno {code}" in o.text, f"expected errno {code}\n{o}"

    return check


def exits_nonzero(*needles: str) -> Check:
    """The command failed and its output mentions every needle."""

    def check(o: Outcome, ctx: HostContext) -> None:
        assert o.exit_code not in (0, None) or o.signal is not None, str(o)
        for needle in needles:
            assert needle in o.text, f"missing {needle!r}\n{o}"

    return check


def prints(*needles: str) -> Check:
    """Every needle appears in the output."""

    def check(o: Outcome, ctx: HostContext) -> None:
        for needle in needles:
            assert needle in o.text, f"missing {needle!r}\n{o}"

    return check


def both(*checks: Check) -> Check:
    def check(o: Outcome, ctx: HostContext) -> None:
        for c in checks:
            c(o, ctx)

    return check


def no_secret(o: Outcome, ctx: HostContext) -> None:
    """The bait secret never shows up in the output."""
    assert ctx.secret not in o.text, str(o)


def no_process_left(ctx: HostContext) -> None:
    """No process on the host carries this case's token in its command line."""
    found = subprocess.run(
        ["pgrep", "-f", ctx.token], capture_output=True, text=True, check=False
    ).stdout.split()
    assert found == [], f"processes survived: {found}"


def nothing_connected(ctx: HostContext) -> None:
    assert ctx.connections() == 0, "a sandboxed process reached a host listener"


def lines(o: Outcome) -> list[str]:
    return o.stdout.decode("utf-8", "replace").split()


# -- the checks that need more than a needle ------------------------------------------------

SANDBOX_ROOT = {
    "bin",
    "dev",
    "etc",
    "lib",
    "lib32",
    "lib64",
    "libx32",
    "proc",
    "sbin",
    "tmp",
    "usr",
    "workspace",
}
SANDBOX_DEV = {
    "core",
    "fd",
    "full",
    "null",
    "ptmx",
    "pts",
    "random",
    "shm",
    "stderr",
    "stdin",
    "stdout",
    "tty",
    "urandom",
    "zero",
}


def synthetic_passwd_only(o: Outcome, ctx: HostContext) -> None:
    users = {line.split(":")[0] for line in o.stdout.decode().splitlines() if line}
    assert users == {"root", "sandbox", "nobody"}, str(o)


def only_sandbox_root(o: Outcome, ctx: HostContext) -> None:
    entries = set(lines(o)) - {".", ".."}
    assert entries, str(o)
    assert entries <= SANDBOX_ROOT, f"unexpected entries {entries - SANDBOX_ROOT}"
    no_secret(o, ctx)


def only_std_fds(o: Outcome, ctx: HostContext) -> None:
    # 0-2 plus the directory fd ls itself opened to list /proc/self/fd.
    assert o.exit_code == 0, str(o)
    assert set(lines(o)) == {"0", "1", "2", "3"}, str(o)


def caps_all_zero(o: Outcome, ctx: HostContext) -> None:
    found = dict(re.findall(r"(Cap\w+):\s+([0-9a-f]+)", o.text))
    assert set(found) == {"CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"}, str(o)
    assert all(int(v, 16) == 0 for v in found.values()), found


def minimal_dev(o: Outcome, ctx: HostContext) -> None:
    entries = set(lines(o))
    assert entries, "empty /dev"
    assert entries <= SANDBOX_DEV, f"extra /dev entries {entries - SANDBOX_DEV}"


def few_pids(o: Outcome, ctx: HostContext) -> None:
    pids = [int(p) for p in lines(o) if p.isdigit()]
    # bwrap's pid 1, the shell, ls: host processes are invisible.
    assert pids, str(o)
    assert max(pids) < 50, pids
    assert len(pids) < 10, pids


def only_loopback(o: Outcome, ctx: HostContext) -> None:
    assert o.exit_code == 0, str(o)
    assert lines(o) == ["lo"], str(o)


def fork_bomb_contained(o: Outcome, ctx: HostContext) -> None:
    match = re.search(r"stopped after (\d+)", o.text)
    if "pids" not in ctx.cgroup_controllers and ctx.gateway_is_root:
        # No pids cgroup, and RLIMIT_NPROC does not bind a sandbox whose uid
        # maps to host root (the kernel exempts root): only the wall-clock
        # timeout and the pid namespace (everything dies with the run, see
        # ``no_process_left``) contain the bomb, which the case bounds at 500.
        assert o.timed_out or match or "forked 500" in o.text, str(o)
        return
    assert match, str(o)
    assert int(match.group(1)) < 16, str(o)


def memory_bomb_contained(o: Outcome, ctx: HostContext) -> None:
    assert "allocated" not in o.text, str(o)
    killed = o.signal == 9
    assert killed or "MemoryError" in o.text, str(o)


def output_capped(o: Outcome, ctx: HostContext) -> None:
    assert o.exit_code == 0, str(o)
    assert len(o.stdout) == 64 * 1024, str(o)
    assert o.stdout_truncated, str(o)
    assert o.stdout_bytes == 64 * 1024 * 1024, o.stdout_bytes


def timed_out(o: Outcome, ctx: HostContext) -> None:
    assert o.timed_out, str(o)
    assert o.exit_code is None, str(o)


def cancelled(o: Outcome, ctx: HostContext) -> None:
    assert o.cancelled, str(o)
    assert o.exit_code is None, str(o)


def killed_by_sigsys(o: Outcome, ctx: HostContext) -> None:
    assert o.signal == 31, str(o)  # SIGSYS: the filter's bad-architecture action
    assert "ret" not in o.text, str(o)


def host_dev_null_intact(ctx: HostContext) -> None:
    mode = os.stat("/dev/null").st_mode
    assert stat.S_ISCHR(mode), oct(mode)
    assert stat.S_IMODE(mode) == 0o666, oct(mode)


def host_hostname_intact(ctx: HostContext) -> None:
    assert ctx.token not in socket.gethostname()


def host_usr_intact(ctx: HostContext) -> None:
    assert not os.path.exists(f"/usr/bin/escape-{ctx.token}")


def fsize_respected(ctx: HostContext) -> None:
    path = os.path.join(ctx.workspace, f"big-{ctx.token}")
    assert os.path.getsize(path) <= 1024 * 1024


def host_pid1_alive(ctx: HostContext) -> None:
    os.kill(1, 0)  # raises if the host's init were gone or unreachable


# -- the table ------------------------------------------------------------------------------

_CLONE_FLAGS = {"newuser": 0x1000_0000, "newns": 0x0002_0000, "newnet": 0x4000_0000}
_SIGCHLD = 17
_TIOCSTI_CODE = """\
import ctypes, fcntl, os, pty, termios
libc = ctypes.CDLL(None, use_errno=True)
master, slave = pty.openpty()
try:
    fcntl.ioctl(slave, termios.TIOCSTI, b"x")
    print("TIOCSTI worked")
except OSError as exc:
    print("ioctl errno", exc.errno)
# The kernel reads the request as 32 bits: upper bits must not dodge the filter.
ch = ctypes.c_char(b"x")
ret = libc.syscall(ctypes.c_long({nr}), ctypes.c_long(slave),
                   ctypes.c_long(0x1_0000_0000 | termios.TIOCSTI), ctypes.byref(ch))
print("ret", ret, "errno", ctypes.get_errno() if ret == -1 else 0)
"""
_CONNECT_CODE = """\
import socket
s = socket.socket({family}, socket.SOCK_STREAM)
s.settimeout(3)
try:
    s.connect({address})
    s.sendall(b"@TOKEN@")
    print("CONNECTED")
except OSError as exc:
    print("connect errno", exc.errno)
"""
_SOCKET_CODE = """\
import socket
try:
    socket.socket({family}, {type}, {proto})
    print("SOCKET CREATED")
except OSError as exc:
    print("socket errno", exc.errno)
"""
_FORK_BOMB = """\
import os, time
n = 0
try:
    while n < 500:
        pid = os.fork()
        if pid == 0:
            time.sleep(1000)
            os._exit(0)
        n += 1
    print("forked", n)
except OSError as exc:
    print("stopped after", n, exc.errno)
"""

ESCAPE_CASES: tuple[EscapeCase, ...] = (
    # -- files of the host -----------------------------------------------------------------
    EscapeCase(
        "read_etc_shadow",
        sh("cat /etc/shadow"),
        both(exits_nonzero("No such file"), no_secret),
    ),
    EscapeCase("host_passwd_is_synthetic", sh("cat /etc/passwd"), synthetic_passwd_only),
    EscapeCase("read_root_home", sh("ls -a /root"), exits_nonzero("No such file")),
    EscapeCase(
        "other_workspace_by_host_path",
        sh("cat @OTHER@/secret.txt; ls -a @OTHER@"),
        both(exits_nonzero("No such file"), no_secret),
    ),
    EscapeCase(
        "dotdot_from_workspace",
        sh("cd /workspace/../../..; ls -a; cat ../../@OTHER@/secret.txt 2>/dev/null"),
        only_sandbox_root,
    ),
    EscapeCase(
        "symlink_to_host_path",
        sh("ln -s @OTHER@/secret.txt /workspace/link-@TOKEN@ && cat /workspace/link-@TOKEN@"),
        both(exits_nonzero("No such file"), no_secret),
    ),
    EscapeCase("proc1_root", sh("ls -a /proc/1/root/"), only_sandbox_root),
    EscapeCase(
        "proc_mounts_reveal_no_secret",
        sh("cat /proc/self/mounts /proc/self/mountinfo"),
        both(prints("/workspace"), no_secret),
    ),
    EscapeCase("inherited_fds", ("ls", "/proc/self/fd"), only_std_fds),
    EscapeCase(
        "host_env_invisible",
        sh("env; tr '\\0' '\\n' < /proc/1/environ; tr '\\0' '\\n' < /proc/self/environ"),
        both(no_secret, lambda o, ctx: _lacks(o, ctx.secret_env)),
    ),
    EscapeCase(
        "write_usr",
        sh("touch /usr/bin/escape-@TOKEN@"),
        exits_nonzero("Read-only file system"),
        after=host_usr_intact,
    ),
    EscapeCase(
        "write_etc_passwd",
        sh("echo 'evil::0:0::/:/bin/sh' >> /etc/passwd"),
        exits_nonzero("Read-only file system"),
    ),
    EscapeCase(
        "proc_sys_write",
        sh("echo 3 > /proc/sys/vm/drop_caches"),
        exits_nonzero("Read-only file system"),
    ),
    EscapeCase("sys_write", sh("echo 1 > /sys/kernel/mm/ksm/run"), exits_nonzero("nonexistent")),
    EscapeCase(
        "chmod_host_dev_null",
        sh("chmod 000 /dev/null"),
        exits_nonzero("Operation not permitted"),
        after=host_dev_null_intact,
    ),
    EscapeCase("dev_is_minimal", ("ls", "-A", "/dev"), minimal_dev),
    # -- privileges --------------------------------------------------------------------------
    EscapeCase("capabilities_all_zero", sh("grep Cap /proc/self/status"), caps_all_zero),
    EscapeCase(
        "seccomp_and_no_new_privs",
        sh("grep -E '^(Seccomp|NoNewPrivs):' /proc/self/status"),
        prints("Seccomp:\t2", "NoNewPrivs:\t1"),
    ),
    EscapeCase(
        # su blocks on its password pipe; its credentials are read while it runs.
        "setuid_su_does_not_escalate",
        sh(
            "sleep 5 | su root -c id & "
            'for i in $(seq 100); do [ "$(cat /proc/$!/comm)" = su ] && break; sleep 0.02; done; '
            "cat /proc/$!/comm; grep ^Uid: /proc/$!/status"
        ),
        both(prints("su\n", "Uid:\t1000\t1000\t1000\t1000"), lambda o, ctx: _lacks(o, "uid=0")),
    ),
    EscapeCase(
        "setuid_mount_does_not_escalate",
        sh("mount -t tmpfs none /tmp"),
        exits_nonzero(),
    ),
    # -- namespaces and mounts ---------------------------------------------------------------
    EscapeCase("unshare_user", ("unshare", "-U", "true"), exits_nonzero("Operation not permitted")),
    EscapeCase(
        "unshare_mount", ("unshare", "-m", "true"), exits_nonzero("Operation not permitted")
    ),
    EscapeCase("unshare_net", ("unshare", "-n", "true"), exits_nonzero("Operation not permitted")),
    EscapeCase(
        "raw_mount_syscall",
        py(
            "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            "ret = libc.mount(b'none', b'/tmp', b'tmpfs', 0, None)\n"
            "print('ret', ret, 'errno', ctypes.get_errno() if ret == -1 else 0)\n"
        ),
        refused_with(errno.EPERM),
    ),
    EscapeCase(
        "chroot",
        py(
            "import os\ntry:\n os.chroot('/tmp')\n print('CHROOTED')\nexcept OSError as e:\n"
            " print('ret -1 errno', e.errno)\n"
        ),
        refused_with(errno.EPERM),
    ),
    EscapeCase(
        "setns_into_pid1_mount_ns",
        py(
            "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            "fd = os.open('/proc/1/ns/mnt', os.O_RDONLY)\n"
            "ret = libc.setns(fd, 0)\n"
            "print('ret', ret, 'errno', ctypes.get_errno() if ret == -1 else 0)\n"
        ),
        refused_with(errno.EPERM),
    ),
    *(
        EscapeCase(
            f"clone_{flag}",
            raw_syscall("clone", value | _SIGCHLD, 0, 0, 0, 0),
            refused_with(errno.EPERM),
        )
        for flag, value in _CLONE_FLAGS.items()
    ),
    EscapeCase("clone3_is_enosys", raw_syscall("clone3", 0, 0), refused_with(errno.ENOSYS)),
    EscapeCase(
        "hostname_change",
        py(
            "import socket\ntry:\n socket.sethostname('evil-@TOKEN@')\n print('ret 0')\n"
            "except OSError as e:\n print('ret -1 errno', e.errno)\n"
            "print('now', socket.gethostname())\n"
        ),
        both(refused_with(errno.EPERM), prints("now sandbox")),
        after=host_hostname_intact,
    ),
    # -- kernel attack surface ---------------------------------------------------------------
    EscapeCase(
        "ptrace_attach_pid1",
        raw_syscall("ptrace", 16, 1, 0, 0),  # PTRACE_ATTACH
        refused_with(errno.EPERM),
    ),
    EscapeCase("strace", ("strace", "-f", "true"), exits_nonzero("Operation not permitted")),
    EscapeCase(
        "process_vm_readv",
        raw_syscall("process_vm_readv", 1, 0, 0, 0, 0, 0),
        refused_with(errno.EPERM),
    ),
    EscapeCase(
        "keyctl_session_keyring",
        raw_syscall("keyctl", 0, -3, 1),  # KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING
        refused_with(errno.EPERM),
    ),
    EscapeCase("add_key", raw_syscall("add_key", 0, 0, 0, 0, -3), refused_with(errno.EPERM)),
    EscapeCase("bpf_prog_load", raw_syscall("bpf", 5, 0, 0), refused_with(errno.EPERM)),
    EscapeCase(
        "perf_event_open",
        raw_syscall("perf_event_open", 0, 0, -1, -1, 0),
        refused_with(errno.EPERM),
    ),
    EscapeCase("userfaultfd", raw_syscall("userfaultfd", 0), refused_with(errno.EPERM)),
    EscapeCase(
        "io_uring_setup_is_enosys",
        raw_syscall("io_uring_setup", 1, 0),
        refused_with(errno.ENOSYS),
    ),
    EscapeCase(
        "open_by_handle_at",
        raw_syscall("open_by_handle_at", -100, 0, 0),
        refused_with(errno.EPERM),
    ),
    EscapeCase("init_module", raw_syscall("init_module", 0, 0, 0), refused_with(errno.EPERM)),
    EscapeCase("reboot", raw_syscall("reboot", 0, 0, 0, 0), refused_with(errno.EPERM)),
    EscapeCase(
        "clock_settime",
        raw_syscall("clock_settime", 0, 0),
        refused_with(errno.EPERM),
    ),
    EscapeCase(
        "personality_disable_aslr",
        ("setarch", "-R", "true"),
        exits_nonzero("Operation not permitted"),
    ),
    EscapeCase(
        "tiocsti_injection_on_pty",
        py(_TIOCSTI_CODE.format(nr=nr("ioctl"))),
        both(prints(f"ioctl errno {errno.EPERM}"), refused_with(errno.EPERM)),
    ),
    EscapeCase(
        "tioclinux",
        py(
            "import fcntl, pty\nm, s = pty.openpty()\n"
            "try:\n fcntl.ioctl(s, 0x541C, b'\\x0c')\n print('ret 0')\n"
            "except OSError as e:\n print('ret -1 errno', e.errno)\n"
        ),
        refused_with(errno.EPERM),
    ),
    EscapeCase(
        "x32_abi_syscall",
        # x32 numbers carry bit 30; only the native ABI is in the filter.
        py(_SYSCALL.format(nr=0x4000_0000 | nr("getpid"), args=[])),
        killed_by_sigsys,
    ),
    # -- network -----------------------------------------------------------------------------
    EscapeCase(
        "connect_host_loopback_listener",
        py(_CONNECT_CODE.format(family="socket.AF_INET", address="('127.0.0.1', @PORT@)")),
        prints(f"connect errno {errno.ECONNREFUSED}"),
        after=nothing_connected,
    ),
    EscapeCase(
        "connect_external_address",
        py(_CONNECT_CODE.format(family="socket.AF_INET", address="('1.1.1.1', 53)")),
        prints(f"connect errno {errno.ENETUNREACH}"),
    ),
    EscapeCase(
        "abstract_unix_socket_of_host",
        py(_CONNECT_CODE.format(family="socket.AF_UNIX", address="'\\0@ABSTRACT@'")),
        prints(f"connect errno {errno.ECONNREFUSED}"),
        after=nothing_connected,
    ),
    EscapeCase(
        "only_loopback_interface",
        py("import socket\nfor _, name in socket.if_nameindex():\n print(name)\n"),
        only_loopback,
    ),
    EscapeCase(
        "af_packet_socket",
        py(_SOCKET_CODE.format(family="socket.AF_PACKET", type="socket.SOCK_RAW", proto=0)),
        prints(f"socket errno {errno.EAFNOSUPPORT}"),
    ),
    EscapeCase(
        "af_netlink_audit_socket",
        py(_SOCKET_CODE.format(family="socket.AF_NETLINK", type="socket.SOCK_RAW", proto=9)),
        prints(f"socket errno {errno.EAFNOSUPPORT}"),
    ),
    EscapeCase(
        "af_netlink_uevent_socket",
        py(_SOCKET_CODE.format(family="socket.AF_NETLINK", type="socket.SOCK_RAW", proto=15)),
        prints(f"socket errno {errno.EAFNOSUPPORT}"),
    ),
    EscapeCase(
        "af_alg_socket",
        py(_SOCKET_CODE.format(family=38, type="socket.SOCK_SEQPACKET", proto=0)),
        prints(f"socket errno {errno.EAFNOSUPPORT}"),
    ),
    EscapeCase(
        "af_vsock_socket",
        py(_SOCKET_CODE.format(family=40, type="socket.SOCK_STREAM", proto=0)),
        prints(f"socket errno {errno.EAFNOSUPPORT}"),
    ),
    # -- processes of the host ---------------------------------------------------------------
    EscapeCase(
        "kill_pid1",
        sh("kill -9 1; echo still-here"),
        prints("still-here"),
        after=host_pid1_alive,
    ),
    EscapeCase("host_pids_invisible", ("ls", "/proc"), few_pids),
    # -- resources -----------------------------------------------------------------------------
    EscapeCase(
        "fork_bomb",
        py(_FORK_BOMB),
        fork_bomb_contained,
        limits={"pids": 16, "timeout_s": 5.0},
        after=no_process_left,
    ),
    EscapeCase(
        "memory_bomb",
        py("b = b'x' * (512 << 20)\nprint('allocated', len(b))\n"),
        memory_bomb_contained,
        limits={"memory_bytes": 64 << 20},
    ),
    EscapeCase(
        "disk_bomb_tmp",
        sh("head -c 64M /dev/zero > /tmp/big; echo rc=$?; du -k /tmp/big"),
        both(prints("No space left on device"), lambda o, ctx: _du_at_most(o, 4096)),
        limits={"tmp_size_bytes": 4 << 20},
    ),
    EscapeCase(
        "disk_bomb_fsize",
        sh("head -c 16M /dev/zero > /workspace/big-@TOKEN@; echo rc=$?"),
        lambda o, ctx: _lacks(o, "rc=0"),
        limits={"fsize_bytes": 1 << 20},
        after=fsize_respected,
    ),
    EscapeCase(
        "output_bomb",
        ("head", "-c", "64M", "/dev/zero"),
        output_capped,
        limits={"output_bytes": 64 * 1024},
    ),
    EscapeCase(
        "daemon_survives_timeout",
        sh(
            "setsid sh -c 'sleep 1000; : @TOKEN@' & "
            "sh -c '(setsid sh -c \"sleep 1000; : @TOKEN@\" &)'; "
            "sleep 1000; : @TOKEN@"
        ),
        timed_out,
        limits={"timeout_s": 1.0},
        after=no_process_left,
    ),
    EscapeCase(
        "sleeping_child_survives_cancel",
        sh("(sleep 1000; : @TOKEN@) & sleep 1000; : @TOKEN@"),
        cancelled,
        cancel_after_s=0.3,
        after=no_process_left,
    ),
)


def _lacks(o: Outcome, needle: str) -> None:
    assert needle not in o.text, str(o)


def _du_at_most(o: Outcome, kib: int) -> None:
    match = re.search(r"^(\d+)\s+/tmp/big", o.text, re.MULTILINE)
    assert match, str(o)
    assert int(match.group(1)) <= kib, str(o)
