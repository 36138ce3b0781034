"""``python -m tests.lab up|down``: a lab for hands-on work (make lab-up / make lab-down).

``up`` builds (or reuses) the image, boots a pair and a client namespace,
converges it with playbooks/site.yml, writes inventories/lab/hosts.yml and
.tools/lab/current.json (lab id, addresses, the lab API token), and returns
leaving the machines running.  ``down`` tears that lab down.
"""

from __future__ import annotations

import json
import sys
import time

from tests.lab.lab import LAB_DIR, Lab, teardown

STATE = LAB_DIR / "current.json"


def main(argv: list[str]) -> int:
    if argv[:1] == ["up"]:
        if STATE.exists():
            print(f"a lab is up already ({STATE}); run `make lab-down` first", file=sys.stderr)
            return 1
        lab = Lab(size=2)
        started = time.monotonic()
        try:
            lab.up()
            booted = time.monotonic()
            result = lab.playbook("site.yml")
        except BaseException:
            lab.down()
            raise
        STATE.write_text(
            json.dumps(
                {
                    "lab_id": lab.lab_id,
                    "client_netns": lab.client,
                    "machines": {m.name: m.address for m in lab.machines},
                    "api_token": lab.api_token,
                }
            )
        )
        print(result.stdout[-3000:])
        print(
            f"lab {lab.lab_id}: booted in {booted - started:.0f}s, converged in "
            f"{time.monotonic() - booted:.0f}s (rc {result.returncode}); "
            f"client: ip netns exec {lab.client} ...; state in {STATE}"
        )
        return result.returncode
    if argv[:1] == ["down"]:
        if not STATE.exists():
            print("no lab is up")
            return 0
        teardown(json.loads(STATE.read_text())["lab_id"])
        STATE.unlink()
        return 0
    print("usage: python -m tests.lab up|down", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
