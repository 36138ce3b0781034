"""Warm sandboxes: bwraps set up ahead of time, each waiting to be told its command.

Most of a sandboxed ``echo`` is bwrap setting the sandbox up (namespaces,
mounts, seccomp): about two thirds of a bare spawn.  bwrap cannot be given
its command late (``--args FD`` takes options only), so a warm sandbox
runs a *launcher*, ``/bin/sh`` reading its script from stdin: it blocks in
``read`` until the gateway writes one short script, made here from the
request and nothing else::

    export NAME='value'
    exec 'argv0' 'arg1' ... </dev/null

``exec`` replaces the shell with the command (same pid, same cgroup, same
rlimits), so the command runs exactly as in a sandbox started for it:
same bwrap flags, same environment (the defaults are bwrap's own
``--setenv``; the request's variables are exported on top), stdin on
``/dev/null``.

Only requests a script says exactly are served warm (:func:`launch_script`
returns None for the others, which get a sandbox started for them): no
stdin data, a command name that is not an option, no variable the shell
itself treats specially, a script that fits in one atomic pipe write.

:class:`WarmPool` keeps the waiting sandboxes per *set-up key* (the
workspace, cwd, network and /tmp size: what bwrap's command line depends
on), bounded per key and in total, and drops those idle for too long.  It
knows nothing about processes: the sandbox gives it members and a
``discard`` for them.
"""

from __future__ import annotations

import collections
import re
import shlex
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from gateway.models import SandboxRequest

__all__ = [
    "LAUNCHER",
    "MAX_SCRIPT_BYTES",
    "WarmPool",
    "classify_launch_failure",
    "launch_script",
    "warm_key",
]

# The launcher: POSIX sh (dash on Debian, an essential package), no options,
# reading commands from stdin.
LAUNCHER = ("/bin/sh",)

# PIPE_BUF: one write into the empty pipe is atomic and never blocks.
MAX_SCRIPT_BYTES = 4096

# Variables the shell sets, reads or rewrites itself: exporting them from the
# script would not hand the command the value asked for.
_SHELL_NAMES = frozenset(
    {
        "ENV",
        "FCEDIT",
        "HISTFILE",
        "HISTSIZE",
        "IFS",
        "LINENO",
        "MAIL",
        "MAILCHECK",
        "MAILPATH",
        "OLDPWD",
        "OPTARG",
        "OPTIND",
        "PPID",
        "PS1",
        "PS2",
        "PS4",
        "PWD",
    }
)


def warm_key(req: SandboxRequest) -> tuple[str, str, bool, int]:
    """What a warm sandbox for ``req`` must have been set up with."""
    return (req.workspace, req.cwd, req.limits.network, req.limits.tmp_size_bytes)


def launch_script(req: SandboxRequest) -> bytes | None:
    """The launcher's script for ``req``, or None if ``req`` cannot be run warm.

    ``req`` must have passed :func:`gateway.bwrap.validate_request` (names
    are shell names, nothing holds a NUL).  Every word is single-quoted, so
    the shell expands nothing.
    """
    if req.stdin is not None or req.argv[0].startswith("-"):
        return None
    lines = []
    for name, value in req.env:
        if name in _SHELL_NAMES:
            return None
        lines.append(f"export {name}={shlex.quote(value)}\n")
    lines.append("exec " + " ".join(shlex.quote(arg) for arg in req.argv) + " </dev/null\n")
    script = "".join(lines).encode("utf-8", "surrogateescape")
    return script if len(script) <= MAX_SCRIPT_BYTES else None


# dash's words when ``exec`` fails: "/bin/sh: 3: exec: NAME: not found".
_EXEC_FAILED = re.compile(rb"/bin/sh: \d+: exec: (.*): ([^\n]*)\n?", re.DOTALL)


def classify_launch_failure(
    exit_code: int | None, stderr_head: bytes, argv0: str
) -> tuple[str, int] | None:
    """``(error, exit_code)`` if the launcher could not exec ``argv0``, else None.

    Worded like bwrap's own failure (see
    :func:`gateway.sandbox.classify_bwrap_failure`): a missing program is
    127, any other exec failure 126.  A command that prints exactly the
    shell's line and exits 126 or 127 is misreported the same way.
    """
    if exit_code not in (126, 127):
        return None
    match = _EXEC_FAILED.fullmatch(stderr_head)
    if match is None or match[1] != argv0.encode("utf-8", "surrogateescape"):
        return None
    reason = match[2].decode("utf-8", "replace")
    if reason == "not found":
        return f"sandbox: execvp {argv0}: No such file or directory", 127
    return f"sandbox: execvp {argv0}: {reason}", 126


_K = TypeVar("_K", bound=Hashable)
_M = TypeVar("_M")
_P = TypeVar("_P", bound=Hashable)


class WarmPool(Generic[_K, _M, _P]):
    """Waiting members per key: at most ``per_key`` each and ``total`` in all.

    Members being started are tracked by a handle (``_P``, the sandbox's
    future): :meth:`starting` registers it, :meth:`started` turns it into a
    member.  :meth:`take` hands out a ready member, else a handle still
    starting (it is further along than a start from scratch); each is
    taken at most once.  Members older than ``idle_s`` are discarded by
    :meth:`expire` (also on every :meth:`take` and :meth:`want`).
    ``clock`` is ``time.monotonic`` except in tests.
    """

    def __init__(
        self,
        *,
        per_key: int,
        total: int,
        idle_s: float,
        discard: Callable[[_M], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_key = per_key
        self.total = total
        self.idle_s = idle_s
        self._discard = discard
        self._clock = clock
        self._members: dict[_K, collections.deque[tuple[float, _M]]] = {}
        self._pending: dict[_K, list[_P]] = {}
        self._closed = False

    def __len__(self) -> int:
        return sum(len(q) for q in self._members.values())

    def waiting(self, key: _K) -> int:
        """How many members wait for ``key`` now (not counting those starting)."""
        return len(self._members.get(key, ()))

    @property
    def pending(self) -> int:
        return sum(len(p) for p in self._pending.values())

    def take(
        self, key: _K, alive: Callable[[_M], bool] = lambda _m: True
    ) -> tuple[_M | None, _P | None]:
        """``(member, None)``: the oldest living member for ``key`` (dead ones are
        discarded); else ``(None, handle)`` of the oldest still starting; else
        ``(None, None)``."""
        self.expire()
        queue = self._members.get(key)
        while queue:
            _, member = queue.popleft()
            if not queue:
                del self._members[key]
            if alive(member):
                return member, None
            self._discard(member)
        starting = self._pending.get(key)
        if starting:
            handle = starting.pop(0)
            if not starting:
                del self._pending[key]
            return None, handle
        return None, None

    def want(self, key: _K) -> int:
        """How many members to start for ``key`` now (register each with :meth:`starting`)."""
        self.expire()
        if self._closed:
            return 0
        have = len(self._members.get(key, ())) + len(self._pending.get(key, ()))
        room = self.total - len(self) - self.pending
        return max(0, min(self.per_key - have, room))

    def starting(self, key: _K, handle: _P) -> None:
        """A member for ``key`` is being started; ``handle`` stands for it until it is."""
        self._pending.setdefault(key, []).append(handle)

    def started(self, key: _K, handle: _P, member: _M | None) -> bool:
        """The start behind ``handle`` ended with ``member`` (None: it failed).

        False if a :meth:`take` had already handed ``handle`` out (the taker
        owns the member then); otherwise the member joins the pool (or is
        discarded, if the pool closed meanwhile).
        """
        starting = self._pending.get(key, [])
        if handle not in starting:
            return False
        starting.remove(handle)
        if not starting:
            del self._pending[key]
        if member is None:
            return True
        if self._closed:
            self._discard(member)
        else:
            self._members.setdefault(key, collections.deque()).append((self._clock(), member))
        return True

    def expire(self) -> None:
        """Discard the members that waited longer than ``idle_s``."""
        oldest = self._clock() - self.idle_s
        for key in list(self._members):
            queue = self._members[key]
            while queue and queue[0][0] <= oldest:
                self._discard(queue.popleft()[1])
            if not queue:
                del self._members[key]

    def close(self) -> None:
        """Discard every member; members still starting are discarded when started."""
        self._closed = True
        for queue in self._members.values():
            for _, member in queue:
                self._discard(member)
        self._members.clear()
