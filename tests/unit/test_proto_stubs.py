"""The committed gRPC code is exactly what proto/mcp.proto generates (no drift)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.proto import generate

pytestmark = pytest.mark.unit


def test_generated_code_matches_proto(tmp_path: Path) -> None:
    fresh = generate.generate(tmp_path)
    stale = []
    for path in fresh:
        committed = generate.ROOT / generate.PACKAGE / path.name
        if not committed.exists() or committed.read_bytes() != path.read_bytes():
            stale.append(path.name)
    assert not stale, (
        f"{', '.join(stale)} differ from proto/mcp.proto: "
        "run `.venv/bin/python -m gateway.proto.generate`"
    )


def test_generated_imports_are_package_absolute() -> None:
    from gateway.proto import mcp_pb2, mcp_pb2_grpc

    assert mcp_pb2.DESCRIPTOR.package == "mcp"
    assert mcp_pb2_grpc.McpServiceStub.__module__ == "gateway.proto.mcp_pb2_grpc"
