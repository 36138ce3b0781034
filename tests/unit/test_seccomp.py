"""The seccomp rule table, its compilation with libseccomp, and the memfd handed to bwrap."""

from __future__ import annotations

import errno
import fcntl
import os

import pytest

from gateway.seccomp import (
    ArgCmp,
    SeccompRule,
    compile_program,
    default_program,
    seccomp_fd,
    seccomp_rules,
)

pytestmark = pytest.mark.unit

RULES = seccomp_rules()
U64 = (1 << 64) - 1


def _holds(cmp: ArgCmp, args: tuple[int, ...]) -> bool:
    value = args[cmp.index] & U64
    if cmp.op == "masked_eq":
        return value & cmp.mask == cmp.value
    return {
        "eq": value == cmp.value,
        "ne": value != cmp.value,
        "lt": value < cmp.value,
        "le": value <= cmp.value,
        "gt": value > cmp.value,
        "ge": value >= cmp.value,
    }[cmp.op]


def verdict(syscall: str, *args: int) -> int | None:
    """The errno the table gives ``syscall(args)``, or None if it is allowed."""
    padded = (*args, 0, 0, 0, 0, 0, 0)[:6]
    hits = {
        r.errno for r in RULES if r.syscall == syscall and all(_holds(c, padded) for c in r.args)
    }
    assert len(hits) <= 1, f"conflicting rules for {syscall}{args}"
    return hits.pop() if hits else None


DENIED_OUTRIGHT = [
    "unshare",
    "setns",
    "mount",
    "umount2",
    "pivot_root",
    "move_mount",
    "open_tree",
    "fsopen",
    "fsmount",
    "fsconfig",
    "fspick",
    "mount_setattr",
    "add_key",
    "request_key",
    "keyctl",
    "init_module",
    "finit_module",
    "delete_module",
    "kexec_load",
    "kexec_file_load",
    "reboot",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "swapon",
    "swapoff",
    "acct",
    "quotactl",
    "lookup_dcookie",
    "open_by_handle_at",
    "name_to_handle_at",
    "iopl",
    "ioperm",
    "chroot",
    "vhangup",
    "nfsservctl",
    "uselib",
    "syslog",
]


@pytest.mark.parametrize("name", DENIED_OUTRIGHT)
def test_dangerous_syscalls_fail_with_eperm(name: str) -> None:
    """Namespace, mount, keyring, module, clock, tracing, BPF... calls fail with EPERM."""
    assert verdict(name) == errno.EPERM
    assert verdict(name, 1, 2, 3) == errno.EPERM


@pytest.mark.parametrize(
    "name", ["clone3", "io_uring_setup", "io_uring_enter", "io_uring_register"]
)
def test_uninspectable_syscalls_fail_with_enosys(name: str) -> None:
    """clone3 and io_uring fail with ENOSYS so libc falls back to checkable calls."""
    assert verdict(name) == errno.ENOSYS


CLONE_CASES = [
    ("fork-like", 0x11, None),  # SIGCHLD
    ("threads", 0x3D0F00, None),  # CLONE_VM|FS|FILES|SIGHAND|THREAD|SYSVSEM|SETTLS|...
    ("newuser", 0x10000011, errno.EPERM),
    ("newns", 0x00020011, errno.EPERM),
    ("newpid", 0x20000011, errno.EPERM),
    ("newnet", 0x40000011, errno.EPERM),
    ("newipc", 0x08000011, errno.EPERM),
    ("newuts", 0x04000011, errno.EPERM),
    ("newcgroup", 0x02000011, errno.EPERM),
    ("all namespaces", 0x7E020011, errno.EPERM),
]


@pytest.mark.parametrize(
    ("name", "flags", "expected"), CLONE_CASES, ids=[c[0] for c in CLONE_CASES]
)
def test_clone_namespace_flags(name: str, flags: int, expected: int | None) -> None:
    """clone() is allowed for processes and threads, refused with any namespace flag."""
    assert verdict("clone", flags) == expected


IOCTL_CASES = [
    ("TIOCSTI", 0x5412, errno.EPERM),
    ("TIOCSTI high bits", 0xDEAD_0000_5412, errno.EPERM),
    ("TIOCLINUX", 0x541C, errno.EPERM),
    ("TIOCLINUX high bits", 0x1_0000_541C, errno.EPERM),
    ("TCGETS", 0x5401, None),
    ("FIONREAD", 0x541B, None),
    ("TIOCGWINSZ", 0x5413, None),
]


@pytest.mark.parametrize(
    ("name", "request_", "expected"), IOCTL_CASES, ids=[c[0] for c in IOCTL_CASES]
)
def test_terminal_injection_ioctls(name: str, request_: int, expected: int | None) -> None:
    """TIOCSTI/TIOCLINUX are refused whatever the upper 32 bits; other ioctls pass."""
    assert verdict("ioctl", 3, request_) == expected


SOCKET_CASES = [
    ("unix", 1, 0, None),
    ("inet", 2, 6, None),
    ("inet6", 10, 17, None),
    ("netlink route", 16, 0, None),
    ("netlink audit", 16, 9, errno.EAFNOSUPPORT),
    ("netlink uevent", 16, 15, errno.EAFNOSUPPORT),
    ("netlink route high bits", 16, 1 << 32, errno.EAFNOSUPPORT),
    ("unspec", 0, 0, errno.EAFNOSUPPORT),
    ("packet", 17, 0, errno.EAFNOSUPPORT),
    ("alg", 38, 0, errno.EAFNOSUPPORT),
    ("vsock", 40, 0, errno.EAFNOSUPPORT),
    ("bluetooth", 31, 0, errno.EAFNOSUPPORT),
    ("beyond AF_MAX", 46, 0, errno.EAFNOSUPPORT),
    ("huge", 0xFFFF_FFFF, 0, errno.EAFNOSUPPORT),
    ("inet with high bits", (1 << 32) | 2, 0, errno.EAFNOSUPPORT),
]


@pytest.mark.parametrize(
    ("name", "family", "proto", "expected"), SOCKET_CASES, ids=[c[0] for c in SOCKET_CASES]
)
def test_socket_families(name: str, family: int, proto: int, expected: int | None) -> None:
    """Only unix, inet, inet6 and route netlink sockets can be created."""
    assert verdict("socket", family, 1, proto) == expected


@pytest.mark.parametrize("family", range(64))
def test_every_family_decided(family: int) -> None:
    """For all small families exactly the allowed four pass (socket and socketpair)."""
    allowed = family in (1, 2, 10, 16)
    assert (verdict("socket", family, 1, 0) is None) == allowed
    assert (verdict("socketpair", family, 1, 0) is None) == allowed


PERSONALITY_CASES = [
    ("PER_LINUX", 0, None),
    ("PER_LINUX32", 8, None),
    ("UNAME26", 0x20000, None),
    ("ADDR_NO_RANDOMIZE", 0x40000, errno.EPERM),
    ("READ_IMPLIES_EXEC", 0x400000, errno.EPERM),
    ("MMAP_PAGE_ZERO", 0x100000, errno.EPERM),
    ("query (documented casualty)", 0xFFFF_FFFF, errno.EPERM),
]


@pytest.mark.parametrize(
    ("name", "persona", "expected"), PERSONALITY_CASES, ids=[c[0] for c in PERSONALITY_CASES]
)
def test_personality(name: str, persona: int, expected: int | None) -> None:
    """personality() may not weaken address-space randomisation."""
    assert verdict("personality", persona) == expected


@pytest.mark.parametrize("name", ["read", "write", "openat", "execve", "fork", "kill", "wait4"])
def test_ordinary_syscalls_untouched(name: str) -> None:
    """The filter is a deny list: everything not named passes."""
    assert verdict(name, 1, 2, 3) is None


def test_every_rule_explains_itself() -> None:
    """Each rule carries a reason (the table doubles as documentation)."""
    assert all(rule.why for rule in RULES)


def test_compiles_every_rule_on_this_host() -> None:
    """libseccomp knows every syscall of the table and emits whole BPF instructions."""
    program = compile_program(RULES)
    assert program.skipped == ()
    assert program.rules == len(RULES)
    assert program.bpf
    assert len(program.bpf) % 8 == 0


def test_compilation_is_deterministic_and_cached() -> None:
    """The same table gives the same bytes; default_program() is computed once."""
    assert compile_program(RULES).bpf == compile_program(RULES).bpf
    assert default_program() is default_program()
    assert default_program().bpf == compile_program(RULES).bpf


def test_unknown_syscall_is_skipped_not_fatal() -> None:
    """A syscall this libseccomp does not know is reported, the rest still compiles."""
    program = compile_program(
        (SeccompRule("no_such_syscall_xyz", errno.EPERM), SeccompRule("bpf", errno.EPERM))
    )
    assert program.skipped == ("no_such_syscall_xyz",)
    assert program.rules == 1


def test_memfd_holds_the_program_sealed_at_offset_zero() -> None:
    """seccomp_fd() is a fresh, close-on-exec, write-sealed fd positioned at the start."""
    program = default_program()
    fd = seccomp_fd(program)
    other = seccomp_fd(program)
    try:
        assert fd != other
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert os.lseek(fd, 0, os.SEEK_CUR) == 0
        assert os.read(fd, len(program.bpf) + 1) == program.bpf
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_WRITE
        assert seals & fcntl.F_SEAL_SEAL
        with pytest.raises(PermissionError):
            os.pwrite(fd, b"\0" * 8, 0)
    finally:
        os.close(fd)
        os.close(other)
