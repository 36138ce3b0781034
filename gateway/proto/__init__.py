"""Generated gRPC code for ``proto/mcp.proto`` (see :mod:`gateway.proto.generate`)."""
