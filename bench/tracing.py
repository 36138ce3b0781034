"""Cost of tracing on the ``echo`` round trip: tracing on (exporting to a real Jaeger) vs off.

Two gateway processes from one config, one with ``tracing.enabled`` and
OTLP/gRPC export to a Jaeger started here, the other with tracing off; the
two series are interleaved in rounds so machine noise hits both alike.  Each
request sends a sampled ``traceparent`` so both gateways see the same input
(the untraced one still propagates the trace id into its audit records).
Prints p50/p95 of each, their ratio (target: under 1.10x) and the bare bwrap
spawn for scale.

Run with ``make bench`` (``python -m bench.tracing --help`` for knobs).
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import tempfile
from pathlib import Path

import aiohttp

from bench.roundtrip import bare_spawn, gateway_flags, latencies, pct
from tests.conftest import USERS, make_config
from tests.integration.gateway_proc import GatewayProcess
from tests.integration.jaeger import Jaeger

TOKEN = USERS["alice"][0]


async def traced_echo(session: aiohttp.ClientSession, url: str) -> None:
    headers = {"traceparent": f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"}
    async with session.post(
        url + "/v1/commands",
        json={"command": "echo", "args": ["hello"], "wait": True},
        headers=headers,
    ) as resp:
        body = await resp.json()
        assert resp.status == 200, body
        assert body["stdout"] == "hello\n", body


def start_gateway(tmp: Path, name: str, tracing: dict[str, object]) -> GatewayProcess:
    workdir = tmp / name
    (workdir / "state").mkdir(parents=True)
    gw = GatewayProcess(make_config(workdir / "state", tracing=tracing), workdir)
    gw.start()
    return gw


async def main(args: argparse.Namespace) -> None:
    with (
        tempfile.TemporaryDirectory(prefix="mcp-bench-tracing-") as tmp_name,
        gateway_flags() as flags,
    ):
        tmp = Path(tmp_name)
        jaeger = Jaeger(tmp)
        jaeger.start()
        off = start_gateway(tmp, "off", {"enabled": False})
        on = start_gateway(
            tmp,
            "on",
            {"enabled": True, "endpoint": f"http://127.0.0.1:{jaeger.otlp_port}"},
        )
        workspace = tmp / "ws"
        workspace.mkdir()
        off_lat: list[float] = []
        on_lat: list[float] = []
        bare_lat: list[float] = []
        try:
            async with aiohttp.ClientSession(
                headers={"Authorization": f"Bearer {TOKEN}"}
            ) as session:
                per = args.n // args.rounds
                for _ in range(args.rounds):
                    bare_lat += await latencies(lambda: bare_spawn(str(workspace), flags), per, 3)
                    off_lat += await latencies(lambda: traced_echo(session, off.url), per, 3)
                    on_lat += await latencies(lambda: traced_echo(session, on.url), per, 3)
        finally:
            on.stop()
            off.stop()
            services = jaeger.services()
            jaeger.stop()
    assert "mcp-gateway" in services, f"no spans reached Jaeger: {services}"
    b50 = pct(bare_lat, 50)
    f50, f95 = pct(off_lat, 50), pct(off_lat, 95)
    t50, t95 = pct(on_lat, 50), pct(on_lat, 95)
    print(f"bare bwrap spawn        p50 {b50:7.2f} ms   (n={len(bare_lat)})")
    print(f"REST echo, tracing off  p50 {f50:7.2f} ms   p95 {f95:7.2f} ms   (n={len(off_lat)})")
    print(f"REST echo, tracing on   p50 {t50:7.2f} ms   p95 {t95:7.2f} ms   (n={len(on_lat)})")
    print(
        f"ratio on/off            p50 {t50 / f50:5.2f}x      p95 {t95 / f95:5.2f}x"
        "   (target p50 < 1.10x)"
    )
    print(f"ratio to bare spawn     off {f50 / b50:5.2f}x      on {t50 / b50:5.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=200, help="samples per series")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds")
    asyncio.run(main(parser.parse_args()))
