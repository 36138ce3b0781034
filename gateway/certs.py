"""A development certificate authority: CA, server and client certificates.

For trying TLS and mTLS out and for tests, not for production PKI.  The
builders are pure (keys and certificates in, objects out); :func:`init_ca`
and :func:`issue` write PEM files, private keys with mode 0600.

Layout of a directory managed by ``mcp-gateway certs``::

    ca.pem ca-key.pem                     # init
    server-<name>.pem server-<name>-key.pem   # issue --server --name <name>
    client-<name>.pem client-<name>-key.pem   # issue --client --name <name>
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 5 * 365
SERVER_DAYS = 397
CLIENT_DAYS = 90
# Back-date notBefore a little so freshly issued certs survive clock skew.
_SKEW = datetime.timedelta(minutes=5)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclasses.dataclass(frozen=True)
class Issued:
    """A certificate and its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _validity(
    days: int, not_before: datetime.datetime | None, not_after: datetime.datetime | None
) -> tuple[datetime.datetime, datetime.datetime]:
    start = not_before if not_before is not None else _now() - _SKEW
    end = not_after if not_after is not None else start + _SKEW + datetime.timedelta(days=days)
    if end <= start:
        raise ValueError("not_after must be later than not_before")
    return start, end


def build_ca(
    common_name: str = "MCP Gateway development CA",
    *,
    key: ec.EllipticCurvePrivateKey | None = None,
    days: int = CA_DAYS,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> Issued:
    """A self-signed CA: CA:true, pathlen 0, keyCertSign + cRLSign."""
    key = key or new_key()
    start, end = _validity(days, not_before, not_after)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert, key)


def _leaf(
    ca: Issued,
    common_name: str,
    sans: Sequence[x509.GeneralName],
    eku: x509.ObjectIdentifier,
    start: datetime.datetime,
    end: datetime.datetime,
    key: ec.EllipticCurvePrivateKey | None,
) -> Issued:
    key = key or new_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


def build_server(
    ca: Issued,
    dns_names: Sequence[str] = ("localhost",),
    ips: Sequence[str | IPAddress] = ("127.0.0.1",),
    *,
    key: ec.EllipticCurvePrivateKey | None = None,
    days: int = SERVER_DAYS,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> Issued:
    """A serverAuth certificate for ``dns_names`` and ``ips`` (SANs)."""
    if not dns_names and not ips:
        raise ValueError("a server certificate needs at least one DNS name or IP address")
    sans: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    common_name = dns_names[0] if dns_names else str(ips[0])
    start, end = _validity(days, not_before, not_after)
    return _leaf(ca, common_name, sans, ExtendedKeyUsageOID.SERVER_AUTH, start, end, key)


def build_client(
    ca: Issued,
    subject_id: str,
    *,
    dns_names: Sequence[str] = (),
    uris: Sequence[str] = (),
    key: ec.EllipticCurvePrivateKey | None = None,
    days: int = CLIENT_DAYS,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> Issued:
    """A clientAuth certificate with CN = ``subject_id`` (optional DNS/URI SANs)."""
    sans: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
    sans += [x509.UniformResourceIdentifier(uri) for uri in uris]
    start, end = _validity(days, not_before, not_after)
    return _leaf(ca, subject_id, sans, ExtendedKeyUsageOID.CLIENT_AUTH, start, end, key)


# -- files ---------------------------------------------------------------------------


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` with ``mode`` from the first byte on (no world-readable window)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(tmp, mode)  # umask may have narrowed it further; be exact
    tmp.replace(path)


def write_pair(issued: Issued, cert_path: Path, key_path: Path) -> None:
    """The certificate (0644) and its key (0600) as PEM."""
    _write(key_path, key_pem(issued.key), 0o600)
    _write(cert_path, cert_pem(issued.cert), 0o644)


def load_pair(cert_path: Path, key_path: Path) -> Issued:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TypeError(f"{key_path}: not an EC private key")
    return Issued(cert, key)


def ca_paths(directory: Path) -> tuple[Path, Path]:
    return directory / "ca.pem", directory / "ca-key.pem"


def leaf_paths(directory: Path, kind: str, name: str) -> tuple[Path, Path]:
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
    return directory / f"{kind}-{safe}.pem", directory / f"{kind}-{safe}-key.pem"


def init_ca(directory: Path, *, force: bool = False) -> tuple[Path, Path]:
    """Create ``ca.pem``/``ca-key.pem`` in ``directory``; refuses to overwrite unless forced."""
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = ca_paths(directory)
    if not force and (cert_path.exists() or key_path.exists()):
        raise FileExistsError(f"{cert_path} already exists (a new CA invalidates every cert)")
    write_pair(build_ca(), cert_path, key_path)
    return cert_path, key_path


def issue(
    directory: Path,
    kind: str,
    name: str,
    *,
    dns_names: Sequence[str] = (),
    ips: Sequence[str] = (),
    days: int | None = None,
) -> tuple[Path, Path]:
    """Issue a ``server`` or ``client`` cert signed by the CA in ``directory``."""
    ca = load_pair(*ca_paths(directory))
    if kind == "server":
        names = [name, *(d for d in dns_names if d != name)] if name else list(dns_names)
        issued = build_server(ca, names, ips, days=days or SERVER_DAYS)
    elif kind == "client":
        issued = build_client(ca, name, dns_names=dns_names, days=days or CLIENT_DAYS)
    else:
        raise ValueError(f"kind must be 'server' or 'client', not {kind!r}")
    paths = leaf_paths(directory, kind, name or (ips[0] if ips else "server"))
    write_pair(issued, *paths)
    return paths
