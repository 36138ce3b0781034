"""Regenerate the gRPC code in this package from ``proto/mcp.proto``.

Run from anywhere: ``.venv/bin/python -m gateway.proto.generate``.
The proto is mapped to the virtual path ``gateway/proto/mcp.proto`` (``-I``
with ``=``), so protoc writes package-absolute imports
(``from gateway.proto import mcp_pb2``) and no post-processing is needed.
:func:`generate` can write to another directory: the drift test regenerates
into a temporary one and compares it with the committed files.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO = ROOT / "proto" / "mcp.proto"
PACKAGE = Path("gateway") / "proto"
GENERATED = ("mcp_pb2.py", "mcp_pb2.pyi", "mcp_pb2_grpc.py", "mcp_pb2_grpc.pyi")


def generate(out_root: Path) -> list[Path]:
    """Write the generated files under ``out_root/gateway/proto``; return them."""
    from grpc_tools import protoc  # type: ignore[import-untyped]  # dev dep: grpcio-tools

    (out_root / PACKAGE).mkdir(parents=True, exist_ok=True)
    include = str(Path(protoc.__file__).parent / "_proto")
    out = str(out_root)
    bindir = Path(sys.executable).parent  # mypy-protobuf's plugins live next to python
    args = [
        "grpc_tools.protoc",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"-I{PACKAGE.as_posix()}={PROTO.parent}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        f"{PACKAGE.as_posix()}/{PROTO.name}",
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed for {PROTO}")
    return [out_root / PACKAGE / name for name in GENERATED]


def main() -> int:
    for path in generate(ROOT):
        print(path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
