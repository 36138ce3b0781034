"""The development CA builders and the client-certificate to subject mapping."""

from __future__ import annotations

import datetime
import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway import certs
from gateway.auth import PeerIdentity, TokenAuthenticator, subject_for_certificate
from gateway.config import MtlsSubjectConfig, TokenConfig, hash_token
from gateway.errors import Unauthenticated

pytestmark = pytest.mark.unit

DAY = datetime.timedelta(days=1)


@pytest.fixture(scope="module")
def ca() -> certs.Issued:
    return certs.build_ca()


def _lifetime(cert: x509.Certificate) -> datetime.timedelta:
    return cert.not_valid_after_utc - cert.not_valid_before_utc


def test_ca_is_a_p256_ca_with_pathlen_0(ca: certs.Issued) -> None:
    """CA:true pathlen 0, keyCertSign + cRLSign only, self-signed, about 5 years."""
    cert = ca.cert
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert isinstance(ca.key.curve, ec.SECP256R1)
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical
    assert (basic.value.ca, basic.value.path_length) == (True, 0)
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert (usage.key_cert_sign, usage.crl_sign, usage.digital_signature) == (True, True, False)
    assert cert.issuer == cert.subject
    cert.verify_directly_issued_by(cert)
    assert 5 * 365 * DAY <= _lifetime(cert) <= 5 * 365 * DAY + DAY


def test_server_cert_sans_eku_validity(ca: certs.Issued) -> None:
    """DNS and IP SANs as given, serverAuth only, 397 days, signed by the CA."""
    server = certs.build_server(ca, ["localhost", "gw.example"], ["127.0.0.1", "::1"]).cert
    server.verify_directly_issued_by(ca.cert)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "gw.example"]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert 397 * DAY <= _lifetime(server) <= 397 * DAY + DAY


def test_client_cert_cn_eku_validity(ca: certs.Issued) -> None:
    """CN = subject id, clientAuth only, 90 days by default."""
    client = certs.build_client(ca, "alice").cert
    client.verify_directly_issued_by(ca.cert)
    assert PeerIdentity.from_certificate(client) == PeerIdentity(("alice",), ())
    eku = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert 90 * DAY <= _lifetime(client) <= 90 * DAY + DAY


def test_validity_can_be_set_in_the_past(ca: certs.Issued) -> None:
    """Tests can make an already-expired certificate; an empty window is refused."""
    now = datetime.datetime.now(datetime.UTC)
    expired = certs.build_client(ca, "alice", not_before=now - 10 * DAY, not_after=now - DAY)
    assert expired.cert.not_valid_after_utc < now
    with pytest.raises(ValueError, match="not_after"):
        certs.build_client(ca, "alice", not_before=now, not_after=now - DAY)


def test_files_and_key_permissions(tmp_path: Path) -> None:
    """init + issue write PEM pairs; keys are 0600; init refuses to replace a CA."""
    ca_cert, ca_key = certs.init_ca(tmp_path / "pki")
    server_cert, server_key = certs.issue(
        tmp_path / "pki", "server", "localhost", ips=["127.0.0.1"]
    )
    client_cert, client_key = certs.issue(tmp_path / "pki", "client", "alice")
    assert client_cert.name == "client-alice.pem"
    for key in (ca_key, server_key, client_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    for cert in (ca_cert, server_cert, client_cert):
        assert stat.S_IMODE(cert.stat().st_mode) == 0o644
    loaded = certs.load_pair(server_cert, server_key)
    loaded.cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_cert.read_bytes()))
    with pytest.raises(FileExistsError):
        certs.init_ca(tmp_path / "pki")


RULES = (
    MtlsSubjectConfig(cn="alice", subject="alice", roles=("developer",)),
    MtlsSubjectConfig(san="spiffe://example.org/agent", subject="agent", roles=("agent",)),
    MtlsSubjectConfig(san="ci.example.org", subject="ci", roles=("readonly",)),
)


@pytest.mark.parametrize(
    ("peer", "expected"),
    [
        (PeerIdentity(("alice",)), "alice"),
        (PeerIdentity(("x",), ("spiffe://example.org/agent",)), "agent"),
        (PeerIdentity((), ("other.example", "ci.example.org")), "ci"),
        # the first matching rule wins
        (PeerIdentity(("alice",), ("ci.example.org",)), "alice"),
    ],
)
def test_mapping_cn_and_san(peer: PeerIdentity, expected: str) -> None:
    subject = subject_for_certificate(peer, RULES)
    assert subject.id == expected
    assert subject.auth == "mtls"
    assert subject.roles == next(r.roles for r in RULES if r.subject == expected)


def test_mapping_is_exact_and_unmapped_is_unauthenticated() -> None:
    """No prefix/case games; a CN never matches a san rule nor the reverse."""
    for peer in (
        PeerIdentity(("Alice",)),
        PeerIdentity(("alice2",)),
        PeerIdentity(("spiffe://example.org/agent",)),
        PeerIdentity((), ("alice",)),
        PeerIdentity(),
    ):
        with pytest.raises(Unauthenticated, match=r"maps to no subject \(tls.mtls_subjects\)"):
            subject_for_certificate(peer, RULES)


def test_mapping_reads_dns_and_uri_sans(ca: certs.Issued) -> None:
    cert = certs.build_client(
        ca, "agent-1", dns_names=["ci.example.org"], uris=["spiffe://example.org/agent"]
    ).cert
    peer = PeerIdentity.from_certificate(cert)
    assert peer.sans == ("ci.example.org", "spiffe://example.org/agent")
    assert subject_for_certificate(peer, RULES).id == "agent"


def test_token_wins_over_certificate() -> None:
    """With an Authorization value the token decides, good or bad; else the cert."""
    tokens = [TokenConfig(subject="bob", roles=("developer",), sha256=hash_token("bob-token"))]
    auth = TokenAuthenticator(tokens, RULES, client_auth="required")
    alice = PeerIdentity(("alice",))
    assert auth.authenticate("Bearer bob-token", alice).id == "bob"
    assert auth.authenticate("Bearer bob-token", alice).auth == "token"
    with pytest.raises(Unauthenticated, match="unknown or revoked token"):
        auth.authenticate("Bearer wrong", alice)
    assert auth.authenticate(None, alice).auth == "mtls"
    with pytest.raises(Unauthenticated, match="missing bearer token"):
        auth.authenticate(None, None)
    # Listeners that do not verify client certificates never consult a peer.
    off = TokenAuthenticator(tokens, RULES, client_auth="off")
    with pytest.raises(Unauthenticated, match="missing bearer token"):
        off.authenticate(None, alice)
