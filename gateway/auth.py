"""Authentication: bearer API tokens to subjects.

Tokens are configured only as SHA-256 hashes, so neither the config file nor
a memory dump of the table reveals one, and the token text is never logged
(the audit log redacts ``authorization`` fields as a second line of defence).
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from gateway.config import TokenConfig, hash_token
from gateway.errors import Unauthenticated
from gateway.models import Subject


class TokenAuthenticator:
    """Maps ``Authorization: Bearer <token>`` values to subjects."""

    def __init__(self, tokens: Iterable[TokenConfig]) -> None:
        self._by_hash = {
            t.sha256: Subject(id=t.subject, roles=tuple(t.roles), auth="token") for t in tokens
        }

    def authenticate(self, authorization: str | None) -> Subject:
        """Return the subject for an ``Authorization`` header value, or raise."""
        if not authorization:
            raise Unauthenticated("missing bearer token (Authorization: Bearer <token>)")
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("the Authorization header must be 'Bearer <token>'")
        digest = hash_token(token)
        for known, subject in self._by_hash.items():
            # compare_digest keeps the comparison time independent of where
            # the hashes first differ.
            if hmac.compare_digest(known, digest):
                return subject
        raise Unauthenticated("unknown or revoked token")
