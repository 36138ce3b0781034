"""Gateway round trip and throughput against a bare bwrap spawn, measured in one run.

Prints p50/p95 of a bare ``bwrap`` spawn with the gateway's own flags (same
argv builder, seccomp filter and synthetic /etc files) next to
``POST /v1/commands`` with ``wait`` for ``echo`` (and the same over gRPC and
as an MCP ``tools/call`` of ``shell_execute``), their ratios, sustained
tasks/s at concurrency 16 against a raw bwrap loop, and the gateway's RSS
while 1 GiB of output streams through a capped task.

The gateway runs with its default config, so a subject's next command finds
a warm sandbox (set up while the previous one ran) where it can.  The same
REST series against a second gateway with warm sandboxes off shows the
gateway's own cost on top of a sandbox started for each command.  The
latency series send requests back to back; one more series puts a pause
before each request (bare spawn, warm and cold gateway taking turns), as an
agent does between two tool calls.

Run with ``make bench`` (``python -m bench.roundtrip --help`` for knobs).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import grpc

from gateway import bwrap as bw
from gateway.models import CommandSpec, Limits, SandboxRequest, Subject
from gateway.policy import EmbeddedEngine, build_policy_input
from gateway.proto import mcp_pb2, mcp_pb2_grpc
from gateway.sandbox import BwrapSandbox
from gateway.seccomp import sealed_memfd, seccomp_fd
from tests.conftest import OPA, POLICIES, USERS, make_config
from tests.integration.gateway_proc import GatewayProcess

TOKEN = USERS["alice"][0]


@dataclasses.dataclass(frozen=True)
class BareFlags:
    """What the gateway's own bwrap command line is built from, besides the request."""

    layout: bw.HostLayout
    dev_dir: str | None  # private device nodes, used when the gateway runs as root


@contextlib.contextmanager
def gateway_flags() -> Iterator[BareFlags]:
    """The host layout and device nodes a gateway on this host gives bwrap.

    Taken from a :class:`BwrapSandbox` itself, so the bare spawn gets every
    flag the gateway's spawn gets (as root that includes binding private
    copies of the device nodes over bwrap's ``--dev`` ones).
    """
    sandbox = BwrapSandbox(cgroups="off", cgroup_parent=f"mcp-bench-bare-{os.getpid()}")
    try:
        yield BareFlags(sandbox.layout, sandbox.dev_dir)
    finally:
        sandbox.close()


async def bare_spawn(workspace: str, flags: BareFlags) -> None:
    """One bwrap run of ``echo hello`` with the gateway's flags, output read."""
    req = SandboxRequest(
        task_id="0" * 32, argv=("echo", "hello"), workspace=workspace, limits=Limits()
    )
    fds = [
        seccomp_fd(),
        sealed_memfd("passwd", bw.synthetic_passwd()),
        sealed_memfd("group", bw.synthetic_group()),
    ]
    argv = bw.build_bwrap_argv(
        req,
        bwrap_path="/usr/bin/bwrap",
        seccomp_fd=fds[0],
        passwd_fd=fds[1],
        group_fd=fds[2],
        layout=flags.layout,
        dev_dir=flags.dev_dir,
    )
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdout=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL,
            pass_fds=fds,
        )
    finally:
        for fd in fds:
            os.close(fd)
    out, _ = await proc.communicate()
    assert proc.returncode == 0 and out == b"hello\n", (proc.returncode, out)


async def gateway_echo(session: aiohttp.ClientSession, url: str) -> None:
    async with session.post(
        url + "/v1/commands",
        json={"command": "echo", "args": ["hello"], "wait": True},
    ) as resp:
        body = await resp.json()
        assert resp.status == 200 and body["stdout"] == "hello\n", body


class McpSession:
    """One MCP session on ``/mcp`` (initialize, then ``tools/call`` of shell_execute)."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session = session
        self.url = url + "/mcp"
        self.headers = {"Accept": "application/json, text/event-stream"}
        self.ids = 0

    async def rpc(self, method: str, params: dict[str, object], notify: bool = False) -> object:
        self.ids += 1
        body: dict[str, object] = {"jsonrpc": "2.0", "method": method, "params": params}
        if not notify:
            body["id"] = self.ids
        async with self.session.post(self.url, json=body, headers=self.headers) as resp:
            if "Mcp-Session-Id" in resp.headers:
                self.headers["Mcp-Session-Id"] = resp.headers["Mcp-Session-Id"]
                self.headers["MCP-Protocol-Version"] = "2025-11-25"
            if notify:
                assert resp.status == 202, resp.status
                return None
            reply = await resp.json()
            assert resp.status == 200 and "result" in reply, reply
            return reply["result"]

    async def open(self) -> McpSession:
        info = {"name": "bench", "version": "1"}
        await self.rpc(
            "initialize",
            {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": info},
        )
        await self.rpc("notifications/initialized", {}, notify=True)
        return self

    async def echo(self) -> None:
        result = await self.rpc(
            "tools/call", {"name": "shell_execute", "arguments": {"command": ["echo", "hello"]}}
        )
        assert isinstance(result, dict) and not result.get("isError"), result
        assert result["structuredContent"]["stdout"] == "hello\n", result


async def sandbox_run(sandbox: BwrapSandbox, workspace: str) -> None:
    """The gateway's sandbox alone (cgroup placement, rlimits, reaping), no API."""
    req = SandboxRequest(
        task_id=os.urandom(16).hex(), argv=("echo", "hello"), workspace=workspace, limits=Limits()
    )
    result = await sandbox.run(req, lambda _s, _d: None, asyncio.Event())
    assert result.exit_code == 0, result


def echo_decision_input() -> dict[str, object]:
    """The policy input of a developer's ``echo hello`` (what every bench decides)."""
    return build_policy_input(
        "command.execute",
        Subject("alice", ("developer",)),
        request_id="bench",
        transport="rest",
        source="127.0.0.1",
        command=CommandSpec("echo", ("hello",)),
    )


async def breakdown(workspace: str, n: int) -> dict[str, list[float]]:
    """Where the round trip goes: the sandbox alone and one policy decision."""
    sandbox = BwrapSandbox(cgroup_parent=f"mcp-bench-{os.getpid()}")
    engine = EmbeddedEngine(POLICIES, timeout_s=1.0, opa_binary=str(OPA))
    doc = echo_decision_input()

    async def decide() -> None:
        assert (await engine.decide(doc)).allow

    try:
        return {
            "sandbox": await latencies(lambda: sandbox_run(sandbox, workspace), n, 3),
            "policy": await latencies(decide, n, 3),
        }
    finally:
        sandbox.close()
        await engine.close()


async def grpc_echo(stub: mcp_pb2_grpc.McpServiceAsyncStub) -> None:
    reply = await stub.ExecuteCommand(
        mcp_pb2.CommandRequest(command="echo", args=["hello"], timeout=30, wait=True),
        metadata=(("authorization", f"Bearer {TOKEN}"),),
    )
    assert reply.result.stdout == "hello\n", reply


async def latencies(fn: Callable[[], Awaitable[None]], n: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        await fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await fn()
        out.append(time.perf_counter() - t0)
    return out


async def throughput(fn: Callable[[], Awaitable[None]], total: int, concurrency: int) -> float:
    remaining = total

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await fn()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return total / (time.perf_counter() - t0)


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] * 1000


def spread(ratios: list[float]) -> str:
    """Per-round ratios (each against the bare series of its own round), in run order."""
    return " ".join(f"{r:.2f}" for r in ratios)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def output_flood(
    session: aiohttp.ClientSession, url: str, pid: int
) -> tuple[int, int, dict[str, object]]:
    """Stream 1 GiB through a capped task; return (RSS before, peak RSS during) in KiB."""
    before = rss_kib(pid)
    peak = before
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, rss_kib(pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        async with session.post(
            url + "/v1/commands",
            json={
                "command": "head",
                "args": ["-c", "1073741824", "/dev/zero"],
                "wait": True,
                "timeout": 300,
            },
        ) as resp:
            body = await resp.json()
    finally:
        stop.set()
        sampler.join()
    return before, peak, body


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="mcp-bench-") as tmp, gateway_flags() as flags:
        tmpdir = Path(tmp)
        workspace = tmpdir / "ws"
        workspace.mkdir()
        state = tmpdir / "state"
        state.mkdir()
        config = make_config(
            state,
            tasks={"max_concurrent": args.concurrency, "max_queue": 1024, "retention_s": 3600},
        )
        gw = GatewayProcess(config, tmpdir)
        gw.start()
        assert gw.proc is not None
        # The same gateway without warm sandboxes: every command in a sandbox
        # started for it, as the bare spawn is.
        # Its state directory's name also names its cgroup parent: one of its
        # own, so each gateway removes the base directories it made.
        cold_dir = tmpdir / "cold"
        (cold_dir / "cold-state").mkdir(parents=True)
        cold_gw = GatewayProcess(
            make_config(cold_dir / "cold-state", sandbox={"warm": {"per_subject": 0}}), cold_dir
        )
        cold_gw.start()
        try:
            async with aiohttp.ClientSession(
                headers={"Authorization": f"Bearer {TOKEN}"},
                connector=aiohttp.TCPConnector(limit=args.concurrency * 2),
            ) as session:
                bare = lambda: bare_spawn(str(workspace), flags)  # noqa: E731
                echo = lambda: gateway_echo(session, gw.url)  # noqa: E731
                cold_echo = lambda: gateway_echo(session, cold_gw.url)  # noqa: E731
                # Interleave the series so machine noise hits all alike.
                bare_lat: list[float] = []
                gw_lat: list[float] = []
                cold_lat: list[float] = []
                grpc_lat: list[float] = []
                mcp_lat: list[float] = []
                async with grpc.aio.insecure_channel(f"127.0.0.1:{gw.grpc_port}") as channel:
                    stub = mcp_pb2_grpc.McpServiceStub(channel)
                    via_grpc = lambda: grpc_echo(stub)  # noqa: E731
                    mcp = await McpSession(session, gw.url).open()
                    # Each round's own p50 ratios too, to show the spread.
                    per_round: dict[str, list[float]] = {"rest": [], "grpc": []}
                    for _ in range(args.rounds):
                        step = args.n // args.rounds
                        bare_round = await latencies(bare, step, 3)
                        rest_round = await latencies(echo, step, 3)
                        cold_lat += await latencies(cold_echo, step, 3)
                        grpc_round = await latencies(via_grpc, step, 3)
                        mcp_lat += await latencies(mcp.echo, step, 3)
                        bare_p50 = statistics.median(bare_round)
                        per_round["rest"].append(statistics.median(rest_round) / bare_p50)
                        per_round["grpc"].append(statistics.median(grpc_round) / bare_p50)
                        bare_lat += bare_round
                        gw_lat += rest_round
                        grpc_lat += grpc_round
                # Requests with a pause before each (an agent between two tool
                # calls), taking turns: the warm sandbox is set up in the pause.
                paced: dict[str, list[float]] = {"bare": [], "warm": [], "cold": []}
                for _ in range(args.paced_n):
                    for name, fn in (("bare", bare), ("warm", echo), ("cold", cold_echo)):
                        await asyncio.sleep(args.pause_ms / 1000)
                        paced[name] += await latencies(fn, 1, 0)
                # Interleaved runs too; each figure is the median of its runs.
                runs: dict[str, list[float]] = {"raw": [], "rest": [], "mcp": []}
                for _ in range(args.tp_rounds):
                    runs["raw"].append(await throughput(bare, args.total, args.concurrency))
                    runs["rest"].append(await throughput(echo, args.total, args.concurrency))
                    runs["mcp"].append(await throughput(mcp.echo, args.total, args.concurrency))
                raw_tps, gw_tps, mcp_tps = (statistics.median(runs[k]) for k in runs)
                before, peak, flood = await output_flood(session, gw.url, gw.proc.pid)
        finally:
            gw.stop()
            cold_gw.stop()
        # Last: the sandbox run in this process makes it a child subreaper
        # (see gateway.sandbox.become_subreaper), and the bare spawns' pid 1s
        # would then stay here as zombies and slow every later spawn down.
        parts = await breakdown(str(workspace), args.n // 2)

    b50, b95, g50, g95 = pct(bare_lat, 50), pct(bare_lat, 95), pct(gw_lat, 50), pct(gw_lat, 95)
    print(f"bare bwrap spawn        p50 {b50:7.2f} ms   p95 {b95:7.2f} ms   (n={len(bare_lat)})")
    print(f"REST exec echo (wait)   p50 {g50:7.2f} ms   p95 {g95:7.2f} ms   (n={len(gw_lat)})")
    print(
        f"ratio REST/bare         p50 {g50 / b50:5.2f}x      p95 {g95 / b95:5.2f}x"
        f"   (target p50 <= 1.30x; rounds {spread(per_round['rest'])})"
    )
    c50, c95 = pct(cold_lat, 50), pct(cold_lat, 95)
    print(f"REST, no warm sandbox   p50 {c50:7.2f} ms   p95 {c95:7.2f} ms   (n={len(cold_lat)})")
    print(
        f"ratio REST cold/bare    p50 {c50 / b50:5.2f}x      p95 {c95 / b95:5.2f}x"
        "   (the gateway's own cost; sandbox.warm.per_subject: 0)"
    )
    r50, r95 = pct(grpc_lat, 50), pct(grpc_lat, 95)
    print(f"gRPC exec echo (wait)   p50 {r50:7.2f} ms   p95 {r95:7.2f} ms   (n={len(grpc_lat)})")
    print(
        f"ratio gRPC/bare         p50 {r50 / b50:5.2f}x      p95 {r95 / b95:5.2f}x"
        f"   (target p50 <= 1.30x; rounds {spread(per_round['grpc'])})"
    )
    m50, m95 = pct(mcp_lat, 50), pct(mcp_lat, 95)
    print(f"MCP tools/call echo     p50 {m50:7.2f} ms   p95 {m95:7.2f} ms   (n={len(mcp_lat)})")
    print(
        f"ratio MCP/bare          p50 {m50 / b50:5.2f}x      p95 {m95 / b95:5.2f}x"
        "   (target p50 <= 1.50x)"
    )
    pb, pw, pc = (pct(paced[k], 50) for k in ("bare", "warm", "cold"))
    print(
        f"with {args.pause_ms:g} ms pauses      p50 bare {pb:.2f} ms, REST warm {pw:.2f} ms "
        f"({pw / pb:.2f}x), REST cold {pc:.2f} ms ({pc / pb:.2f}x)   (n={args.paced_n} each)"
    )
    s50, p50 = pct(parts["sandbox"], 50), pct(parts["policy"], 50)
    print(
        f"  of which: sandbox.run alone p50 {s50:6.2f} ms ({s50 / b50:.2f}x bare); "
        f"one embedded policy decision p50 {p50:6.2f} ms"
    )
    print(f"throughput: median of {args.tp_rounds} interleaved runs of {args.total} tasks each")
    print(f"raw bwrap loop          {raw_tps:7.1f} tasks/s at concurrency {args.concurrency}")
    print(f"gateway REST            {gw_tps:7.1f} tasks/s at concurrency {args.concurrency}")
    paired = [rest / raw for rest, raw in zip(runs["rest"], runs["raw"], strict=True)]
    print(
        f"ratio throughput        {gw_tps / raw_tps:5.2f}x"
        f"   (target >= 0.70x; runs {spread(paired)})"
    )
    print(f"gateway MCP tools/call  {mcp_tps:7.1f} tasks/s at concurrency {args.concurrency}")
    print(f"ratio MCP throughput    {mcp_tps / raw_tps:5.2f}x   (target >= 0.60x)")
    print(
        f"1 GiB output flood      gateway RSS {before / 1024:.1f} MiB before, "
        f"{peak / 1024:.1f} MiB peak (target < 150 MiB); task {flood.get('state')}, "
        f"stdout_bytes={flood.get('stdout_bytes')}, truncated={flood.get('stdout_truncated')}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=200, help="sequential samples per series")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds")
    parser.add_argument("--total", type=int, default=320, help="tasks per throughput run")
    parser.add_argument("--tp-rounds", type=int, default=5, help="interleaved throughput runs")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--paced-n", type=int, default=100, help="requests with a pause, each")
    parser.add_argument("--pause-ms", type=float, default=20.0, help="the pause before each")
    asyncio.run(main(parser.parse_args()))
