"""The bubblewrap command line for one sandboxed run, and the request validator.

Everything here is pure except :meth:`HostLayout.probe`, which only
``lstat``s a handful of top-level paths once at start-up.

The sandbox a command sees
--------------------------
* new user, pid, ipc, uts, cgroup and (unless ``limits.network``) network
  namespaces; no further user namespaces (``--disable-userns``); all
  capabilities dropped; a new session (no controlling terminal to inject
  into); killed if the gateway dies (``--die-with-parent``);
* uid/gid :data:`SANDBOX_UID`/:data:`SANDBOX_GID` (``sandbox``), hostname
  ``sandbox``;
* ``/usr`` read-only (``/bin``, ``/lib``... as on the host: symlinks into
  ``/usr`` on a usr-merged system, read-only binds otherwise), a few
  read-only ``/etc`` files (loader cache, certificates, timezone; ``hosts``
  and ``resolv.conf`` only with network), and a synthetic ``/etc/passwd``
  and ``/etc/group`` (root, sandbox, nobody) instead of the host's;
* fresh ``/proc`` with ``/proc/sys`` read-only, a minimal ``/dev``, a
  size-capped tmpfs on ``/tmp``, the subject's workspace on ``/workspace``;
* a cleared environment plus an allow-list;
* the seccomp filter of :mod:`gateway.seccomp`.

Nothing else of the host file system is mounted: not ``/etc/shadow``, not
``/root``, not ``/home``, not other subjects' workspaces, not ``/sys``.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import re
from collections.abc import Sequence

from gateway.errors import InvalidArgument
from gateway.models import SandboxRequest

__all__ = [
    "DEFAULT_ENV",
    "DEV_NODES",
    "SANDBOX_GID",
    "SANDBOX_HOSTNAME",
    "SANDBOX_UID",
    "WORKSPACE",
    "HostLayout",
    "build_bwrap_argv",
    "sandbox_env",
    "synthetic_group",
    "synthetic_passwd",
    "validate_request",
]

SANDBOX_UID = 1000
SANDBOX_GID = 1000
SANDBOX_USER = "sandbox"
SANDBOX_HOSTNAME = "sandbox"
WORKSPACE = "/workspace"
SANDBOX_TMP = "/tmp"  # noqa: S108 - the sandbox's private tmpfs, not the host's /tmp

DEFAULT_ENV: tuple[tuple[str, str], ...] = (
    ("PATH", "/usr/local/bin:/usr/bin:/bin"),
    ("HOME", WORKSPACE),
    ("LANG", "C.UTF-8"),
)

# Device nodes bwrap's --dev binds from the host; see ``dev_dir``.
DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")

# Read-only /etc entries every run gets (missing ones are skipped by bwrap).
ETC_ALWAYS = (
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/alternatives",
    "/etc/ssl/certs",
    "/etc/ssl/openssl.cnf",
    "/etc/ca-certificates",
    "/etc/localtime",
    "/etc/timezone",
    "/etc/nsswitch.conf",
    "/etc/services",
    "/etc/protocols",
    "/etc/mime.types",
)
# Only meaningful (and only revealing) when the host network is shared.
ETC_NETWORK = ("/etc/hosts", "/etc/resolv.conf", "/etc/host.conf", "/etc/gai.conf")

# Top-level directories with programs and libraries.
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Variables that make the loader, a shell or an interpreter run code or load
# libraries the command did not ask for.
_ENV_DENIED_EXACT = frozenset(
    {
        "BASH_ENV",
        "ENV",
        "SHELLOPTS",
        "BASHOPTS",
        "PS4",
        "PROMPT_COMMAND",
        "IFS",
        "CDPATH",
        "GLOBIGNORE",
        "GCONV_PATH",
        "GETCONF_DIR",
        "LOCPATH",
        "NLSPATH",
        "HOSTALIASES",
        "RESOLV_HOST_CONF",
        "RES_OPTIONS",
        "LOCALDOMAIN",
        "GLIBC_TUNABLES",
        "PYTHONSTARTUP",
        "PYTHONPATH",
        "PYTHONHOME",
        "PYTHONINSPECT",
        "PERL5OPT",
        "PERL5LIB",
        "PERLLIB",
        "PERL5DB",
        "RUBYOPT",
        "RUBYLIB",
        "NODE_OPTIONS",
        "NODE_PATH",
        "JAVA_TOOL_OPTIONS",
        "_JAVA_OPTIONS",
        "JDK_JAVA_OPTIONS",
        "GIT_EXEC_PATH",
        "GIT_SSH",
        "GIT_SSH_COMMAND",
        "GIT_ASKPASS",
        "GIT_CONFIG_PARAMETERS",
        "SSH_ASKPASS",
        "EDITOR",
        "VISUAL",
        "PAGER",
    }
)
_ENV_DENIED_PREFIXES = ("LD_", "BASH_FUNC_", "MALLOC_", "DYLD_", "GIT_CONFIG_")

MAX_ARGV_BYTES = 256 * 1024
MAX_ENV_BYTES = 64 * 1024
MAX_ENV_ENTRIES = 128
MAX_PATH_BYTES = 4096


@dataclasses.dataclass(frozen=True, slots=True)
class HostLayout:
    """How the host's system directories are shaped.

    ``ro_dirs`` are bound read-only at the same path; ``symlinks`` are
    ``(target, link)`` pairs recreated inside (``("usr/bin", "/bin")`` on a
    usr-merged system).
    """

    ro_dirs: tuple[str, ...]
    symlinks: tuple[tuple[str, str], ...] = ()

    @classmethod
    def probe(cls, root: str = "/") -> HostLayout:
        """Look at ``/usr``, ``/bin``, ``/lib``... on this host (I/O: lstat, readlink).

        A top-level symlink is recreated only when it points into ``/usr``
        (relative ``usr/...`` or absolute ``/usr/...``); anything else is
        bound read-only if it is a directory and ignored otherwise.
        """
        ro_dirs: list[str] = []
        symlinks: list[tuple[str, str]] = []
        for path in _SYSTEM_DIRS:
            host = os.path.join(root, path.lstrip("/"))
            if os.path.islink(host):
                target = os.readlink(host)
                rel = target.lstrip("/")
                if rel.startswith("usr/") and ".." not in rel.split("/"):
                    symlinks.append((rel, path))
            elif os.path.isdir(host):
                ro_dirs.append(path)
        return cls(tuple(ro_dirs), tuple(symlinks))


# The layout of Debian 12 and other usr-merged distributions.
USR_MERGED = HostLayout(
    ro_dirs=("/usr",),
    symlinks=(
        ("usr/bin", "/bin"),
        ("usr/sbin", "/sbin"),
        ("usr/lib", "/lib"),
        ("usr/lib64", "/lib64"),
    ),
)


def synthetic_passwd() -> bytes:
    """``/etc/passwd`` inside the sandbox: root, the sandbox user, nobody."""
    return (
        "root:x:0:0:root:/root:/usr/sbin/nologin\n"
        f"{SANDBOX_USER}:x:{SANDBOX_UID}:{SANDBOX_GID}:{SANDBOX_USER}:{WORKSPACE}:/bin/sh\n"
        "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
    ).encode()


def synthetic_group() -> bytes:
    """``/etc/group`` inside the sandbox."""
    return (f"root:x:0:\n{SANDBOX_USER}:x:{SANDBOX_GID}:\nnogroup:x:65534:\n").encode()


def _has_nul(text: str) -> bool:
    return "\x00" in text


def _env_name_denied(name: str) -> bool:
    upper = name.upper()
    return upper in _ENV_DENIED_EXACT or upper.startswith(_ENV_DENIED_PREFIXES)


def validate_request(req: SandboxRequest) -> None:
    """Refuse a request bwrap must never see; return None if it is acceptable.

    Raises :class:`~gateway.errors.InvalidArgument` with ``field`` set to
    ``argv``, ``env``, ``cwd``, ``workspace`` or ``limits``:

    * argv: non-empty, ``argv[0]`` non-empty, no NUL, at most
      :data:`MAX_ARGV_BYTES` in total;
    * env: names match ``[A-Za-z_][A-Za-z0-9_]*``, no duplicates, none of the
      loader/shell/interpreter injection variables (``LD_*``, ``BASH_ENV``,
      ``BASH_FUNC_*``, ``GLIBC_TUNABLES``, ``PYTHONPATH``...), no NUL in
      values, bounded count and size;
    * cwd: absolute, no NUL, no ``.``/``..`` components, ``/workspace`` or
      below it;
    * workspace: absolute host path, normalised, not ``/``, no NUL;
    * limits: positive sizes, counts and timeout.
    """
    if not req.argv:
        raise InvalidArgument("argv must not be empty", field="argv")
    if not req.argv[0]:
        raise InvalidArgument("the command name must not be empty", field="argv")
    total = 0
    for arg in req.argv:
        if _has_nul(arg):
            raise InvalidArgument("argv must not contain NUL bytes", field="argv")
        total += len(arg.encode("utf-8", "surrogateescape")) + 1
    if total > MAX_ARGV_BYTES:
        raise InvalidArgument(f"argv is longer than {MAX_ARGV_BYTES} bytes", field="argv")

    if len(req.env) > MAX_ENV_ENTRIES:
        raise InvalidArgument(f"at most {MAX_ENV_ENTRIES} environment variables", field="env")
    seen: set[str] = set()
    env_total = 0
    for name, value in req.env:
        if not _ENV_NAME.fullmatch(name):
            raise InvalidArgument(f"invalid environment variable name {name!r}", field="env")
        if _env_name_denied(name):
            raise InvalidArgument(f"environment variable {name} is not allowed", field="env")
        if name in seen:
            raise InvalidArgument(f"environment variable {name} given twice", field="env")
        if _has_nul(value):
            raise InvalidArgument(f"environment variable {name} contains NUL", field="env")
        seen.add(name)
        env_total += len(name) + len(value.encode("utf-8", "surrogateescape")) + 2
    if env_total > MAX_ENV_BYTES:
        raise InvalidArgument(f"environment is longer than {MAX_ENV_BYTES} bytes", field="env")

    cwd = req.cwd
    if _has_nul(cwd) or len(cwd) > MAX_PATH_BYTES:
        raise InvalidArgument("invalid working directory", field="cwd")
    parts = cwd.split("/")
    if not cwd.startswith("/") or any(part in (".", "..") for part in parts):
        raise InvalidArgument(
            "cwd must be an absolute path without '.' or '..' components", field="cwd"
        )
    norm = posixpath.normpath(cwd)
    if norm != WORKSPACE and not norm.startswith(WORKSPACE + "/"):
        raise InvalidArgument(f"cwd must be {WORKSPACE} or below it", field="cwd")

    ws = req.workspace
    if (
        _has_nul(ws)
        or not ws.startswith("/")
        or posixpath.normpath(ws) != ws
        or ws == "/"
        or len(ws) > MAX_PATH_BYTES
    ):
        raise InvalidArgument("workspace must be a normalised absolute path", field="workspace")

    lim = req.limits
    positive: dict[str, float] = {
        "timeout_s": lim.timeout_s,
        "memory_bytes": lim.memory_bytes,
        "pids": lim.pids,
        "cpu_seconds": lim.cpu_seconds,
        "cpu_quota": lim.cpu_quota,
        "nofile": lim.nofile,
        "fsize_bytes": lim.fsize_bytes,
        "tmp_size_bytes": lim.tmp_size_bytes,
        "output_bytes": lim.output_bytes,
    }
    for key, amount in positive.items():
        if not amount > 0:
            raise InvalidArgument(f"limits.{key} must be positive", field="limits")


def sandbox_env(req: SandboxRequest) -> list[tuple[str, str]]:
    """The command's whole environment: :data:`DEFAULT_ENV` overridden by ``req.env``."""
    env = dict(DEFAULT_ENV)
    env.update(req.env)
    return sorted(env.items())


def build_bwrap_argv(
    req: SandboxRequest,
    *,
    bwrap_path: str,
    seccomp_fd: int,
    passwd_fd: int,
    group_fd: int,
    block_fd: int | None = None,
    info_fd: int | None = None,
    layout: HostLayout = USR_MERGED,
    dev_dir: str | None = None,
) -> list[str]:
    """The full ``bwrap ... -- argv`` command line for ``req`` (pure).

    ``req`` must have passed :func:`validate_request`.  The fds are the
    numbers bwrap will see (the caller passes exactly these with
    ``pass_fds``); bwrap consumes and closes every one of them before it
    execs the command: ``seccomp_fd`` (BPF program), ``passwd_fd`` and
    ``group_fd`` (contents of the synthetic files), ``block_fd`` (bwrap
    waits for one byte or EOF on it after setting up the sandbox, before
    forking the command), ``info_fd`` (bwrap writes ``{"child-pid": N}``
    there).  ``dev_dir``, when given, holds private copies of
    :data:`DEV_NODES` that are mounted over the host nodes bwrap's ``--dev``
    binds, so that a sandbox whose uid maps to the owner of the host nodes
    (a gateway running as root) cannot chmod the host's ``/dev/null``.
    """
    lim = req.limits
    argv: list[str] = [
        bwrap_path,
        "--unshare-all",
        "--unshare-user",
        "--disable-userns",
    ]
    if lim.network:
        argv.append("--share-net")
    argv += [
        "--uid",
        str(SANDBOX_UID),
        "--gid",
        str(SANDBOX_GID),
        "--hostname",
        SANDBOX_HOSTNAME,
        "--die-with-parent",
        "--new-session",
        "--cap-drop",
        "ALL",
    ]
    for path in layout.ro_dirs:
        argv += ["--ro-bind", path, path]
    for target, link in layout.symlinks:
        argv += ["--symlink", target, link]
    for path in ETC_ALWAYS + (ETC_NETWORK if lim.network else ()):
        argv += ["--ro-bind-try", path, path]
    argv += [
        "--perms",
        "0644",
        "--ro-bind-data",
        str(passwd_fd),
        "/etc/passwd",
        "--perms",
        "0644",
        "--ro-bind-data",
        str(group_fd),
        "/etc/group",
        "--proc",
        "/proc",
        # bwrap leaves /proc/sys writable; sysctls check the *host* uid, so a
        # sandbox mapped to host root could write them.
        "--ro-bind",
        "/proc/sys",
        "/proc/sys",
        "--ro-bind-try",
        "/proc/sysrq-trigger",
        "/proc/sysrq-trigger",
        "--dev",
        "/dev",
    ]
    if dev_dir is not None:
        for node in DEV_NODES:
            argv += ["--dev-bind", posixpath.join(dev_dir, node), f"/dev/{node}"]
    argv += [
        "--size",
        str(lim.tmp_size_bytes),
        "--tmpfs",
        SANDBOX_TMP,
        "--bind",
        req.workspace,
        WORKSPACE,
        "--chdir",
        req.cwd,
        "--clearenv",
    ]
    for name, value in sandbox_env(req):
        argv += ["--setenv", name, value]
    argv += ["--seccomp", str(seccomp_fd)]
    if block_fd is not None:
        argv += ["--block-fd", str(block_fd)]
    if info_fd is not None:
        argv += ["--info-fd", str(info_fd)]
    argv.append("--")
    argv.extend(req.argv)
    return argv


def option_pairs(argv: Sequence[str]) -> list[tuple[str, ...]]:
    """Split a bwrap command line into ``(option, args...)`` groups (for tests and logs).

    Stops at ``--``; the command follows as one final group ``("--", *argv)``.
    """
    arity = {
        "--uid": 1,
        "--gid": 1,
        "--hostname": 1,
        "--cap-drop": 1,
        "--ro-bind": 2,
        "--ro-bind-try": 2,
        "--bind": 2,
        "--dev-bind": 2,
        "--symlink": 2,
        "--perms": 1,
        "--ro-bind-data": 2,
        "--proc": 1,
        "--dev": 1,
        "--size": 1,
        "--tmpfs": 1,
        "--chdir": 1,
        "--setenv": 2,
        "--seccomp": 1,
        "--block-fd": 1,
        "--info-fd": 1,
    }
    groups: list[tuple[str, ...]] = []
    i = 1
    while i < len(argv):
        opt = argv[i]
        if opt == "--":
            groups.append(tuple(argv[i:]))
            break
        n = arity.get(opt, 0)
        groups.append(tuple(argv[i : i + 1 + n]))
        i += 1 + n
    return groups
