"""The pure bwrap command-line builder and the request validator."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from gateway.bwrap import (
    DEV_NODES,
    ETC_NETWORK,
    USR_MERGED,
    HostLayout,
    build_bwrap_argv,
    option_pairs,
    sandbox_env,
    synthetic_group,
    synthetic_passwd,
    validate_request,
)
from gateway.errors import InvalidArgument
from gateway.models import Limits, SandboxRequest

pytestmark = pytest.mark.unit

REQ = SandboxRequest(task_id="t1", argv=("echo", "hi"), workspace="/srv/ws/alice")
FDS = {"seccomp_fd": 10, "passwd_fd": 11, "group_fd": 12}


def build(req: SandboxRequest = REQ, /, **kw: object) -> list[str]:
    args: dict[str, object] = {"bwrap_path": "/usr/bin/bwrap", **FDS, **kw}
    return build_bwrap_argv(req, **args)  # type: ignore[arg-type]


def groups(argv: list[str]) -> list[tuple[str, ...]]:
    return option_pairs(argv)


def req_with(**changes: object) -> SandboxRequest:
    return dataclasses.replace(REQ, **changes)  # type: ignore[arg-type]


# -- the command line ----------------------------------------------------------------------


def test_starts_with_bwrap_and_ends_with_the_command() -> None:
    """argv[0] is bwrap and the command follows a final ``--`` verbatim."""
    argv = build(req_with(argv=("--help", "-x", "a b")))
    assert argv[0] == "/usr/bin/bwrap"
    assert argv[-4:] == ["--", "--help", "-x", "a b"]
    assert argv.count("--") == 1


@pytest.mark.parametrize(
    "flag",
    [
        ("--unshare-all",),
        ("--unshare-user",),
        ("--disable-userns",),
        ("--die-with-parent",),
        ("--new-session",),
        ("--cap-drop", "ALL"),
        ("--uid", "1000"),
        ("--gid", "1000"),
        ("--hostname", "sandbox"),
        ("--proc", "/proc"),
        ("--ro-bind", "/proc/sys", "/proc/sys"),
        ("--dev", "/dev"),
        ("--bind", "/srv/ws/alice", "/workspace"),
        ("--chdir", "/workspace"),
        ("--clearenv",),
        ("--seccomp", "10"),
        ("--ro-bind-data", "11", "/etc/passwd"),
        ("--ro-bind-data", "12", "/etc/group"),
        ("--ro-bind", "/usr", "/usr"),
        ("--symlink", "usr/bin", "/bin"),
        ("--symlink", "usr/lib", "/lib"),
    ],
)
def test_always_present_flags(flag: tuple[str, ...]) -> None:
    """Every run gets the isolation flags, mounts and fds of the sandbox contract."""
    assert flag in groups(build())


@pytest.mark.parametrize(
    "absent",
    [
        ("--share-net",),
        ("--ro-bind-try", "/etc/resolv.conf", "/etc/resolv.conf"),
        ("--ro-bind-try", "/etc/hosts", "/etc/hosts"),
        ("--block-fd",),
        ("--info-fd",),
    ],
)
def test_absent_by_default(absent: tuple[str, ...]) -> None:
    """No network, no network config files and no sync fds unless asked for."""
    pairs = groups(build())
    if len(absent) == 1:
        assert all(p[0] != absent[0] for p in pairs)
    else:
        assert absent not in pairs


def test_never_mounts_host_secrets() -> None:
    """Neither the host's passwd/shadow nor /root, /home or / itself is bound."""
    sources = {p[1] for p in groups(build()) if p[0] in ("--bind", "--ro-bind", "--ro-bind-try")}
    for forbidden in ("/", "/etc", "/etc/passwd", "/etc/shadow", "/etc/group", "/root", "/home"):
        assert forbidden not in sources
    assert not any(s.startswith(("/etc/ssl/private", "/sys")) for s in sources)


def test_network_shares_net_and_resolver_files() -> None:
    """limits.network adds --share-net and the resolver files, nothing else changes."""
    plain = groups(build())
    net = groups(build(req_with(limits=Limits(network=True))))
    added = [p for p in net if p not in plain]
    assert added == [("--share-net",)] + [("--ro-bind-try", f, f) for f in ETC_NETWORK]


def test_tmpfs_size_precedes_tmpfs() -> None:
    """The /tmp tmpfs is capped at limits.tmp_size_bytes (--size must come first)."""
    pairs = groups(build(req_with(limits=Limits(tmp_size_bytes=12345))))
    i = pairs.index(("--tmpfs", "/tmp"))
    assert pairs[i - 1] == ("--size", "12345")


def test_perms_precede_synthetic_files() -> None:
    """The synthetic passwd/group are world-readable inside the sandbox."""
    pairs = groups(build())
    for fd, dest in (("11", "/etc/passwd"), ("12", "/etc/group")):
        i = pairs.index(("--ro-bind-data", fd, dest))
        assert pairs[i - 1] == ("--perms", "0644")


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        ({"block_fd": 7}, ("--block-fd", "7")),
        ({"info_fd": 8}, ("--info-fd", "8")),
    ],
)
def test_sync_fds_when_given(kw: dict[str, int], expected: tuple[str, str]) -> None:
    """--block-fd / --info-fd appear exactly when their fd is given."""
    assert expected in groups(build(**kw))


def test_seccomp_is_the_last_option_before_sync_fds() -> None:
    """Options after the filter fd are only the block/info fds and the command."""
    pairs = groups(build(block_fd=7, info_fd=8))
    i = pairs.index(("--seccomp", "10"))
    assert [p[0] for p in pairs[i + 1 :]] == ["--block-fd", "--info-fd", "--"]


def test_chdir_follows_cwd() -> None:
    """--chdir is the request's cwd."""
    assert ("--chdir", "/workspace/src") in groups(build(req_with(cwd="/workspace/src")))


def test_environment_is_cleared_then_allowlisted() -> None:
    """--clearenv comes before every --setenv, which hold exactly sandbox_env()."""
    req = req_with(env=(("TERM", "xterm"), ("FOO", "bar"), ("LANG", "de_DE.UTF-8")))
    pairs = groups(build(req))
    clear = pairs.index(("--clearenv",))
    setenvs = [(p[1], p[2]) for p in pairs if p[0] == "--setenv"]
    assert all(pairs.index(("--setenv", *kv)) > clear for kv in setenvs)
    assert setenvs == sandbox_env(req)
    assert dict(setenvs) == {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": "/workspace",
        "LANG": "de_DE.UTF-8",
        "TERM": "xterm",
        "FOO": "bar",
    }


def test_term_only_when_given() -> None:
    """TERM is not invented for the command."""
    assert "TERM" not in dict(sandbox_env(REQ))


def test_dev_dir_overmounts_every_device_node() -> None:
    """With a private dev dir every host-bound device node is replaced, after --dev."""
    pairs = groups(build(dev_dir="/run/private-dev"))
    dev = pairs.index(("--dev", "/dev"))
    for node in DEV_NODES:
        entry = ("--dev-bind", f"/run/private-dev/{node}", f"/dev/{node}")
        assert pairs.index(entry) > dev
    assert not any(p[0] == "--dev-bind" for p in groups(build()))


@pytest.mark.parametrize(
    ("layout", "binds", "links"),
    [
        (USR_MERGED, ["/usr"], [("usr/bin", "/bin"), ("usr/sbin", "/sbin")]),
        (HostLayout(("/usr", "/bin", "/lib")), ["/usr", "/bin", "/lib"], []),
    ],
)
def test_layout(layout: HostLayout, binds: list[str], links: list[tuple[str, str]]) -> None:
    """System directories are bound read-only or recreated as symlinks as the host has them."""
    pairs = groups(build(layout=layout))
    for path in binds:
        assert ("--ro-bind", path, path) in pairs
    for target, link in links:
        assert ("--symlink", target, link) in pairs


def test_probe_host_layout(tmp_path: Path) -> None:
    """probe() recreates usr-merged symlinks, binds real dirs and ignores odd links."""
    (tmp_path / "usr" / "bin").mkdir(parents=True)
    (tmp_path / "bin").symlink_to("usr/bin")
    (tmp_path / "lib").mkdir()
    (tmp_path / "sbin").symlink_to("/etc")  # not into /usr: ignored
    (tmp_path / "lib64").symlink_to("/usr/lib64")
    layout = HostLayout.probe(str(tmp_path))
    assert layout.ro_dirs == ("/usr", "/lib")
    assert layout.symlinks == (("usr/bin", "/bin"), ("usr/lib64", "/lib64"))


def test_synthetic_passwd_and_group() -> None:
    """passwd/group list exactly root, the sandbox user (home /workspace) and nobody."""
    users = [line.split(":") for line in synthetic_passwd().decode().splitlines()]
    assert [u[0] for u in users] == ["root", "sandbox", "nobody"]
    assert users[1][2:4] == ["1000", "1000"]
    assert users[1][5] == "/workspace"
    groups_ = [line.split(":")[0] for line in synthetic_group().decode().splitlines()]
    assert groups_ == ["root", "sandbox", "nogroup"]


# -- the validator ---------------------------------------------------------------------------

VALID: list[tuple[str, dict[str, object]]] = [
    ("plain", {}),
    ("cwd below workspace", {"cwd": "/workspace/a/b"}),
    ("cwd trailing slash", {"cwd": "/workspace/"}),
    ("env", {"env": (("FOO", "bar"), ("_x1", ""), ("TERM", "xterm"))}),
    ("argv with dashes", {"argv": ("--", "-rf", "")}),
    ("unicode", {"argv": ("echo", "grüße"), "env": (("X", "ü"),)}),
    ("network", {"limits": Limits(network=True)}),
]

INVALID: list[tuple[str, dict[str, object], str]] = [
    ("empty argv", {"argv": ()}, "argv"),
    ("empty command", {"argv": ("",)}, "argv"),
    ("NUL in argv", {"argv": ("echo", "a\x00b")}, "argv"),
    ("huge argv", {"argv": ("echo", "x" * 300_000)}, "argv"),
    ("env name with =", {"env": (("A=B", "c"),)}, "env"),
    ("env name digit first", {"env": (("1A", "c"),)}, "env"),
    ("env name empty", {"env": (("", "c"),)}, "env"),
    ("env name dash", {"env": (("A-B", "c"),)}, "env"),
    ("LD_PRELOAD", {"env": (("LD_PRELOAD", "/x.so"),)}, "env"),
    ("ld_library_path lower", {"env": (("ld_library_path", "/x"),)}, "env"),
    ("BASH_ENV", {"env": (("BASH_ENV", "/x"),)}, "env"),
    ("ENV", {"env": (("ENV", "/x"),)}, "env"),
    ("BASH_FUNC", {"env": (("BASH_FUNC_ls%%", "() { id; }"),)}, "env"),
    ("GLIBC_TUNABLES", {"env": (("GLIBC_TUNABLES", "x"),)}, "env"),
    ("PYTHONPATH", {"env": (("PYTHONPATH", "/w"),)}, "env"),
    ("GIT_SSH_COMMAND", {"env": (("GIT_SSH_COMMAND", "sh"),)}, "env"),
    ("duplicate env", {"env": (("A", "1"), ("A", "2"))}, "env"),
    ("NUL in env value", {"env": (("A", "x\x00y"),)}, "env"),
    ("too many env", {"env": tuple((f"V{i}", "") for i in range(200))}, "env"),
    ("relative cwd", {"cwd": "workspace"}, "cwd"),
    ("cwd outside", {"cwd": "/etc"}, "cwd"),
    ("cwd prefix trick", {"cwd": "/workspacex"}, "cwd"),
    ("cwd dotdot", {"cwd": "/workspace/../etc"}, "cwd"),
    ("cwd inner dotdot", {"cwd": "/workspace/a/../b"}, "cwd"),
    ("cwd dot", {"cwd": "/workspace/."}, "cwd"),
    ("cwd NUL", {"cwd": "/workspace/\x00"}, "cwd"),
    ("workspace relative", {"workspace": "srv/ws"}, "workspace"),
    ("workspace root", {"workspace": "/"}, "workspace"),
    ("workspace unnormalised", {"workspace": "/srv/../etc"}, "workspace"),
    ("workspace NUL", {"workspace": "/srv/\x00"}, "workspace"),
    ("zero timeout", {"limits": Limits(timeout_s=0)}, "limits"),
    ("zero tmp size", {"limits": Limits(tmp_size_bytes=0)}, "limits"),
    ("negative pids", {"limits": Limits(pids=-1)}, "limits"),
]


@pytest.mark.parametrize(("name", "changes"), VALID, ids=[v[0] for v in VALID])
def test_valid_requests_pass(name: str, changes: dict[str, object]) -> None:
    """Ordinary requests are accepted unchanged."""
    validate_request(req_with(**changes))


@pytest.mark.parametrize(("name", "changes", "field"), INVALID, ids=[v[0] for v in INVALID])
def test_invalid_requests_name_the_field(name: str, changes: dict[str, object], field: str) -> None:
    """Each unsafe request is refused with InvalidArgument naming the offending field."""
    with pytest.raises(InvalidArgument) as info:
        validate_request(req_with(**changes))
    assert info.value.field == field
