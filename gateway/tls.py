"""TLS for the listeners: an ``ssl.SSLContext`` for REST, credentials for gRPC.

Certificates and keys are read once, when the listeners start: replacing the
files takes effect at the next restart (SIGHUP reloads only the policies).
"""

from __future__ import annotations

import ssl

import grpc

from gateway.config import TlsConfig


def _required(tls: TlsConfig) -> tuple[str, str]:
    if tls.cert_file is None or tls.key_file is None:
        raise ValueError("tls.cert_file and tls.key_file are required")
    return str(tls.cert_file), str(tls.key_file)


def rest_ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    """Server context: TLS 1.2+, and client verification per ``tls.client_auth``."""
    cert, key = _required(tls)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    if tls.client_ca_file is not None:
        context.load_verify_locations(cafile=str(tls.client_ca_file))
        context.verify_mode = (
            ssl.CERT_REQUIRED if tls.client_auth == "required" else ssl.CERT_OPTIONAL
        )
    return context


def grpc_server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    """Server credentials; client certificates are requested and verified only when
    ``tls.client_auth`` is "required" (grpcio cannot ask for an optional one)."""
    cert, key = _required(tls)
    with open(cert, "rb") as f:
        cert_pem = f.read()
    with open(key, "rb") as f:
        key_pem = f.read()
    required = tls.client_ca_file is not None and tls.client_auth == "required"
    root = None
    if required and tls.client_ca_file is not None:
        root = tls.client_ca_file.read_bytes()
    return grpc.ssl_server_credentials(
        [(key_pem, cert_pem)], root_certificates=root, require_client_auth=required
    )
