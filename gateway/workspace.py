"""File operations confined to a subject's workspace.

Every subject owns one host directory, ``<root>/<subject id>``, which the
sandbox mounts at ``/workspace``.  The gateway's file API (read, write,
delete, list, stat) works on *workspace-relative* POSIX paths and must never
reach anything outside that directory, even while a sandboxed command is
concurrently creating symlinks or renaming directories inside it.

How confinement works
---------------------
* :func:`normalize_path` (pure) rejects NUL, absolute paths, ``..``
  components, over-long paths and non-UTF-8 text before any I/O.
* Each operation opens the subject's workspace directory once and resolves
  the rest *relative to that descriptor* with ``openat2(2)`` and
  ``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS``: the
  kernel refuses any symlink (``ELOOP``) and any escape (``EXDEV``) during
  the walk itself, so there is no check-then-use window (openat2(2), "The
  resolve flags").
* Where ``openat2`` is missing (``ENOSYS``: kernels before 5.6, seccomp
  filters, architectures whose syscall number we do not know) the same
  guarantee comes from a component-wise walk: each component is opened with
  ``O_NOFOLLOW | O_DIRECTORY`` relative to the descriptor of its parent, so a
  component swapped for a symlink fails instead of being followed
  (open(2), ``O_NOFOLLOW``).
* The last component is always handled with ``*at`` calls on the parent's
  descriptor and a single name (``renameat``, ``unlinkat``, ``mkdirat``,
  ``fstatat(AT_SYMLINK_NOFOLLOW)``), none of which follow a final symlink.

Symlinks
--------
Anything that would *follow* a symlink is refused with
:class:`~gateway.errors.PermissionDenied` naming the workspace path (the
caller is not allowed to reach what the link points at; it is not a malformed
argument).  Operations that act on a *name* rather than through it do not
follow and so are allowed on a symlink at the end of the path: :meth:`~Workspaces.stat`
and :meth:`~Workspaces.list` report ``type="symlink"`` (lstat semantics), and
:meth:`~Workspaces.delete` unlinks the link itself.  Writing over a symlink
is refused for a clear error even though the rename would not follow it.

Errors
------
``OSError`` is translated once, by :func:`_error_for`; messages speak only of
the workspace-relative path, never of host paths.

All :class:`Workspaces` methods are synchronous and **blocking** (they do
filesystem I/O and ``fsync``); async callers should run them with
:func:`asyncio.to_thread`.  They keep no state between calls apart from the
immutable configuration, so they are safe to call from many threads at once.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import os
import platform
import re
import secrets
import stat as stat_mod
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal, NoReturn

from gateway.errors import (
    FailedPrecondition,
    Internal,
    InvalidArgument,
    McpError,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    ResourceExhausted,
)

__all__ = [
    "NAME_MAX",
    "PATH_MAX",
    "FileEntry",
    "FileType",
    "Listing",
    "Resolver",
    "Workspaces",
    "normalize_path",
    "validate_subject_id",
]

#: Linux limits (limits.h): PATH_MAX counts the terminating NUL.
PATH_MAX = 4096
NAME_MAX = 255

#: What :func:`normalize_path` returns for the workspace root.
ROOT = "."

_SUBJECT_RE = re.compile(r"[A-Za-z0-9._@-]{1,128}")

FileType = Literal["file", "dir", "symlink", "other"]
Resolver = Literal["auto", "openat2", "walk"]

# openat2(2): struct open_how and the RESOLVE_* flags (linux/openat2.h).
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
_RESOLVE_FLAGS = _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS

# Syscall number of openat2 per machine; 437 in the unified syscall table used
# by x86_64 and the asm-generic architectures.  Unknown machines use the walk.
_SYS_OPENAT2 = {"x86_64": 437, "aarch64": 437}.get(platform.machine())

# openat2(2), EAGAIN: with RESOLVE_BENEATH "the kernel could not ensure that a
# '..' component didn't escape (due to a race condition or potential attack).
# The caller may choose to retry".  We never pass '..', so this is rare.
_OPENAT2_RETRIES = 16

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_TMP_PREFIX = ".mcpgw-"
_TMP_SUFFIX = ".tmp"


class _OpenHow(ctypes.Structure):
    """``struct open_how`` from linux/openat2.h (three u64, 24 bytes)."""

    _fields_ = (
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    )


# The C library, for the two foreign functions below (read-only handles, no
# state of ours).
_libc = ctypes.CDLL(None, use_errno=True)

# long syscall(long, int, const char *, struct open_how *, size_t).
_syscall_openat2 = ctypes.CFUNCTYPE(
    ctypes.c_long,
    ctypes.c_long,
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_void_p,
    ctypes.c_size_t,
    use_errno=True,
)(("syscall", _libc))


# renameat2(2) with RENAME_NOREPLACE (glibc 2.28+): the rename fails with
# EEXIST instead of replacing, with no check-then-rename window.
_RENAME_NOREPLACE = 1
_renameat2: Any
try:
    _renameat2 = ctypes.CFUNCTYPE(
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
        use_errno=True,
    )(("renameat2", _libc))
except AttributeError:  # an older C library: checked rename below
    _renameat2 = None


def _rename_noreplace(src_dfd: int, src: str, dst_dfd: int, dst: str) -> None:
    """Rename ``src`` to ``dst`` (single names in their directories), never replacing."""
    if _renameat2 is not None:
        if _renameat2(src_dfd, os.fsencode(src), dst_dfd, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        # EINVAL: this filesystem does not support the flag (renameat2(2)).
        if err not in (errno.ENOSYS, errno.EINVAL):
            raise OSError(err, os.strerror(err))
    # No renameat2 (or a filesystem without RENAME_NOREPLACE): check, then rename.
    if _exists(dst_dfd, dst):
        raise OSError(errno.EEXIST, os.strerror(errno.EEXIST))
    os.rename(src, dst, src_dir_fd=src_dfd, dst_dir_fd=dst_dfd)


def _exists(dfd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


# --------------------------------------------------------------------------
# Plain data
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class FileEntry:
    """One directory entry, as ``lstat`` sees it (symlinks are not followed).

    ``mode`` holds the permission bits only (``S_IMODE``); ``mtime``, ``atime``
    and ``ctime`` (inode change, not birth) are seconds since the epoch.
    ``name`` is the entry's name; names that are not valid UTF-8 on disk carry
    surrogate escapes (PEP 383).
    """

    name: str
    type: FileType
    size: int
    mode: int
    mtime: float
    atime: float = 0.0
    ctime: float = 0.0


class Listing(list[FileEntry]):
    """A directory listing: a ``list[FileEntry]`` sorted by name, plus ``truncated``.

    It holds at most ``max_list_entries`` entries; ``truncated`` is true when
    the directory held more, and which entries were returned then follows the
    directory's on-disk order.  (A list subclass so callers typed against
    ``list[FileEntry]`` keep working.)
    """

    __slots__ = ("truncated",)

    def __init__(self, entries: Iterable[FileEntry] = (), *, truncated: bool = False) -> None:
        super().__init__(entries)
        self.truncated = truncated

    @property
    def entries(self) -> tuple[FileEntry, ...]:
        """The entries as a tuple (same order)."""
        return tuple(self)


# --------------------------------------------------------------------------
# Pure decisions
# --------------------------------------------------------------------------


def normalize_path(path: str, *, field: str = "path") -> str:
    """Return the normalized workspace-relative form of ``path``.

    Contract: the result is ``"."`` for the workspace root (given ``""``,
    ``"."``, ``"./"`` and the like), otherwise components
    joined by ``/`` with no empty, ``.`` or ``..`` component, no leading
    ``/``, no NUL, encodable as UTF-8, each component at most
    :data:`NAME_MAX` bytes and the whole at most ``PATH_MAX - 1`` bytes.
    Empty and ``.`` components are dropped (``a//./b/`` -> ``a/b``).

    Raises :class:`InvalidArgument` (with ``field``) for anything else:
    non-str, NUL bytes, absolute paths, any ``..`` component, lone surrogates
    (text that is not valid UTF-8), a component longer than NAME_MAX bytes
    or an input longer than PATH_MAX - 1 bytes.  ``..`` is rejected rather
    than resolved lexically because ``a/..`` need not mean the workspace root
    when ``a`` is a symlink (path_resolution(7)).  Pure: no I/O.
    """
    if not isinstance(path, str):
        raise InvalidArgument("path must be a string", field=field)
    if "\x00" in path:
        raise InvalidArgument("path must not contain NUL bytes", field=field)
    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument("path must be valid UTF-8 text", field=field) from None
    if len(encoded) >= PATH_MAX:
        raise InvalidArgument(
            f"path is longer than {PATH_MAX - 1} bytes ({len(encoded)})", field=field
        )
    if path.startswith("/"):
        raise InvalidArgument(
            f"path must be relative to the workspace, not absolute: {path!r}", field=field
        )
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            raise InvalidArgument(f"path must not contain '..': {path!r}", field=field)
        if len(part.encode("utf-8")) > NAME_MAX:
            raise InvalidArgument(
                f"path component is longer than {NAME_MAX} bytes: {part[:32]!r}...",
                field=field,
            )
        parts.append(part)
    return "/".join(parts) if parts else ROOT


def validate_subject_id(subject_id: str) -> str:
    """Return ``subject_id`` if it is a safe single directory name.

    Contract: ``[A-Za-z0-9._@-]{1,128}`` and not ``.`` or ``..`` (the same
    pattern the configuration applies to token subjects); otherwise
    :class:`InvalidArgument` with field ``subject``.  Pure.
    """
    if (
        not isinstance(subject_id, str)
        or _SUBJECT_RE.fullmatch(subject_id) is None
        or subject_id in (".", "..")
    ):
        raise InvalidArgument(
            "subject id must match [A-Za-z0-9._@-]{1,128} and not be '.' or '..'",
            field="subject",
        )
    return subject_id


def _validate_mode(mode: int) -> int:
    """Permission bits only: 0..0o777; setuid/setgid/sticky are refused."""
    if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o777:
        raise InvalidArgument(
            "mode must be permission bits between 0 and 0o777 (no setuid, setgid or sticky bits)",
            field="mode",
        )
    return mode


def _split(rel: str) -> tuple[str, str]:
    """Split a normalized non-root path into (parent, name); parent may be '.'."""
    parent, _, name = rel.rpartition("/")
    return (parent or ROOT), name


def _file_type(st_mode: int) -> FileType:
    if stat_mod.S_ISREG(st_mode):
        return "file"
    if stat_mod.S_ISDIR(st_mode):
        return "dir"
    if stat_mod.S_ISLNK(st_mode):
        return "symlink"
    return "other"


def _entry(name: str, st: os.stat_result) -> FileEntry:
    return FileEntry(
        name=name,
        type=_file_type(st.st_mode),
        size=st.st_size,
        mode=stat_mod.S_IMODE(st.st_mode),
        mtime=st.st_mtime,
        atime=st.st_atime,
        ctime=st.st_ctime,
    )


def _symlink_refused(rel: str) -> PermissionDenied:
    return PermissionDenied(
        f"{rel!r}: path escapes the workspace or goes through a symbolic link "
        "(symlinks are never followed)"
    )


def _error_for(exc: OSError, rel: str) -> McpError:
    """Translate an OSError from an operation on workspace path ``rel``.

    The message names ``rel`` (workspace-relative) and the errno name only:
    ``exc.filename`` may be a host path and is never shown.  Pure.
    """
    code = exc.errno
    if code == errno.ENOENT:
        return NotFound(f"no such file or directory in the workspace: {rel!r}")
    if code in (errno.ELOOP, errno.EXDEV):
        # ELOOP: RESOLVE_NO_SYMLINKS / O_NOFOLLOW met a symlink; EXDEV:
        # RESOLVE_BENEATH saw an escape (openat2(2), ERRORS).
        return _symlink_refused(rel)
    if code == errno.EISDIR:
        return FailedPrecondition(f"{rel!r} is a directory")
    if code == errno.ENOTDIR:
        return FailedPrecondition(f"{rel!r}: a path component is not a directory")
    if code == errno.ENOTEMPTY:
        return FailedPrecondition(f"directory {rel!r} is not empty")
    if code == errno.EEXIST:
        return FailedPrecondition(f"{rel!r} already exists")
    if code == errno.ENXIO:
        return FailedPrecondition(f"{rel!r} is not a regular file")
    if code in (errno.ENOSPC, errno.EDQUOT):
        return ResourceExhausted("no space left for the workspace")
    if code in (errno.EMFILE, errno.ENFILE):
        return ResourceExhausted("too many open files; try again later", retry_after=1.0)
    if code == errno.EFBIG:
        return PayloadTooLarge(f"{rel!r}: file too large")
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return PermissionDenied(f"permission denied: {rel!r}")
    if code == errno.ENAMETOOLONG:
        return InvalidArgument(f"path too long: {rel!r}", field="path")
    name = errno.errorcode.get(code or 0, "unknown error")
    return Internal(f"file operation on {rel!r} failed ({name})")


# --------------------------------------------------------------------------
# Low-level, confined opening
# --------------------------------------------------------------------------


def _openat2(dirfd: int, rel: str, flags: int) -> int:
    """``openat2(dirfd, rel, {flags, 0, BENEATH|NO_SYMLINKS|NO_MAGICLINKS})``.

    Raises OSError(ENOSYS) where the syscall number is unknown.
    """
    if _SYS_OPENAT2 is None:
        raise OSError(errno.ENOSYS, "openat2 is not available on this machine")
    how = _OpenHow(flags | os.O_CLOEXEC, 0, _RESOLVE_FLAGS)
    raw = os.fsencode(rel)
    for _ in range(_OPENAT2_RETRIES):
        fd = _syscall_openat2(_SYS_OPENAT2, dirfd, raw, ctypes.byref(how), ctypes.sizeof(how))
        if fd >= 0:
            return int(fd)
        err = ctypes.get_errno()
        if err not in (errno.EAGAIN, errno.EINTR):
            raise OSError(err, os.strerror(err))
    raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))


def _open_child_dir(dirfd: int, name: str) -> int:
    """Open directory ``name`` (one component) in ``dirfd`` without following it.

    ``O_DIRECTORY | O_NOFOLLOW`` on a symlink fails with ENOTDIR on Linux;
    we re-check with fstatat and report ELOOP so the caller sees "symlink".
    If the name is a directory again by then, it was swapped while we looked
    (a race with a sandboxed command): that is reported as ELOOP too rather
    than retried, so an adversary cannot keep us looping.
    """
    try:
        return os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=dirfd)
    except NotADirectoryError:
        st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        if stat_mod.S_ISLNK(st.st_mode) or stat_mod.S_ISDIR(st.st_mode):
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP)) from None
        raise


def _walk(dirfd: int, rel: str, flags: int) -> int:
    """Fallback for openat2: open ``rel`` one component at a time, never following."""
    if rel == ROOT:
        return os.open(".", flags | os.O_CLOEXEC, dir_fd=dirfd)
    *dirs, last = rel.split("/")
    cur = dirfd
    try:
        for name in dirs:
            nxt = _open_child_dir(cur, name)
            if cur != dirfd:
                os.close(cur)
            cur = nxt
        if flags & os.O_DIRECTORY:
            return _open_child_dir(cur, last)
        return os.open(last, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=cur)
    finally:
        if cur != dirfd:
            os.close(cur)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _pread_upto(fd: int, size: int, offset: int) -> bytes:
    """Read up to ``size`` bytes at ``offset``; shorter only at end of file."""
    chunks: list[bytes] = []
    remaining = size
    while remaining > 0:
        chunk = os.pread(fd, min(remaining, 1 << 20), offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


class _DirStack:
    """The directories from an anchor down to the current one, by name.

    At most :data:`_RMTREE_MAX_FDS` descriptors are held: when the stack
    grows past that, the shallowest ones are closed and later re-opened by
    walking down from the nearest still-open ancestor (or the anchor) one
    name at a time with ``O_NOFOLLOW`` -- never via ``..``, which could lead
    out of the workspace if a directory was moved meanwhile.
    """

    def __init__(self, anchor: int) -> None:
        self._anchor = anchor
        self._names: list[str] = []
        self._fds: list[int | None] = []
        self._open = 0
        self._low = 0  # every fd below this index is closed

    def __len__(self) -> int:
        return len(self._names)

    def push(self, name: str, fd: int) -> None:
        self._names.append(name)
        self._fds.append(fd)
        self._open += 1
        while self._open > _RMTREE_MAX_FDS:
            old = self._fds[self._low]
            if old is not None:
                os.close(old)
                self._fds[self._low] = None
                self._open -= 1
            self._low += 1

    def pop(self) -> str:
        fd = self._fds.pop()
        if fd is not None:
            os.close(fd)
            self._open -= 1
        self._low = min(self._low, len(self._fds))
        return self._names.pop()

    def top(self) -> int:
        """Descriptor of the deepest directory (the anchor when empty)."""
        if not self._fds:
            return self._anchor
        fd = self._fds[-1]
        if fd is None:
            fd = self._reopen_top()
        return fd

    def _reopen_top(self) -> int:
        """Re-open the deepest level from the nearest open ancestor.

        The last ``_RMTREE_MAX_FDS // 2`` levels are kept open, so popping
        back up a deep tree costs O(depth / window) walks, not one per level.
        """
        top = len(self._fds) - 1
        base, cur = top, self._anchor
        while base >= 0:
            held = self._fds[base]
            if held is not None:
                cur = held
                break
            base -= 1
        keep_from = max(base + 1, top - _RMTREE_MAX_FDS // 2 + 1)
        temporary = False  # is ``cur`` a descriptor nobody else will close?
        try:
            for index in range(base + 1, top + 1):
                nxt = _open_child_dir(cur, self._names[index])
                if temporary:
                    os.close(cur)
                cur, temporary = nxt, index < keep_from
                if not temporary:
                    self._fds[index] = nxt
                    self._open += 1
        except BaseException:
            if temporary:
                os.close(cur)
            raise
        self._low = min(self._low, keep_from)
        return cur

    def close(self) -> None:
        for fd in self._fds:
            if fd is not None:
                os.close(fd)
        self._fds = [None] * len(self._fds)
        self._open = 0


#: Directory descriptors a recursive delete holds at once (see _DirStack).
_RMTREE_MAX_FDS = 64


def _rmtree_at(parent_fd: int, name: str) -> None:
    """Delete directory ``name`` in ``parent_fd`` and everything beneath it.

    Walks with directory descriptors and single names; symlinks are unlinked,
    never followed.  Iterative, so deep trees hit neither Python's recursion
    limit nor (see :class:`_DirStack`) the open-file limit.  A directory is
    re-listed after each subdirectory is removed, which keeps the state to
    one name per level.
    """
    stack = _DirStack(parent_fd)
    stack.push(name, _open_child_dir(parent_fd, name))
    try:
        while len(stack):
            fd = stack.top()
            child: tuple[str, int] | None = None
            with os.scandir(fd) as it:
                for entry in it:
                    if entry.is_dir(follow_symlinks=False):
                        try:
                            child = (entry.name, _open_child_dir(fd, entry.name))
                            break
                        except FileNotFoundError:
                            continue
                        except OSError as exc:
                            # Swapped for a symlink or file since readdir:
                            # remove the name itself.
                            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                                raise
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.name, dir_fd=fd)
            if child is not None:
                stack.push(*child)
                continue
            done = stack.pop()
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(done, dir_fd=stack.top())
    finally:
        stack.close()


@contextlib.contextmanager
def _translated(rel: str) -> Iterator[None]:
    """The one place OSError becomes an McpError (see :func:`_error_for`)."""
    try:
        yield
    except OSError as exc:
        raise _error_for(exc, rel) from exc


# --------------------------------------------------------------------------
# The workspaces
# --------------------------------------------------------------------------


class Workspaces:
    """Per-subject workspaces beneath ``root``; every method is blocking.

    ``max_read_bytes`` caps one :meth:`read`, ``max_write_bytes`` one
    :meth:`write`, ``max_list_entries`` one :meth:`list`.  ``resolver``
    chooses how paths are resolved: ``"auto"`` (openat2, falling back to the
    component walk on ENOSYS), ``"openat2"`` (never fall back) or ``"walk"``
    (always the component walk; used by tests to exercise the fallback).
    """

    def __init__(
        self,
        root: Path,
        *,
        max_read_bytes: int,
        max_write_bytes: int,
        max_list_entries: int,
        resolver: Resolver = "auto",
    ) -> None:
        if min(max_read_bytes, max_write_bytes, max_list_entries) < 0:
            raise ValueError("workspace limits must not be negative")
        self._root = Path(root).absolute()
        self._max_read = max_read_bytes
        self._max_write = max_write_bytes
        self._max_list = max_list_entries
        self._resolver: Resolver = resolver

    @property
    def root(self) -> Path:
        return self._root

    def path_for(self, subject_id: str) -> Path:
        """Host path of ``subject_id``'s workspace (mounted at /workspace).

        Validates the id (:func:`validate_subject_id`), creates the root and
        the workspace (mode 0o700) on first use, and refuses a workspace that
        is not a real directory (e.g. a planted symlink) with Internal.
        """
        existing = self.existing(subject_id)  # the common case: one lstat
        if existing is not None:
            return existing
        path = self._root / subject_id
        try:
            self._root.mkdir(mode=0o700, parents=True, exist_ok=True)
            try:
                os.mkdir(path, 0o700)
                os.chmod(path, 0o700)  # exactly 0o700 whatever the umask
            except FileExistsError:
                pass
            st = os.lstat(path)
        except OSError as exc:
            raise Internal(f"workspace of subject {subject_id!r} is unavailable") from exc
        if not stat_mod.S_ISDIR(st.st_mode):
            raise Internal(f"workspace of subject {subject_id!r} is not a directory")
        return path

    def existing(self, subject_id: str) -> Path | None:
        """Host path of ``subject_id``'s workspace if it already is a directory, else None.

        Creates nothing (for work begun before the subject's request is decided).
        """
        validate_subject_id(subject_id)
        path = self._root / subject_id
        try:
            st = os.lstat(path)
        except OSError:
            return None
        return path if stat_mod.S_ISDIR(st.st_mode) else None

    # -- operations --------------------------------------------------------

    def read(
        self, subject_id: str, path: str, *, offset: int = 0, length: int | None = None
    ) -> bytes:
        """Read a regular file, binary safe.

        Returns ``length`` bytes from ``offset`` (fewer at end of file; the
        rest of the file when ``length`` is None).  Raises InvalidArgument for
        a negative offset/length, PayloadTooLarge when more than
        ``max_read_bytes`` would be returned, NotFound, FailedPrecondition for
        a directory or any non-regular file (a FIFO is opened non-blocking,
        so it cannot stall the thread), PermissionDenied for symlinks.
        """
        rel = normalize_path(path)
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise InvalidArgument("offset must be a non-negative integer", field="offset")
        if length is not None and (
            isinstance(length, bool) or not isinstance(length, int) or length < 0
        ):
            raise InvalidArgument("length must be a non-negative integer", field="length")
        if length is not None and length > self._max_read:
            raise PayloadTooLarge(
                f"read of {length} bytes exceeds the limit of {self._max_read} bytes",
                field="length",
            )
        with self._workspace(subject_id) as ws, _translated(rel):
            fd = self._open(ws, rel, os.O_RDONLY | os.O_NONBLOCK)
            try:
                st = os.fstat(fd)
                self._require_regular(st, rel)
                if length is None:
                    self._check_read_size(st.st_size - offset, rel)
                # Read one byte more than allowed so a file that grows while we
                # read is still caught.
                want = self._max_read + 1 if length is None else length
                data = _pread_upto(fd, want, offset)
            finally:
                os.close(fd)
        if length is None:
            self._check_read_size(len(data), rel)
        return data

    def write(
        self,
        subject_id: str,
        path: str,
        data: bytes,
        *,
        mode: int = 0o644,
        create_dirs: bool = False,
        append: bool = False,
    ) -> int:
        """Write ``data`` to a file; returns the number of bytes written.

        Default (replace) is atomic and durable: a new file with a random
        ``.mcpgw-*.tmp`` name is created ``O_EXCL|O_NOFOLLOW`` in the target
        directory, written, ``fchmod``-ed to exactly ``mode`` (umask does not
        apply), fsynced, renamed over the target (``renameat`` on the
        directory descriptor) and the directory is fsynced; on failure the
        temporary file is removed, so readers see the old or the new content,
        never a mix.  (O_TMPFILE + linkat was not used: linkat cannot replace
        an existing name and needs /proc or CAP_DAC_READ_SEARCH, linkat(2).)

        ``append=True`` appends with ``O_APPEND`` instead (creating the file
        with ``mode`` if missing, leaving the mode of an existing file alone);
        that is durable (fsync) but not atomic on crash.

        ``create_dirs`` creates missing parent directories (mode 0o755 minus
        umask) one component at a time with ``mkdirat``, never following a
        symlink.  Raises InvalidArgument (``mode``, ``data``, root path),
        PayloadTooLarge beyond ``max_write_bytes``, NotFound for a missing
        parent, FailedPrecondition when the target is a directory or not a
        regular file, PermissionDenied for symlinks.
        """
        rel = normalize_path(path)
        _validate_mode(mode)
        if not isinstance(data, bytes):
            raise InvalidArgument("data must be bytes", field="data")
        if len(data) > self._max_write:
            raise PayloadTooLarge(
                f"write of {len(data)} bytes exceeds the limit of {self._max_write} bytes",
                field="data",
            )
        if rel == ROOT:
            raise InvalidArgument("cannot write to the workspace root", field="path")
        parent, name = _split(rel)
        with self._workspace(subject_id) as ws, _translated(rel):
            dfd = self._open_parent(ws, parent, create=create_dirs)
            try:
                if append:
                    self._append_at(dfd, name, data, mode, rel)
                else:
                    self._replace_at(dfd, name, data, mode, rel)
            finally:
                os.close(dfd)
        return len(data)

    def mkdir(self, subject_id: str, path: str) -> None:
        """Create directory ``path`` and any missing parents (0o755), never through a symlink.

        An existing directory is fine; the workspace root always exists.
        """
        rel = normalize_path(path)
        if rel == ROOT:
            return
        with self._workspace(subject_id) as ws, _translated(rel):
            os.close(self._open_parent(ws, rel, create=True))

    def delete(self, subject_id: str, path: str, *, recursive: bool = False) -> None:
        """Delete a file, symlink (the link itself) or directory.

        The workspace root is refused (InvalidArgument).  A directory needs
        ``recursive=True`` (else FailedPrecondition naming it); the recursive
        walk uses directory descriptors and unlinks symlinks without
        following them, so a link to outside deletes only the link.
        """
        rel = normalize_path(path)
        if rel == ROOT:
            raise InvalidArgument("refusing to delete the workspace root", field="path")
        parent, name = _split(rel)
        with self._workspace(subject_id) as ws, _translated(rel):
            dfd = self._open(ws, parent, _DIR_FLAGS)
            try:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                if stat_mod.S_ISDIR(st.st_mode):
                    if not recursive:
                        raise FailedPrecondition(
                            f"{rel!r} is a directory; pass recursive=true to delete it"
                        )
                    _rmtree_at(dfd, name)
                else:
                    os.unlink(name, dir_fd=dfd)
                os.fsync(dfd)
            finally:
                os.close(dfd)

    def move(self, subject_id: str, source: str, destination: str) -> None:
        """Rename ``source`` to ``destination`` (files, directories, symlinks as links).

        Fails with FailedPrecondition when ``destination`` exists (never
        replaces) or when a directory would move beneath itself; the
        workspace root can be neither end (InvalidArgument).  Both parents are
        opened beneath the workspace without following symlinks; the rename
        acts on the last names and does not follow them either.
        """
        src = normalize_path(source, field="source")
        dst = normalize_path(destination, field="destination")
        for rel, field in ((src, "source"), (dst, "destination")):
            if rel == ROOT:
                raise InvalidArgument("the workspace root cannot be moved or replaced", field=field)
        if dst == src or dst.startswith(src + "/"):
            raise FailedPrecondition(f"cannot move {src!r} into itself ({dst!r})")
        (src_parent, src_name), (dst_parent, dst_name) = _split(src), _split(dst)
        with self._workspace(subject_id) as ws:
            with _translated(src):
                sfd = self._open(ws, src_parent, _DIR_FLAGS)
            try:
                with _translated(dst):
                    dfd = self._open(ws, dst_parent, _DIR_FLAGS)
                try:
                    try:
                        _rename_noreplace(sfd, src_name, dfd, dst_name)
                    except OSError as exc:
                        if exc.errno == errno.EEXIST:
                            raise FailedPrecondition(f"{dst!r} already exists") from exc
                        if exc.errno == errno.EINVAL:
                            raise FailedPrecondition(f"cannot move {src!r} to {dst!r}") from exc
                        raise _error_for(exc, src) from exc
                    os.fsync(dfd)
                    os.fsync(sfd)
                finally:
                    os.close(dfd)
            finally:
                os.close(sfd)

    def list(self, subject_id: str, path: str = "") -> Listing:
        """List a directory (lstat of each entry), capped at ``max_list_entries``.

        At most ``max_list_entries`` entries are read, so a huge directory
        costs bounded work; ``truncated`` tells the caller there were more.
        Entries vanishing during the listing are skipped.
        """
        rel = normalize_path(path)
        entries: list[FileEntry] = []
        truncated = False
        with self._workspace(subject_id) as ws, _translated(rel):
            dfd = self._open(ws, rel, _DIR_FLAGS)
            try:
                with os.scandir(dfd) as it:
                    for item in it:
                        if len(entries) >= self._max_list:
                            truncated = True
                            break
                        try:
                            st = item.stat(follow_symlinks=False)
                        except FileNotFoundError:
                            continue
                        entries.append(_entry(item.name, st))
            finally:
                os.close(dfd)
        entries.sort(key=lambda e: e.name)
        return Listing(entries, truncated=truncated)

    def stat(self, subject_id: str, path: str) -> FileEntry:
        """lstat one path: a symlink at the end is reported, not followed.

        The workspace root is reported with name ``"."``.
        """
        rel = normalize_path(path)
        with self._workspace(subject_id) as ws, _translated(rel):
            if rel == ROOT:
                return _entry(ROOT, os.fstat(ws))
            parent, name = _split(rel)
            dfd = self._open(ws, parent, _DIR_FLAGS)
            try:
                return _entry(name, os.stat(name, dir_fd=dfd, follow_symlinks=False))
            finally:
                os.close(dfd)

    # -- helpers -------------------------------------------------------------

    @contextlib.contextmanager
    def _workspace(self, subject_id: str) -> Iterator[int]:
        """An open descriptor of the subject's workspace directory."""
        path = self.path_for(subject_id)
        try:
            fd = os.open(path, _DIR_FLAGS | os.O_NOFOLLOW)
        except OSError as exc:
            raise Internal(f"workspace of subject {subject_id!r} is unavailable") from exc
        try:
            yield fd
        finally:
            os.close(fd)

    def _open(self, ws: int, rel: str, flags: int) -> int:
        """Open ``rel`` beneath ``ws`` refusing symlinks and escapes (raises OSError)."""
        if self._resolver != "walk":
            try:
                return _openat2(ws, rel, flags)
            except OSError as exc:
                if exc.errno != errno.ENOSYS or self._resolver == "openat2":
                    raise
        return _walk(ws, rel, flags)

    def _open_parent(self, ws: int, parent: str, *, create: bool) -> int:
        """Open directory ``parent``; with ``create``, mkdirat missing components."""
        if not create or parent == ROOT:
            return self._open(ws, parent, _DIR_FLAGS)
        cur = ws
        try:
            for name in parent.split("/"):
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o755, dir_fd=cur)
                nxt = _open_child_dir(cur, name)
                if cur != ws:
                    os.close(cur)
                cur = nxt
        except BaseException:
            if cur != ws:
                os.close(cur)
            raise
        return os.dup(cur) if cur == ws else cur

    def _replace_at(self, dfd: int, name: str, data: bytes, mode: int, rel: str) -> None:
        self._check_target(dfd, name, rel)
        fd, tmp = self._create_temp(dfd)
        try:
            try:
                _write_all(fd, data)
                os.fchmod(fd, mode)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            raise
        # rename(2) is durable only once the directory is synced (fsync(2)).
        os.fsync(dfd)

    def _append_at(self, dfd: int, name: str, data: bytes, mode: int, rel: str) -> None:
        flags = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        created = True
        try:
            fd = os.open(name, flags | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=dfd)
        except FileExistsError:
            created = False
            fd = os.open(name, flags, dir_fd=dfd)
        try:
            self._require_regular(os.fstat(fd), rel)
            if created:
                os.fchmod(fd, mode)
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            os.fsync(dfd)

    @staticmethod
    def _check_target(dfd: int, name: str, rel: str) -> None:
        """Refuse to replace a symlink (clear error) or a directory."""
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat_mod.S_ISLNK(st.st_mode):
            raise _symlink_refused(rel)
        if stat_mod.S_ISDIR(st.st_mode):
            raise FailedPrecondition(f"{rel!r} is a directory")

    @staticmethod
    def _create_temp(dfd: int) -> tuple[int, str]:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        for _ in range(8):
            tmp = f"{_TMP_PREFIX}{secrets.token_hex(8)}{_TMP_SUFFIX}"
            try:
                return os.open(tmp, flags, 0o600, dir_fd=dfd), tmp
            except FileExistsError:
                continue
        raise OSError(errno.EEXIST, "could not create a temporary file")

    @staticmethod
    def _require_regular(st: os.stat_result, rel: str) -> None:
        if stat_mod.S_ISDIR(st.st_mode):
            raise FailedPrecondition(f"{rel!r} is a directory, not a file")
        if not stat_mod.S_ISREG(st.st_mode):
            raise FailedPrecondition(f"{rel!r} is not a regular file")

    def _check_read_size(self, size: int, rel: str) -> None:
        if size > self._max_read:
            _raise_too_large(rel, self._max_read)


def _raise_too_large(rel: str, limit: int) -> NoReturn:
    raise PayloadTooLarge(
        f"{rel!r} is larger than the read limit of {limit} bytes; "
        "read it in parts with offset and length",
        field="path",
    )
