"""A probe loop for failover measurements, run inside the lab's client namespace.

``python -m tests.lab.probe URL --token T --ca CA`` starts one authenticated
request (a new TLS connection each time, each in its own thread, so a probe
hanging on a dead address does not slow the rate) every ``--interval``
seconds until SIGTERM or ``--max-seconds``, then prints one JSON object: the
probes as ``[monotonic start, ok]`` pairs, in start order.  CLOCK_MONOTONIC
is shared by every process on the machine, so the test compares these times
with its own.
"""

from __future__ import annotations

import argparse
import http.client
import json
import signal
import ssl
import sys
import threading
import time
from urllib.parse import urlsplit


def probe_once(url: str, token: str, context: ssl.SSLContext, timeout: float) -> bool:
    parts = urlsplit(url)
    conn = http.client.HTTPSConnection(
        parts.hostname or "", parts.port or 443, timeout=timeout, context=context
    )
    try:
        conn.request("GET", parts.path or "/", headers={"Authorization": f"Bearer {token}"})
        response = conn.getresponse()
        response.read()
        return response.status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def lab_client_parser(doc: str | None) -> argparse.ArgumentParser:
    """The arguments every lab client takes: the URL, the API token and the lab CA."""
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("url")
    parser.add_argument("--token", required=True)
    parser.add_argument("--ca", required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = lab_client_parser(__doc__)
    parser.add_argument("--interval", type=float, default=0.04)
    parser.add_argument("--timeout", type=float, default=0.3)
    parser.add_argument("--max-seconds", type=float, default=90.0)
    args = parser.parse_args(argv)
    context = ssl.create_default_context(cafile=args.ca)
    stop = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    probes: list[list[float | bool]] = []
    threads: list[threading.Thread] = []

    def one(slot: list[float | bool]) -> None:
        slot[1] = probe_once(args.url, args.token, context, args.timeout)

    deadline = time.monotonic() + args.max_seconds
    next_at = time.monotonic()
    while not stop and time.monotonic() < deadline:
        slot: list[float | bool] = [time.monotonic(), False]
        probes.append(slot)
        thread = threading.Thread(target=one, args=(slot,), daemon=True)
        thread.start()
        threads.append(thread)
        threads = [t for t in threads if t.is_alive()]
        next_at += args.interval
        time.sleep(max(0.0, next_at - time.monotonic()))
    for thread in threads:
        thread.join(args.timeout + 5)
    json.dump({"probes": probes}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
