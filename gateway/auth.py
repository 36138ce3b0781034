"""Authentication: bearer API tokens and verified client certificates to subjects.

Precedence (the same for REST and gRPC): when the request carries an
``Authorization`` value, the token alone decides (a bad token is refused even
over a good client certificate).  Otherwise a client certificate that the TLS
layer verified against ``tls.client_ca_file`` is mapped by
:func:`subject_for_certificate` through ``tls.mtls_subjects``; a verified
certificate that maps to no subject is refused.  Neither: refused.

With ``auth.oauth`` configured, a bearer value that is no configured token
and has the shape of a JWT is verified as an access token of that
authorization server (:mod:`gateway.oauth`); static tokens keep working
alongside.  A refused token raises :class:`~gateway.errors.InvalidToken`
naming the reason; a missing one plain :class:`~gateway.errors.Unauthenticated`.

Tokens are configured only as SHA-256 hashes, so neither the config file nor
a memory dump of the table reveals one, and the token text is never logged
(the audit log redacts ``authorization`` fields as a second line of defence).
"""

from __future__ import annotations

import dataclasses
import hmac
from collections.abc import Iterable, Sequence
from typing import Literal

from cryptography import x509
from cryptography.x509.oid import NameOID

from gateway.config import Config, MtlsSubjectConfig, TokenConfig, hash_token
from gateway.errors import InvalidToken, Unauthenticated
from gateway.models import Subject
from gateway.oauth import AccessTokenVerifier, challenge, looks_like_jwt, metadata_url

ClientAuth = Literal["off", "optional", "required"]


@dataclasses.dataclass(frozen=True, slots=True)
class PeerIdentity:
    """The names of a verified client certificate that mappings may match."""

    common_names: tuple[str, ...] = ()
    sans: tuple[str, ...] = ()  # DNS names and URIs

    @classmethod
    def from_certificate(cls, cert: x509.Certificate) -> PeerIdentity:
        cns = tuple(
            str(attr.value) for attr in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        )
        sans: list[str] = []
        try:
            ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            pass
        else:
            sans += ext.get_values_for_type(x509.DNSName)
            sans += ext.get_values_for_type(x509.UniformResourceIdentifier)
        return cls(cns, tuple(sans))

    @classmethod
    def from_der(cls, der: bytes) -> PeerIdentity:
        return cls.from_certificate(x509.load_der_x509_certificate(der))

    @classmethod
    def from_pem(cls, pem: bytes) -> PeerIdentity:
        return cls.from_certificate(x509.load_pem_x509_certificate(pem))

    def describe(self) -> str:
        cn = ",".join(self.common_names) or "-"
        return f"CN={cn} SANs=[{', '.join(self.sans)}]"


def subject_for_certificate(peer: PeerIdentity, rules: Sequence[MtlsSubjectConfig]) -> Subject:
    """The subject of a verified client certificate: the first rule that matches (pure).

    A ``cn`` rule matches the certificate's common name exactly; a ``san``
    rule matches any of its DNS or URI subject alternative names exactly.
    """
    for rule in rules:
        if (rule.cn is not None and rule.cn in peer.common_names) or (
            rule.san is not None and rule.san in peer.sans
        ):
            return Subject(id=rule.subject, roles=tuple(rule.roles), auth="mtls")
    raise Unauthenticated(
        f"client certificate {peer.describe()} maps to no subject (tls.mtls_subjects)"
    )


class TokenAuthenticator:
    """Maps ``Authorization: Bearer <token>`` values, or client certificates, to subjects.

    ``client_auth`` says whether the listeners verify client certificates
    ("off": no ``tls.client_ca_file``); a peer identity is only consulted when
    they do, so an unverified certificate can never authenticate.
    """

    def __init__(
        self,
        tokens: Iterable[TokenConfig],
        mtls_subjects: Iterable[MtlsSubjectConfig] = (),
        client_auth: ClientAuth = "off",
        oauth: AccessTokenVerifier | None = None,
    ) -> None:
        self._by_hash = {
            t.sha256: Subject(id=t.subject, roles=tuple(t.roles), auth="token") for t in tokens
        }
        self._mtls = tuple(mtls_subjects)
        self.client_auth: ClientAuth = client_auth
        self.oauth = oauth
        self.resource_metadata: str | None = None
        if oauth is not None:
            self.resource_metadata = oauth.settings.resource_metadata_url or metadata_url(
                oauth.settings.audience
            )

    @classmethod
    def from_config(cls, config: Config) -> TokenAuthenticator:
        tls = config.tls
        client_auth: ClientAuth = (
            tls.client_auth if tls.enabled and tls.client_ca_file is not None else "off"
        )
        oauth = AccessTokenVerifier(config.auth.oauth) if config.auth.oauth is not None else None
        return cls(config.auth.tokens, tls.mtls_subjects, client_auth, oauth)

    def challenge(self, error: Unauthenticated) -> str:
        """The ``WWW-Authenticate`` value answering ``error`` (RFC 6750, RFC 9728)."""
        if isinstance(error, InvalidToken):
            return challenge(self.resource_metadata, "invalid_token", error.message)
        return challenge(self.resource_metadata)

    def authenticate(self, authorization: str | None, peer: PeerIdentity | None = None) -> Subject:
        """Return the subject for an ``Authorization`` value or a verified peer, or raise."""
        if not authorization and peer is not None and self.client_auth != "off":
            return subject_for_certificate(peer, self._mtls)
        if not authorization:
            raise Unauthenticated("missing bearer token (Authorization: Bearer <token>)")
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise InvalidToken("the Authorization header must be 'Bearer <token>'")
        digest = hash_token(token)
        for known, subject in self._by_hash.items():
            # compare_digest keeps the comparison time independent of where
            # the hashes first differ.
            if hmac.compare_digest(known, digest):
                return subject
        if self.oauth is not None and looks_like_jwt(token):
            return self.oauth.verify(token)
        raise InvalidToken("unknown or revoked token")
