"""MCP Security Gateway: policy-checked, audited, sandboxed command and file access."""

__version__ = "0.1.0"
