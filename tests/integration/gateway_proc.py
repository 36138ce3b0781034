"""Run ``mcp-gateway serve`` as a real child process for crash and bench tests."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from gateway.config import Config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class GatewayProcess:
    """A gateway process serving ``config`` on a fixed loopback port."""

    def __init__(
        self, config: Config, workdir: Path, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        # With tls.enabled the health poll speaks https through ``ssl_context``.
        self.scheme = "https" if config.tls.enabled else "http"
        self.ssl_context = ssl_context
        self.port = config.server.port or free_port()
        self.grpc_port = config.grpc.port or free_port()
        doc: dict[str, Any] = config.model_dump(mode="json")
        doc["server"]["port"] = self.port
        doc["grpc"]["port"] = self.grpc_port
        self.config_path = workdir / "gateway.yaml"
        self.config_path.write_text(yaml.safe_dump(doc))
        self.log_path = workdir / "gateway.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0, env: Mapping[str, str] | None = None) -> None:
        """Start and wait until /health answers; ``env`` adds to the inherited environment."""
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("MCP_GATEWAY__")},
            **(env or {}),
        }
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "serve", "--config", str(self.config_path)],
                stdout=log,
                stderr=log,
                env=env,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited: {self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(  # noqa: S310
                    self.url + "/health", timeout=1, context=self.ssl_context
                ):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("gateway did not become healthy in time")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)
