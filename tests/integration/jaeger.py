"""Run Jaeger (the OTLP receiver built by ``make jaeger``) for tracing tests and the bench."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import ROOT
from tests.integration.gateway_proc import free_port

JAEGER = ROOT / ".tools" / "bin" / "jaeger"


class Jaeger:
    """Jaeger (v2, the OpenTelemetry Collector based build) with in-memory storage.

    ``otlp_tls`` is the collector's TLS block for the OTLP/gRPC receiver
    (``cert_file``, ``key_file``, ``client_ca_file`` for mTLS).
    """

    def __init__(self, workdir: Path, otlp_tls: dict[str, str] | None = None) -> None:
        assert JAEGER.exists(), "Jaeger is not built: `make jaeger`"
        self.otlp_port = free_port()
        self.query_port = free_port()
        config = {
            "service": {
                "extensions": ["jaeger_storage", "jaeger_query"],
                "pipelines": {
                    "traces": {
                        "receivers": ["otlp"],
                        "processors": ["batch"],
                        "exporters": ["jaeger_storage_exporter"],
                    }
                },
                "telemetry": {"metrics": {"level": "none"}, "logs": {"level": "warn"}},
            },
            "extensions": {
                "jaeger_query": {
                    "storage": {"traces": "mem"},
                    "http": {"endpoint": f"127.0.0.1:{self.query_port}"},
                    "grpc": {"endpoint": f"127.0.0.1:{free_port()}"},
                },
                "jaeger_storage": {"backends": {"mem": {"memory": {"max_traces": 10000}}}},
            },
            "receivers": {
                "otlp": {
                    "protocols": {
                        "grpc": {
                            "endpoint": f"127.0.0.1:{self.otlp_port}",
                            **({"tls": otlp_tls} if otlp_tls else {}),
                        }
                    }
                }
            },
            "processors": {"batch": {"timeout": "100ms"}},
            "exporters": {"jaeger_storage_exporter": {"trace_storage": "mem"}},
        }
        self.config = workdir / "jaeger.yaml"
        self.config.write_text(yaml.safe_dump(config))
        self.log = workdir / "jaeger.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [str(JAEGER), "--config", str(self.config)], stdout=log, stderr=log
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-2000:]
            try:
                self._get("/api/services")
                return
            except OSError:
                time.sleep(0.2)
        raise AssertionError("Jaeger did not start: " + self.log.read_text()[-2000:])

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(30)

    def _get(self, path: str) -> Any:
        url = f"http://127.0.0.1:{self.query_port}{path}"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return json.loads(resp.read())

    def trace(self, trace_id: str, need: set[str], timeout: float = 30.0) -> dict[str, Any]:
        """The trace once it holds a span of every name in ``need``."""
        deadline = time.monotonic() + timeout
        names: set[str] = set()
        while time.monotonic() < deadline:
            try:
                data = self._get(f"/api/traces/{trace_id}")["data"]
            except urllib.error.HTTPError as exc:
                if exc.code != 404:
                    raise
                data = []
            if data:
                names = {s["operationName"] for s in data[0]["spans"]}
                if need <= names:
                    trace: dict[str, Any] = data[0]
                    return trace
            time.sleep(0.25)
        raise AssertionError(f"trace {trace_id}: have {sorted(names)}, need {sorted(need)}")

    def services(self) -> list[str]:
        """Service names Jaeger has received spans from."""
        data: list[str] = self._get("/api/services")["data"] or []
        return data
