"""One lab for the whole lab suite: the appliance tests first, then HA (which ends it)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from tests.lab.lab import TIMINGS, Lab


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    lab = Lab(size=2)
    started = time.monotonic()
    try:
        lab.up()
        TIMINGS["boot_s"] = time.monotonic() - started
        started = time.monotonic()
        result = lab.playbook("site.yml")
        TIMINGS["converge_s"] = time.monotonic() - started
        assert result.returncode == 0, (
            result.stdout[-4000:] + result.stderr[-2000:] + lab.diagnostics()
        )
        yield lab
    finally:
        lab.down()
        print(f"\nlab timings: {json.dumps({k: round(v, 1) for k, v in TIMINGS.items()})}")
