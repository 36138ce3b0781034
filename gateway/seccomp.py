"""The seccomp filter every sandboxed command runs under.

The filter is a *deny list* on top of bubblewrap's namespaces: the default
action is ALLOW and the rules below refuse the system calls a confined
process has no business making (namespace and mount manipulation, kernel
keyrings, module loading, tracing other processes, BPF, perf, clocks,
terminal injection, exotic socket families).  Namespaces and dropped
capabilities already make most of these fail; the filter removes the kernel
attack surface behind them as well (many kernel exploits start with
``unshare(CLONE_NEWUSER)``, ``userfaultfd``, ``bpf`` or an ``AF_*`` family
nobody uses).

Layout
------
* :func:`seccomp_rules` is the pure table: one :class:`SeccompRule` per
  (syscall, argument condition) with the errno it fails with and why.
* :func:`compile_program` turns a table into classic-BPF bytes with
  libseccomp (through ``pyseccomp``); :func:`default_program` caches the
  result of the default table once per process.
* :func:`seccomp_fd` writes those bytes into a fresh, sealed memfd at offset
  0, ready for ``bwrap --seccomp FD`` (bwrap reads the fd to EOF, closes it,
  and installs the filter right before it execs the command, after its own
  mount/namespace setup, so denying ``mount`` etc. does not break bwrap).

Notes on the rules
------------------
* ``clone3`` and the ``io_uring`` calls fail with ENOSYS, not EPERM: seccomp
  cannot look inside ``clone3``'s argument struct, and ENOSYS is what makes
  glibc fall back to plain ``clone``, whose flags *can* be checked.
* Arguments the kernel reads as 32-bit ``int``/``unsigned int`` (ioctl
  request, socket family) are compared on their low 32 bits with
  MASKED_EQ, so setting the upper half of the register cannot dodge a rule
  (the TIOCSTI bypass of CVE-2019-10063).
* libseccomp allows one comparison per argument in a rule, so "family not
  in {...}" is written as one rule per refused family below ``_AF_LIMIT``
  plus one ``>= _AF_LIMIT`` rule on the full 64-bit value (which also
  catches any value with upper bits set).
* ``personality`` is refused when it asks for one of the flags that weaken
  the address space (ASLR off, READ_IMPLIES_EXEC, MMAP_PAGE_ZERO...).  The
  query form ``personality(0xffffffff)`` has those bits set too and is
  therefore refused as well; plain PER_LINUX/PER_LINUX32 switches work.
* Only the native architecture is in the filter; any other ABI (i386
  ``int 0x80``, x32) hits the bad-architecture action KILL_PROCESS.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import functools
import os
from typing import Literal

__all__ = [
    "ArgCmp",
    "SeccompProgram",
    "SeccompRule",
    "compile_program",
    "default_program",
    "sealed_memfd",
    "seccomp_fd",
    "seccomp_rules",
]

Op = Literal["eq", "ne", "lt", "le", "gt", "ge", "masked_eq"]

_LOW32 = 0xFFFF_FFFF

# Namespace flags of clone(2) (linux/sched.h).  CLONE_NEWTIME is unshare-only.
CLONE_NEWNS = 0x0002_0000
CLONE_NEWCGROUP = 0x0200_0000
CLONE_NEWUTS = 0x0400_0000
CLONE_NEWIPC = 0x0800_0000
CLONE_NEWUSER = 0x1000_0000
CLONE_NEWPID = 0x2000_0000
CLONE_NEWNET = 0x4000_0000
_CLONE_NS_FLAGS = (
    CLONE_NEWNS,
    CLONE_NEWCGROUP,
    CLONE_NEWUTS,
    CLONE_NEWIPC,
    CLONE_NEWUSER,
    CLONE_NEWPID,
    CLONE_NEWNET,
)

TIOCSTI = 0x5412
TIOCLINUX = 0x541C

AF_UNIX = 1
AF_INET = 2
AF_INET6 = 10
AF_NETLINK = 16
NETLINK_ROUTE = 0
ALLOWED_FAMILIES = frozenset({AF_UNIX, AF_INET, AF_INET6, AF_NETLINK})
# AF_MAX is 46 on Linux 6.x; every value from here up is refused by one rule.
_AF_LIMIT = 46

# personality(2) flags that weaken the address space (linux/personality.h).
_PERSONALITY_DENIED_FLAGS = (
    0x0004_0000,  # ADDR_NO_RANDOMIZE
    0x0008_0000,  # FDPIC_FUNCPTRS
    0x0010_0000,  # MMAP_PAGE_ZERO
    0x0020_0000,  # ADDR_COMPAT_LAYOUT
    0x0040_0000,  # READ_IMPLIES_EXEC
    0x0080_0000,  # ADDR_LIMIT_32BIT
    0x0800_0000,  # ADDR_LIMIT_3GB
)

# Refused outright with EPERM, grouped by why.
_EPERM_SYSCALLS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "namespaces and mounts: the sandbox's view of the system is fixed by bwrap",
        (
            "unshare",
            "setns",
            "mount",
            "umount2",
            "pivot_root",
            "chroot",
            "move_mount",
            "open_tree",
            "fsopen",
            "fsmount",
            "fsconfig",
            "fspick",
            "mount_setattr",
        ),
    ),
    (
        "kernel keyrings are not namespaced",
        ("add_key", "request_key", "keyctl"),
    ),
    (
        "kernel modules, kexec, reboot",
        (
            "init_module",
            "finit_module",
            "delete_module",
            "kexec_load",
            "kexec_file_load",
            "reboot",
        ),
    ),
    (
        "clocks are global",
        ("settimeofday", "clock_settime", "clock_adjtime", "adjtimex"),
    ),
    (
        "tracing and reading other processes",
        ("ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "kcmp"),
    ),
    (
        "kernel attack surface an ordinary command does not need",
        ("bpf", "perf_event_open", "userfaultfd", "lookup_dcookie"),
    ),
    (
        "host administration",
        (
            "swapon",
            "swapoff",
            "acct",
            "quotactl",
            "quotactl_fd",
            "iopl",
            "ioperm",
            "vhangup",
            "nfsservctl",
            "uselib",
            "syslog",
            "sethostname",
            "setdomainname",
            "_sysctl",
        ),
    ),
    (
        "file handles bypass path-based confinement",
        ("open_by_handle_at", "name_to_handle_at"),
    ),
)

_ENOSYS_SYSCALLS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "flags live in a struct seccomp cannot read; ENOSYS makes libc fall back to clone",
        ("clone3",),
    ),
    (
        "io_uring performs syscalls the filter never sees",
        ("io_uring_setup", "io_uring_enter", "io_uring_register"),
    ),
)


@dataclasses.dataclass(frozen=True, slots=True)
class ArgCmp:
    """One comparison on syscall argument ``index`` (0-5).

    For ``masked_eq`` the test is ``arg & mask == value``; for the other
    operators ``mask`` is unused and ``arg <op> value`` is compared as an
    unsigned 64-bit number.
    """

    index: int
    op: Op
    value: int
    mask: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class SeccompRule:
    """Make ``syscall`` fail with ``errno`` when every comparison in ``args`` holds."""

    syscall: str
    errno: int
    args: tuple[ArgCmp, ...] = ()
    why: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class SeccompProgram:
    """A compiled filter: raw ``struct sock_filter`` array for ``bwrap --seccomp``.

    ``skipped`` names the syscalls of the table this libseccomp does not know
    (so they could not be filtered); ``rules`` is the number of rules added.
    """

    bpf: bytes
    rules: int
    skipped: tuple[str, ...] = ()


def seccomp_rules() -> tuple[SeccompRule, ...]:
    """The default rule table (pure; the same tuple every call)."""
    rules: list[SeccompRule] = []
    for why, names in _EPERM_SYSCALLS:
        rules.extend(SeccompRule(name, errno.EPERM, why=why) for name in names)
    for why, names in _ENOSYS_SYSCALLS:
        rules.extend(SeccompRule(name, errno.ENOSYS, why=why) for name in names)

    ns_why = "clone() creating a namespace (user namespaces are the usual exploit start)"
    rules.extend(
        SeccompRule("clone", errno.EPERM, (ArgCmp(0, "masked_eq", flag, flag),), why=ns_why)
        for flag in _CLONE_NS_FLAGS
    )

    tty_why = "injecting input into a terminal (TIOCSTI) or the console (TIOCLINUX)"
    rules.extend(
        SeccompRule("ioctl", errno.EPERM, (ArgCmp(1, "masked_eq", request, _LOW32),), why=tty_why)
        for request in (TIOCSTI, TIOCLINUX)
    )

    af_why = "socket families other than unix, inet, inet6 and netlink"
    for call in ("socket", "socketpair"):
        rules.extend(
            SeccompRule(
                call, errno.EAFNOSUPPORT, (ArgCmp(0, "masked_eq", family, _LOW32),), why=af_why
            )
            for family in range(_AF_LIMIT)
            if family not in ALLOWED_FAMILIES
        )
        rules.append(
            SeccompRule(call, errno.EAFNOSUPPORT, (ArgCmp(0, "ge", _AF_LIMIT),), why=af_why)
        )
    rules.append(
        SeccompRule(
            "socket",
            errno.EAFNOSUPPORT,
            (ArgCmp(0, "masked_eq", AF_NETLINK, _LOW32), ArgCmp(2, "gt", NETLINK_ROUTE)),
            why="netlink other than NETLINK_ROUTE (audit, uevents, sock_diag...)",
        )
    )

    pers_why = "personality flags that weaken address-space layout randomisation"
    rules.extend(
        SeccompRule("personality", errno.EPERM, (ArgCmp(0, "masked_eq", flag, flag),), why=pers_why)
        for flag in _PERSONALITY_DENIED_FLAGS
    )
    return tuple(rules)


def compile_program(rules: tuple[SeccompRule, ...]) -> SeccompProgram:
    """Compile ``rules`` (default action ALLOW) into BPF bytes for the native arch.

    Syscalls this libseccomp cannot resolve are skipped and listed in the
    result.  Raises ``OSError`` if libseccomp rejects a rule.
    """
    import pyseccomp  # imported here: loading libseccomp is I/O

    ops = {
        "eq": pyseccomp.EQ,
        "ne": pyseccomp.NE,
        "lt": pyseccomp.LT,
        "le": pyseccomp.LE,
        "gt": pyseccomp.GT,
        "ge": pyseccomp.GE,
        "masked_eq": pyseccomp.MASKED_EQ,
    }
    filt = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    # A foreign ABI (i386 int 0x80, x32) would bypass native-only rules: kill.
    filt.set_attr(pyseccomp.Attr.ACT_BADARCH, pyseccomp.KILL_PROCESS)
    skipped: list[str] = []
    added = 0
    for rule in rules:
        if pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, rule.syscall) < 0:
            if rule.syscall not in skipped:
                skipped.append(rule.syscall)
            continue
        args = [
            # pyseccomp's Arg(arg, op, datum_a, datum_b): for MASKED_EQ a is the mask.
            pyseccomp.Arg(cmp.index, ops[cmp.op], cmp.mask, cmp.value)
            if cmp.op == "masked_eq"
            else pyseccomp.Arg(cmp.index, ops[cmp.op], cmp.value)
            for cmp in rule.args
        ]
        filt.add_rule(pyseccomp.ERRNO(rule.errno), rule.syscall, *args)
        added += 1
    return SeccompProgram(bpf=_export(filt), rules=added, skipped=tuple(skipped))


def _export(filt: object) -> bytes:
    read_fd, write_fd = os.pipe()
    try:
        # The exported program is a few KiB, far below the pipe buffer.
        with os.fdopen(write_fd, "wb", closefd=True) as sink:
            filt.export_bpf(sink)  # type: ignore[attr-defined]
        chunks: list[bytes] = []
        while chunk := os.read(read_fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(read_fd)


@functools.cache
def default_program() -> SeccompProgram:
    """The default table compiled once per process (the result is immutable)."""
    return compile_program(seccomp_rules())


def sealed_memfd(name: str, data: bytes) -> int:
    """A new close-on-exec memfd holding ``data``, sealed against change, at offset 0.

    The caller owns the fd.  The seals stop anyone holding it from changing
    the contents between now and the reader (bwrap) reading them.
    """
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        fcntl.fcntl(
            fd,
            fcntl.F_ADD_SEALS,
            fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL,
        )
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def seccomp_fd(program: SeccompProgram | None = None) -> int:
    """A new sealed memfd (:func:`sealed_memfd`) holding ``program`` (default filter).

    Pass it to bwrap with ``pass_fds`` and close it after the spawn.
    """
    return sealed_memfd("mcp-seccomp", (program or default_program()).bpf)
