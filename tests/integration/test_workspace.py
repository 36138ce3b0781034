"""Workspaces on a real filesystem: confinement, atomicity, limits and error mapping."""

from __future__ import annotations

import os
import stat
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.errors import (
    FailedPrecondition,
    InvalidArgument,
    McpError,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
)
from gateway.workspace import Listing, Resolver, Workspaces

pytestmark = pytest.mark.integration

ALL_BYTES = bytes(range(256))
SECRET = b"OUTSIDE-SECRET"


def make(root: Path, resolver: Resolver, **limits: int) -> Workspaces:
    opts = {"max_read_bytes": 1 << 20, "max_write_bytes": 1 << 20, "max_list_entries": 100}
    opts.update(limits)
    return Workspaces(root, resolver=resolver, **opts)


@pytest.fixture(params=["openat2", "walk"])
def resolver(request: pytest.FixtureRequest) -> Resolver:
    """Both resolution strategies: openat2 and the O_NOFOLLOW walk fallback."""
    value: Resolver = request.param
    return value


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory next to the workspaces that must never be reached."""
    path = tmp_path / "outside"
    path.mkdir()
    (path / "secret").write_bytes(SECRET)
    (path / "sub").mkdir()
    (path / "sub" / "keep").write_bytes(SECRET)
    return path


@pytest.fixture
def ws(tmp_path: Path, resolver: Resolver) -> Workspaces:
    return make(tmp_path / "root", resolver)


@pytest.fixture
def home(ws: Workspaces) -> Path:
    """Host path of subject alice's workspace."""
    return ws.path_for("alice")


def snapshot(path: Path) -> dict[str, bytes | None]:
    """Every name under ``path`` with file contents (None for directories)."""
    out: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames:
            out[os.path.relpath(os.path.join(dirpath, name), path)] = None
        for name in filenames:
            full = os.path.join(dirpath, name)
            out[os.path.relpath(full, path)] = (
                None if os.path.islink(full) else Path(full).read_bytes()
            )
    return out


# -- path_for ---------------------------------------------------------------


def test_path_for_creates_private_dir(ws: Workspaces) -> None:
    """path_for creates <root>/<subject> with mode 0o700 and is idempotent."""
    path = ws.path_for("alice@example.com")
    assert path == ws.root / "alice@example.com"
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    assert ws.path_for("alice@example.com") == path


@pytest.mark.parametrize("subject", ["", ".", "..", "a/b", "../x", "x" * 129, "a\x00"])
def test_path_for_rejects_bad_subject(ws: Workspaces, subject: str) -> None:
    """Unsafe subject ids are InvalidArgument(field='subject') and create nothing."""
    with pytest.raises(InvalidArgument) as info:
        ws.path_for(subject)
    assert info.value.field == "subject"
    assert not ws.root.exists() or os.listdir(ws.root) == []


def test_path_for_refuses_planted_symlink(ws: Workspaces, outside: Path) -> None:
    """A workspace that is a symlink is refused, so operations never start outside."""
    ws.root.mkdir(parents=True)
    os.symlink(outside, ws.root / "mallory")
    with pytest.raises(McpError):
        ws.read("mallory", "secret")


# -- round trips ------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", ALL_BYTES, ALL_BYTES * 300, b"\x00" * 10, b"\r\n\xff\xfe"])
def test_round_trip_binary(ws: Workspaces, data: bytes) -> None:
    """write then read returns exactly the bytes written, all 256 byte values included."""
    assert ws.write("alice", "bin/data.bin", data, create_dirs=True) == len(data)
    assert ws.read("alice", "bin/data.bin") == data


@pytest.mark.parametrize(
    ("offset", "length", "expected"),
    [
        (0, None, ALL_BYTES),
        (10, None, ALL_BYTES[10:]),
        (10, 5, ALL_BYTES[10:15]),
        (250, 100, ALL_BYTES[250:]),
        (256, None, b""),
        (1000, 10, b""),
        (0, 0, b""),
    ],
)
def test_read_ranges(ws: Workspaces, offset: int, length: int | None, expected: bytes) -> None:
    """read honours offset and length and returns short data at end of file."""
    ws.write("alice", "f", ALL_BYTES)
    assert ws.read("alice", "f", offset=offset, length=length) == expected


@pytest.mark.parametrize(("offset", "length", "field"), [(-1, None, "offset"), (0, -1, "length")])
def test_read_rejects_negative_range(
    ws: Workspaces, offset: int, length: int | None, field: str
) -> None:
    """Negative offset or length is InvalidArgument naming the field."""
    ws.write("alice", "f", b"x")
    with pytest.raises(InvalidArgument) as info:
        ws.read("alice", "f", offset=offset, length=length)
    assert info.value.field == field


def test_overwrite_is_atomic_and_leaves_no_temp_files(ws: Workspaces, home: Path) -> None:
    """Replacing a file swaps the content and leaves no temporary file behind."""
    ws.write("alice", "f.txt", b"old")
    ws.write("alice", "f.txt", b"new content")
    assert (home / "f.txt").read_bytes() == b"new content"
    assert sorted(os.listdir(home)) == ["f.txt"]


def test_failed_write_leaves_old_content_and_no_temp(ws: Workspaces, home: Path) -> None:
    """A write refused mid-way (target became a directory) keeps the tree clean."""
    (home / "d").mkdir()
    with pytest.raises(FailedPrecondition, match="'d' is a directory"):
        ws.write("alice", "d", b"x")
    assert sorted(os.listdir(home)) == ["d"]


def test_concurrent_readers_see_old_or_new(ws: Workspaces) -> None:
    """Readers racing an overwriting writer only ever see one complete version."""
    versions = [bytes([i]) * 4096 for i in range(2)]
    ws.write("alice", "f", versions[0])
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            i ^= 1
            ws.write("alice", "f", versions[i])

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for _ in range(300):
            assert ws.read("alice", "f") in versions
    finally:
        stop.set()
        thread.join()


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o644, 0o700, 0o755, 0o000, 0o777])
def test_mode_applied_exactly(ws: Workspaces, home: Path, mode: int) -> None:
    """The file gets exactly the requested permission bits, regardless of umask."""
    old = os.umask(0o077)
    try:
        ws.write("alice", "f", b"x", mode=mode)
    finally:
        os.umask(old)
    assert stat.S_IMODE((home / "f").stat().st_mode) == mode
    assert ws.stat("alice", "f").mode == mode


@pytest.mark.parametrize("mode", [-1, 0o1000, 0o4755, 0o2755, 0o1777, 0o7777, True])
def test_mode_rejected(ws: Workspaces, home: Path, mode: int) -> None:
    """setuid/setgid/sticky or out-of-range modes are InvalidArgument(field='mode')."""
    with pytest.raises(InvalidArgument) as info:
        ws.write("alice", "f", b"x", mode=mode)
    assert info.value.field == "mode"
    assert not (home / "f").exists()


def test_create_dirs(ws: Workspaces, home: Path) -> None:
    """Missing parents are NotFound unless create_dirs, which makes them as directories."""
    with pytest.raises(NotFound, match=r"'a/b/c\.txt'"):
        ws.write("alice", "a/b/c.txt", b"x")
    ws.write("alice", "a/b/c.txt", b"x", create_dirs=True)
    assert (home / "a" / "b").is_dir()
    assert (home / "a" / "b" / "c.txt").read_bytes() == b"x"
    ws.write("alice", "a/b/d.txt", b"y", create_dirs=True)  # existing parents are fine
    assert [e.name for e in ws.list("alice", "a/b").entries] == ["c.txt", "d.txt"]


def test_create_dirs_through_file_fails(ws: Workspaces) -> None:
    """create_dirs through a regular file is FailedPrecondition, not a crash."""
    ws.write("alice", "a", b"x")
    with pytest.raises(FailedPrecondition):
        ws.write("alice", "a/b/c", b"x", create_dirs=True)


def test_append(ws: Workspaces, home: Path) -> None:
    """append creates the file with mode, then appends without changing the mode."""
    ws.write("alice", "log", b"one\n", append=True, mode=0o600)
    ws.write("alice", "log", b"two\n", append=True, mode=0o644)
    assert ws.read("alice", "log") == b"one\ntwo\n"
    assert stat.S_IMODE((home / "log").stat().st_mode) == 0o600


def test_write_to_root_refused(ws: Workspaces) -> None:
    """Writing to the workspace root path is InvalidArgument."""
    with pytest.raises(InvalidArgument):
        ws.write("alice", "", b"x")


def test_write_rejects_non_bytes(ws: Workspaces) -> None:
    """Text instead of bytes is InvalidArgument(field='data')."""
    with pytest.raises(InvalidArgument) as info:
        ws.write("alice", "f", "text")  # type: ignore[arg-type]
    assert info.value.field == "data"


# -- reading odd things ------------------------------------------------------


def test_read_directory(ws: Workspaces, home: Path) -> None:
    """Reading a directory is FailedPrecondition with a clear message."""
    (home / "d").mkdir()
    with pytest.raises(FailedPrecondition, match="'d' is a directory"):
        ws.read("alice", "d")


def test_read_fifo_does_not_block(ws: Workspaces, home: Path) -> None:
    """A FIFO planted by a sandboxed command is refused instead of blocking the thread."""
    os.mkfifo(home / "pipe")
    with pytest.raises(FailedPrecondition, match="not a regular file"):
        ws.read("alice", "pipe")
    with pytest.raises(FailedPrecondition):
        ws.write("alice", "pipe", b"x", append=True)


def test_not_found_messages_have_no_host_paths(ws: Workspaces, tmp_path: Path) -> None:
    """Errors name the workspace-relative path only, never the host path."""
    for call in (
        lambda: ws.read("alice", "nope/x"),
        lambda: ws.stat("alice", "nope"),
        lambda: ws.list("alice", "nope"),
        lambda: ws.delete("alice", "nope"),
    ):
        with pytest.raises(NotFound) as info:
            call()
        assert str(tmp_path) not in info.value.message
        assert "nope" in info.value.message


def test_component_not_a_directory(ws: Workspaces) -> None:
    """A regular file used as a directory is FailedPrecondition."""
    ws.write("alice", "f", b"x")
    with pytest.raises(FailedPrecondition, match="not a directory"):
        ws.read("alice", "f/g")
    with pytest.raises(FailedPrecondition):
        ws.list("alice", "f")


# -- symlinks ---------------------------------------------------------------


Op = Callable[[Workspaces, str], object]
OPS: dict[str, Op] = {
    "read": lambda w, p: w.read("alice", p),
    "write": lambda w, p: w.write("alice", p, b"pwned"),
    "write_create_dirs": lambda w, p: w.write("alice", p, b"pwned", create_dirs=True),
    "append": lambda w, p: w.write("alice", p, b"pwned", append=True),
    "list": lambda w, p: w.list("alice", p),
    "stat": lambda w, p: w.stat("alice", p),
    "delete": lambda w, p: w.delete("alice", p, recursive=True),
}


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("absolute", [True, False])
def test_symlink_in_middle_refused(
    ws: Workspaces, home: Path, outside: Path, op: str, absolute: bool
) -> None:
    """A symlink as an intermediate component is refused for every operation."""
    target = outside if absolute else Path(os.path.relpath(outside, home))
    os.symlink(target, home / "link")
    before = snapshot(outside)
    with pytest.raises(PermissionDenied, match="symbolic link") as info:
        OPS[op](ws, "link/secret")
    assert "link/secret" in info.value.message
    assert str(outside) not in info.value.message
    assert snapshot(outside) == before


@pytest.mark.parametrize("op", ["read", "write", "append", "list"])
def test_symlink_at_end_refused(ws: Workspaces, home: Path, outside: Path, op: str) -> None:
    """A symlink as the last component is never followed (read, write, append, list)."""
    os.symlink(outside / "secret", home / "flink")
    os.symlink(outside, home / "dlink")
    before = snapshot(outside)
    with pytest.raises(PermissionDenied):
        OPS[op](ws, "dlink" if op == "list" else "flink")
    assert snapshot(outside) == before
    assert os.path.islink(home / "flink")


def test_symlink_to_inside_file_refused(ws: Workspaces, home: Path) -> None:
    """Even a symlink to a file inside the workspace is refused: links are never followed."""
    ws.write("alice", "real", b"inside")
    os.symlink("real", home / "alias")
    with pytest.raises(PermissionDenied):
        ws.read("alice", "alias")
    (home / "d").mkdir()
    os.symlink("d", home / "dalias")
    with pytest.raises(PermissionDenied):
        ws.read("alice", "dalias/x")


def test_stat_and_list_report_symlinks(ws: Workspaces, home: Path, outside: Path) -> None:
    """stat and list describe a symlink itself (lstat) without following it."""
    os.symlink(outside / "secret", home / "flink")
    entry = ws.stat("alice", "flink")
    assert entry.type == "symlink"
    assert entry.size == len(str(outside / "secret"))
    listing = ws.list("alice")
    assert [(e.name, e.type) for e in listing.entries] == [("flink", "symlink")]


def test_swap_race_never_escapes(tmp_path: Path, resolver: Resolver, outside: Path) -> None:
    """A directory swapped for a symlink to outside in a tight loop never leaks outside content."""
    ws = make(tmp_path / "root", resolver)
    home = ws.path_for("alice")
    (home / "d").mkdir()
    (home / "d" / "secret").write_bytes(b"inside")
    os.symlink(outside, home / "link")
    stop = threading.Event()

    def swapper() -> None:
        while not stop.is_set():
            os.rename(home / "d", home / "real")
            os.rename(home / "link", home / "d")
            os.rename(home / "d", home / "link")
            os.rename(home / "real", home / "d")

    seen: Counter[str] = Counter()
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    thread = threading.Thread(target=swapper)
    thread.start()
    try:
        for _ in range(2000):
            try:
                data = ws.read("alice", "d/secret")
            except (PermissionDenied, NotFound) as exc:
                seen[type(exc).__name__] += 1
                continue
            assert data == b"inside"
            seen["ok"] += 1
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(old_interval)
    assert seen["ok"] + seen["PermissionDenied"] + seen["NotFound"] == 2000
    assert seen["ok"] < 2000, "the swap never interleaved with a read"


def test_other_subject_unreachable(ws: Workspaces, home: Path) -> None:
    """No path given to alice reaches bob's workspace, via '..' or via a symlink."""
    bob = ws.path_for("bob")
    (bob / "private").write_bytes(b"bob's")
    for path in ("../bob/private", "/../bob/private", str(bob / "private")):
        with pytest.raises(InvalidArgument):
            ws.read("alice", path)
    os.symlink(bob, home / "bob")
    with pytest.raises(PermissionDenied):
        ws.read("alice", "bob/private")
    with pytest.raises(NotFound):
        ws.read("alice", "private")
    assert (bob / "private").read_bytes() == b"bob's"


# -- delete -----------------------------------------------------------------


def test_delete_file_and_symlink(ws: Workspaces, home: Path, outside: Path) -> None:
    """delete removes a file, and a symlink itself without touching its target."""
    ws.write("alice", "f", b"x")
    os.symlink(outside / "secret", home / "flink")
    ws.delete("alice", "f")
    ws.delete("alice", "flink")
    assert os.listdir(home) == []
    assert (outside / "secret").read_bytes() == SECRET


def test_delete_directory_needs_recursive(ws: Workspaces, home: Path) -> None:
    """A directory without recursive=True is FailedPrecondition naming it."""
    ws.write("alice", "d/f", b"x", create_dirs=True)
    with pytest.raises(FailedPrecondition, match="'d' is a directory"):
        ws.delete("alice", "d")
    assert (home / "d" / "f").exists()
    ws.write("alice", "empty/f", b"x", create_dirs=True)
    ws.delete("alice", "empty/f")
    with pytest.raises(FailedPrecondition):
        ws.delete("alice", "empty")


@pytest.mark.parametrize("path", ["", ".", "./", "a/.."])
def test_delete_root_refused(ws: Workspaces, home: Path, path: str) -> None:
    """The workspace root can never be deleted."""
    with pytest.raises(InvalidArgument):
        ws.delete("alice", path, recursive=True)
    assert home.is_dir()


def test_delete_recursive_keeps_symlink_targets(ws: Workspaces, home: Path, outside: Path) -> None:
    """Recursive delete unlinks symlinks to outside and leaves their targets intact."""
    tree = home / "t"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "b" / "f").write_bytes(b"x")
    (tree / "g").write_bytes(b"y")
    os.symlink(outside, tree / "a" / "dirlink")
    os.symlink(outside / "secret", tree / "a" / "b" / "filelink")
    os.symlink("/", tree / "rootlink")
    before = snapshot(outside)
    ws.delete("alice", "t", recursive=True)
    assert os.listdir(home) == []
    assert snapshot(outside) == before


def test_delete_recursive_deep_tree(ws: Workspaces, home: Path) -> None:
    """A deep tree (deeper than Python's recursion limit) is deleted."""
    depth = 1200
    ws.write("alice", "/".join(["d"] * depth) + "/f", b"x", create_dirs=True)
    ws.delete("alice", "d", recursive=True)
    assert os.listdir(home) == []


def test_delete_recursive_deep_branching_tree(ws: Workspaces, home: Path, outside: Path) -> None:
    """Branches deep below the held-descriptor window are all found and deleted."""
    for prefix, leaf in ((100, "x"), (100, "y"), (70, "z"), (3, "w")):
        ws.write("alice", "/".join(["d"] * prefix) + f"/{leaf}/f", b"x", create_dirs=True)
    os.symlink(outside, home / "/".join(["d"] * 80) / "link")
    before = snapshot(outside)
    ws.delete("alice", "d", recursive=True)
    assert os.listdir(home) == []
    assert snapshot(outside) == before


# -- limits -----------------------------------------------------------------


def test_read_limit(tmp_path: Path, resolver: Resolver) -> None:
    """Reading more than max_read_bytes is PayloadTooLarge; ranged reads still work."""
    ws = make(tmp_path / "root", resolver, max_read_bytes=100)
    ws.write("alice", "big", b"x" * 101)
    ws.write("alice", "ok", b"x" * 100)
    assert ws.read("alice", "ok") == b"x" * 100
    with pytest.raises(PayloadTooLarge):
        ws.read("alice", "big")
    assert ws.read("alice", "big", offset=1) == b"x" * 100
    assert ws.read("alice", "big", length=100) == b"x" * 100
    with pytest.raises(PayloadTooLarge) as info:
        ws.read("alice", "ok", length=101)
    assert info.value.field == "length"


def test_write_limit(tmp_path: Path, resolver: Resolver) -> None:
    """Writing more than max_write_bytes is PayloadTooLarge and writes nothing."""
    ws = make(tmp_path / "root", resolver, max_write_bytes=10)
    assert ws.write("alice", "ok", b"x" * 10) == 10
    with pytest.raises(PayloadTooLarge):
        ws.write("alice", "big", b"x" * 11)
    assert [e.name for e in ws.list("alice").entries] == ["ok"]


@pytest.mark.parametrize(("count", "truncated"), [(0, False), (4, False), (5, False), (6, True)])
def test_list_cap(tmp_path: Path, resolver: Resolver, count: int, truncated: bool) -> None:
    """list returns at most max_list_entries sorted entries and flags truncation."""
    ws = make(tmp_path / "root", resolver, max_list_entries=5)
    for i in range(count):
        ws.write("alice", f"f{i}", b"x" * i)
    listing = ws.list("alice")
    assert isinstance(listing, Listing)
    assert listing.truncated is truncated
    assert len(listing.entries) == min(count, 5)
    names = [e.name for e in listing.entries]
    assert names == sorted(names)


def test_list_and_stat_entries(ws: Workspaces) -> None:
    """list and stat report type, size, mode and mtime."""
    ws.write("alice", "d/f", b"hello", create_dirs=True, mode=0o640)
    (entry,) = ws.list("alice", "d").entries
    assert (entry.name, entry.type, entry.size, entry.mode) == ("f", "file", 5, 0o640)
    assert entry.mtime > 0
    assert ws.stat("alice", "d").type == "dir"
    assert ws.stat("alice", "").name == "."


# -- fuzz -------------------------------------------------------------------

_FUZZ_COMPONENTS = st.sampled_from(
    ["", ".", "..", "d", "f", "link", "flink", "abs", "up", "bob", "secret", "\x00", "\udcff"]
)
_FUZZ_PATHS = st.one_of(
    st.text(max_size=30),
    st.lists(_FUZZ_COMPONENTS, max_size=6).map("/".join),
    st.lists(_FUZZ_COMPONENTS, min_size=1, max_size=6).map(lambda p: "/" + "/".join(p)),
)


def _ensure_layout(root: Path, outside: Path) -> None:
    home = root / "alice"
    (home / "d").mkdir(parents=True, exist_ok=True)
    (root / "bob").mkdir(exist_ok=True)
    (root / "bob" / "secret").write_bytes(SECRET)
    links = {"link": outside, "flink": outside / "secret", "abs": Path("/"), "up": Path("..")}
    for name, target in links.items():
        if not os.path.lexists(home / name):
            os.symlink(target, home / name)


@pytest.fixture
def fuzz_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp)


@pytest.mark.parametrize("fuzz_resolver", ["openat2", "walk"])
def test_fuzzed_paths_stay_inside(fuzz_dir: Path, fuzz_resolver: Resolver) -> None:
    """Arbitrary path strings only ever raise McpError and never change anything outside."""
    root, outside = fuzz_dir / "root", fuzz_dir / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(SECRET)
    ws = make(root, fuzz_resolver)
    _ensure_layout(root, outside)
    before = snapshot(outside)

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(path=_FUZZ_PATHS, op=st.sampled_from(sorted(OPS)))
    def run(path: str, op: str) -> None:
        _ensure_layout(root, outside)
        result: object = None
        error: McpError | None = None
        try:
            result = OPS[op](ws, path)
        except McpError as exc:
            error = exc
        if error is not None:
            assert str(fuzz_dir) not in error.message
        elif op == "read":
            assert result != SECRET
        assert snapshot(outside) == before
        assert sorted(os.listdir(fuzz_dir)) == ["outside", "root"]
        assert (root / "bob" / "secret").read_bytes() == SECRET

    run()


def test_move_renames_and_never_replaces(ws: Workspaces, home: Path) -> None:
    """move renames files and directories, refuses an existing destination and the root."""
    (home / "a").write_bytes(b"A")
    (home / "b").write_bytes(b"B")
    (home / "d").mkdir()
    ws.move("alice", "a", "d/a2")
    assert (home / "d" / "a2").read_bytes() == b"A"
    assert not (home / "a").exists()
    with pytest.raises(FailedPrecondition, match="already exists"):
        ws.move("alice", "b", "d/a2")
    assert (home / "d" / "a2").read_bytes() == b"A"
    ws.move("alice", "d", "e")
    assert (home / "e" / "a2").is_file()
    with pytest.raises(FailedPrecondition, match="into itself"):
        ws.move("alice", "e", "e/f")
    with pytest.raises(InvalidArgument) as info:
        ws.move("alice", ".", "x")
    assert info.value.field == "source"
    with pytest.raises(InvalidArgument) as info:
        ws.move("alice", "b", "../x")
    assert info.value.field == "destination"
    with pytest.raises(NotFound):
        ws.move("alice", "missing", "x")


def test_move_never_goes_through_symlinks(ws: Workspaces, home: Path, outside: Path) -> None:
    """A symlinked parent is refused at either end; a symlink itself moves as a link."""
    (home / "f").write_bytes(b"F")
    (home / "out").symlink_to(outside)
    with pytest.raises(PermissionDenied):
        ws.move("alice", "f", "out/stolen")
    with pytest.raises(PermissionDenied):
        ws.move("alice", "out/secret", "mine")
    ws.move("alice", "out", "out2")
    assert (home / "out2").is_symlink()
    assert sorted(p.name for p in outside.iterdir()) == ["secret", "sub"]
