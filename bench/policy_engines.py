"""Policy decision latency for both engines, and the echo round trip with each.

Prints p50/p99 of one ``command.execute`` decision from the embedded engine
(OPA-compiled Wasm, in process) and from the OPA daemon over its unix socket, then the
REST ``echo`` round trip (``wait``) through a gateway using each engine, as
ratios to a bare bwrap spawn measured in the same run.

Run with ``make bench`` (needs ``make opa``).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
from collections.abc import Awaitable
from pathlib import Path

import aiohttp

from bench.roundtrip import (
    TOKEN,
    bare_spawn,
    echo_decision_input,
    gateway_echo,
    gateway_flags,
    latencies,
)
from gateway.opa import OpaEngine
from gateway.policy import EmbeddedEngine, PolicyEngine
from tests.conftest import OPA, POLICIES, make_config
from tests.integration.gateway_proc import GatewayProcess
from tests.integration.test_policy_opa import OpaDaemon


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1e6


async def decisions(engine: PolicyEngine, n: int) -> list[float]:
    doc = echo_decision_input()

    async def one() -> None:
        assert (await engine.decide(doc)).allow

    return await latencies(one, n, 20)


async def main(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="mcp-bench-"))
    opa = OpaDaemon(POLICIES, work)
    opa.start()
    try:
        embedded = EmbeddedEngine(POLICIES, timeout_s=1.0, opa_binary=str(OPA))
        remote = OpaEngine(opa.url, timeout_s=1.0, policy_dir=POLICIES)
        emb = await decisions(embedded, args.n)
        rem = await decisions(remote, args.n)
        await embedded.close()
        await remote.close()

        workspace = work / "ws"
        workspace.mkdir()
        with gateway_flags() as flags:
            bare = await latencies(lambda: bare_spawn(str(workspace), flags), args.trips, 3)
        trips: dict[str, list[float]] = {}
        for engine in ("embedded", "opa"):
            state = work / f"state-{engine}"
            state.mkdir()
            config = make_config(state, policy={"engine": engine, "opa_url": opa.url})
            gw_dir = work / engine
            gw_dir.mkdir()
            gw = GatewayProcess(config, gw_dir)
            gw.start()
            try:
                async with aiohttp.ClientSession(
                    headers={"Authorization": f"Bearer {TOKEN}"}
                ) as session:
                    url = gw.url

                    def echo(s: aiohttp.ClientSession = session, u: str = url) -> Awaitable[None]:
                        return gateway_echo(s, u)

                    trips[engine] = await latencies(echo, args.trips, 5)
            finally:
                gw.stop()
    finally:
        opa.stop()
        shutil.rmtree(work, ignore_errors=True)

    e50, e99, o50, o99 = pct(emb, 50), pct(emb, 99), pct(rem, 50), pct(rem, 99)
    print(f"embedded decision      p50 {e50:8.0f} us   p99 {e99:8.0f} us   (target p50 <= 100 us)")
    print(f"OPA (unix socket)      p50 {o50:8.0f} us   p99 {o99:8.0f} us   (target p50 <= 1000 us)")
    print(f"ratio OPA/embedded     p50 {o50 / e50:5.2f}x")
    b50 = statistics.median(bare) * 1000
    print(f"bare bwrap spawn       p50 {b50:7.2f} ms")
    for engine, values in trips.items():
        t50 = statistics.median(values) * 1000
        print(f"REST echo, {engine:8s}    p50 {t50:7.2f} ms   ratio to bare {t50 / b50:5.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=1000, help="decisions per engine")
    parser.add_argument("--trips", type=int, default=150, help="round trips per series")
    asyncio.run(main(parser.parse_args()))
