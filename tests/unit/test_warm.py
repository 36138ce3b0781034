"""The warm sandboxes' launcher script, failure wording and pool bookkeeping (pure parts)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.models import Limits, SandboxRequest
from gateway.warm import (
    MAX_SCRIPT_BYTES,
    WarmPool,
    classify_launch_failure,
    launch_script,
    warm_key,
)

pytestmark = pytest.mark.unit

# The printer the script's exec is pointed at instead of the command: it
# writes its arguments and its T_* environment as JSON.
PRINTER = (
    "import json, os, sys; print(json.dumps([sys.argv[1:], "
    '{k: v for k, v in os.environ.items() if k.startswith("T_")}]))'
)


def req(
    argv: tuple[str, ...] = ("echo", "hi"),
    env: tuple[tuple[str, str], ...] = (),
    stdin: bytes | None = None,
) -> SandboxRequest:
    return SandboxRequest(task_id="t" * 32, argv=argv, workspace="/srv/ws", env=env, stdin=stdin)


def through_sh(script: bytes) -> tuple[list[str], dict[str, str]]:
    """Feed ``script`` to a real /bin/sh on stdin, as the launcher gets it."""
    done = subprocess.run(
        ["/bin/sh"], input=script, capture_output=True, check=True, env={"PATH": os.defpath}
    )
    args, env = json.loads(done.stdout)
    return args, env


def printer_request(args: tuple[str, ...], env: tuple[tuple[str, str], ...] = ()) -> SandboxRequest:
    return req(argv=("python3", "-c", PRINTER, *args), env=env)


def test_script_hands_the_shell_exactly_the_argv_and_env() -> None:
    """Quotes, spaces, newlines, globs and expansions reach the command as written."""
    args = ("it's", 'say "hi"', "a b", "line\nbreak", "*", "$HOME", "`id`", "$(id)", "\\", "")
    env = (("T_ONE", "x'y"), ("T_TWO", "$PATH and `id`\n"))
    script = launch_script(printer_request(args, env))
    assert script is not None
    got_args, got_env = through_sh(script)
    assert got_args == list(args)
    assert got_env == dict(env)


@settings(max_examples=60, deadline=None)
@given(
    args=st.lists(
        st.text(st.characters(blacklist_characters="\x00", codec="utf-8"), max_size=12),
        max_size=5,
    ),
    value=st.text(st.characters(blacklist_characters="\x00", codec="utf-8"), max_size=20),
)
def test_any_text_survives_the_script(args: list[str], value: str) -> None:
    """Whatever text the request holds, the command gets it unchanged (no shell expansion)."""
    script = launch_script(printer_request(tuple(args), (("T_VALUE", value),)))
    assert script is not None
    got_args, got_env = through_sh(script)
    assert got_args == args
    assert got_env == {"T_VALUE": value}


def test_the_command_gets_dev_null_as_stdin() -> None:
    """The script pipe is the shell's stdin, never the command's."""
    script = launch_script(req(argv=("cat",)))
    assert script is not None
    assert script.endswith(b"exec cat </dev/null\n")
    done = subprocess.run(
        ["/bin/sh"], input=script + b"this line is not for cat\n", capture_output=True
    )
    assert (done.returncode, done.stdout) == (0, b"")


@pytest.mark.parametrize(
    ("request_", "why"),
    [
        (req(stdin=b"data"), "stdin data cannot follow the script"),
        (req(argv=("-x",)), "an option is not a command name"),
        (req(env=(("PWD", "/x"),)), "the shell sets PWD itself"),
        (req(env=(("LINENO", "1"),)), "the shell rewrites LINENO"),
        (req(argv=("echo", "x" * MAX_SCRIPT_BYTES)), "longer than one atomic pipe write"),
    ],
)
def test_requests_a_script_cannot_say_exactly_are_not_run_warm(
    request_: SandboxRequest, why: str
) -> None:
    assert launch_script(request_) is None, why


def test_key_is_what_bwraps_command_line_depends_on() -> None:
    base = req()
    assert warm_key(base) == ("/srv/ws", "/workspace", False, Limits().tmp_size_bytes)
    other = SandboxRequest(
        task_id="u" * 32,
        argv=("ls",),
        workspace="/srv/ws",
        env=(("T", "1"),),
        limits=Limits(memory_bytes=1 << 30),
    )
    assert warm_key(other) == warm_key(base)  # argv, env and cgroup limits come later
    assert warm_key(SandboxRequest("t" * 32, ("ls",), "/srv/ws", limits=Limits(network=True))) != (
        warm_key(base)
    )


@pytest.mark.parametrize(
    ("code", "head", "expected"),
    [
        (
            127,
            b"/bin/sh: 1: exec: nosuch: not found\n",
            ("sandbox: execvp nosuch: No such file or directory", 127),
        ),
        (
            126,
            b"/bin/sh: 3: exec: ./run.sh: Permission denied\n",
            ("sandbox: execvp ./run.sh: Permission denied", 126),
        ),
        (127, b"/bin/sh: 1: exec: other: not found\n", None),  # not our command's name
        (1, b"/bin/sh: 1: exec: nosuch: not found\n", None),  # not the shell's exit code
        (127, b"nosuch: command printed this\n", None),
        (127, b"/bin/sh: 1: exec: nosuch: not found\nmore\n", None),
    ],
)
def test_launch_failures_are_worded_like_bwraps(
    code: int, head: bytes, expected: tuple[str, int] | None
) -> None:
    argv0 = "./run.sh" if b"run.sh" in head else "nosuch"
    assert classify_launch_failure(code, head, argv0) == expected


def test_launch_failure_wording_matches_the_real_shell(tmp_path: os.PathLike[str]) -> None:
    """What dash really prints for a missing and a non-executable command is recognised."""
    script_path = os.path.join(tmp_path, "run.sh")
    with open(script_path, "w") as fh:
        fh.write("echo hi\n")
    for argv0, want in (("no-such-command-here", 127), (script_path, 126)):
        script = launch_script(req(argv=(argv0,)))
        assert script is not None
        done = subprocess.run(["/bin/sh"], input=script, capture_output=True)
        assert classify_launch_failure(done.returncode, done.stderr, argv0) is not None
        assert done.returncode == want


# -- the pool -----------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def pool(
    per_key: int = 2, total: int = 3, idle_s: float = 10.0
) -> tuple[WarmPool[str, str, object], list[str], Clock]:
    discarded: list[str] = []
    clock = Clock()
    return (
        WarmPool(
            per_key=per_key, total=total, idle_s=idle_s, discard=discarded.append, clock=clock
        ),
        discarded,
        clock,
    )


def fill(p: WarmPool[str, str, object], key: str, *members: str) -> None:
    for member in members:
        handle = object()
        p.starting(key, handle)
        assert p.started(key, handle, member)


def test_pool_is_bounded_per_key_and_in_total() -> None:
    p, _, _ = pool(per_key=2, total=3)
    assert p.want("a") == 2
    fill(p, "a", "a1", "a2")
    assert p.want("a") == 0
    assert p.want("b") == 1  # the total leaves room for one more
    fill(p, "b", "b1")
    assert (p.want("b"), len(p)) == (0, 3)


def test_members_starting_count_against_the_bounds() -> None:
    p, _, _ = pool(per_key=2, total=3)
    p.starting("a", object())
    assert p.want("a") == 1
    assert p.pending == 1


def test_take_gives_the_oldest_living_member_and_discards_dead_ones() -> None:
    p, discarded, _ = pool()
    fill(p, "a", "dead", "alive")
    alive: Callable[[str], bool] = lambda m: m != "dead"  # noqa: E731
    assert p.take("a", alive) == ("alive", None)
    assert discarded == ["dead"]
    assert p.take("a", alive) == (None, None)


def test_take_hands_out_a_member_still_starting_once() -> None:
    p, discarded, _ = pool()
    handle = object()
    p.starting("a", handle)
    assert p.take("a") == (None, handle)
    assert p.take("a") == (None, None)
    # Its start ends later: the taker owns it, the pool does not keep it.
    assert not p.started("a", handle, "a1")
    assert (len(p), discarded) == (0, [])


def test_a_failed_start_frees_its_place() -> None:
    p, _, _ = pool(per_key=1)
    handle = object()
    p.starting("a", handle)
    assert p.want("a") == 0
    assert p.started("a", handle, None)
    assert p.want("a") == 1


def test_idle_members_are_discarded() -> None:
    p, discarded, clock = pool(idle_s=10.0)
    fill(p, "a", "old")
    clock.now += 5
    fill(p, "a", "new")
    clock.now += 6
    p.expire()
    assert discarded == ["old"]
    assert p.take("a") == ("new", None)


def test_close_discards_members_now_and_those_still_starting_later() -> None:
    p, discarded, _ = pool()
    fill(p, "a", "a1")
    handle = object()
    p.starting("b", handle)
    p.close()
    assert discarded == ["a1"]
    assert p.want("a") == 0
    assert p.started("b", handle, "b1")
    assert discarded == ["a1", "b1"]
    assert len(p) == 0
