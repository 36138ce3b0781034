"""A client-library request loop for the rolling-upgrade test, run in the lab's client namespace.

``python -m tests.lab.client_loop URL --token T --ca CA`` writes and lists
workspace files through :class:`gateway.client.Client` (which retries
what a failover interrupts) until SIGTERM or ``--max-seconds``, then prints
one JSON object: requests, failures (with their messages) and retries.
"""

from __future__ import annotations

import json
import signal
import sys
import time

from gateway.client import Client
from gateway.errors import McpError
from tests.lab.probe import lab_client_parser


def main(argv: list[str] | None = None) -> int:
    parser = lab_client_parser(__doc__)
    parser.add_argument("--max-seconds", type=float, default=600.0)
    args = parser.parse_args(argv)
    stop = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    requests = 0
    failures: list[str] = []
    deadline = time.monotonic() + args.max_seconds
    with Client(args.url, args.token, ca_file=args.ca, retries=10, timeout_s=10.0) as client:
        i = 0
        while not stop and time.monotonic() < deadline:
            data = f"request {i}\n".encode()
            # Workspaces are per node (docs/ha.md): only requests that do not
            # depend on what an earlier request left on one node.
            path = f"loop-{i % 10}.txt"
            for step in ("write", "list"):
                requests += 1
                try:
                    if step == "write":
                        client.write_file(path, data)
                    else:
                        client.list_files("")
                except McpError as exc:
                    failures.append(f"{step}: {type(exc).__name__}: {exc.message}")
            i += 1
            time.sleep(0.02)
        retried = client.retried
    json.dump({"requests": requests, "failures": failures, "retries": retried}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
