"""OAuth 2.0 resource-server side: JWT access tokens, JWKS, protected resource metadata.

The gateway is a resource server in the sense of the MCP authorization
specification: it never issues tokens, it verifies the JWT access tokens an
authorization server issued for it.  A token is accepted only when

* its header names an algorithm from the configured asymmetric list (``none``
  and the HMAC family are never accepted: with a public JWKS they would let
  anyone sign, RFC 8725 section 3.1);
* its signature verifies with the JWKS key its ``kid`` names (a JWKS of one
  key also serves tokens without ``kid``);
* ``iss`` equals the configured issuer and ``aud`` contains the configured
  audience, the gateway's resource URL (audience binding, RFC 8707 and
  RFC 9068 section 4): a token minted for another service is refused;
* ``exp`` is present and in the future and ``nbf``, when present, is past
  (both with ``leeway_s`` of clock skew);
* ``sub`` is a usable subject id.

The subject is ``subject_prefix + sub``; roles come from ``roles_claim``
(a list of strings, or one space-separated string such as ``scope``),
optionally translated through ``role_map``.

Everything here is pure apart from reading the JWKS file; the HTTP edges
(metadata route, ``WWW-Authenticate``) live in :mod:`gateway.rest`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import jwt
from jwt import PyJWK

from gateway.errors import InvalidArgument, InvalidToken
from gateway.models import Subject
from gateway.workspace import validate_subject_id

if TYPE_CHECKING:
    from gateway.config import OAuthConfig

#: RFC 9728 section 3: the well-known path prefix of the metadata document.
WELL_KNOWN = "/.well-known/oauth-protected-resource"

#: Signature algorithms a JWKS of public keys can verify.
ASYMMETRIC_ALGORITHMS = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
)

# JWK members that only a private key has (RFC 7518 section 6).
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})


def parse_jwks(doc: object) -> tuple[dict[str, Any], ...]:
    """The keys of a JWKS document, each checked to be a usable public signing key (pure).

    Raises :class:`ValueError` naming the first bad key (also for a wrong
    type: pydantic turns ValueError, not TypeError, into a config error).
    """
    if not isinstance(doc, Mapping) or not isinstance(doc.get("keys"), list):
        raise ValueError("must be a JWKS: an object with a 'keys' list")  # noqa: TRY004
    keys: list[dict[str, Any]] = []
    kids: set[str] = set()
    for index, key in enumerate(doc["keys"]):
        where = f"key {index}"
        if not isinstance(key, Mapping):
            raise ValueError(f"{where}: must be an object")  # noqa: TRY004
        key = dict(key)
        if isinstance(key.get("kid"), str):
            where = f"key {key['kid']!r}"
            if key["kid"] in kids:
                raise ValueError(f"{where}: duplicate kid")
            kids.add(key["kid"])
        if _PRIVATE_MEMBERS & key.keys():
            raise ValueError(f"{where}: holds private or symmetric key material")
        if key.get("use", "sig") != "sig":
            raise ValueError(f"{where}: 'use' is {key.get('use')!r}, not 'sig'")
        if "alg" in key and key["alg"] not in ASYMMETRIC_ALGORITHMS:
            raise ValueError(f"{where}: algorithm {key['alg']!r} is not supported")
        try:
            PyJWK(key)
        except jwt.PyJWTError as exc:
            raise ValueError(f"{where}: not a usable public key ({exc})") from exc
        keys.append(key)
    if not keys:
        raise ValueError("holds no keys")
    return tuple(keys)


def read_jwks(path: Path) -> tuple[dict[str, Any], ...]:
    """Read and check a JWKS file; :class:`ValueError` says what is wrong."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{path} is not JSON: {exc}") from exc
    return parse_jwks(doc)


def metadata_url(resource: str) -> str:
    """Where RFC 9728 puts the metadata of ``resource``: the well-known prefix before its path."""
    parts = urlsplit(resource)
    return urlunsplit((parts.scheme, parts.netloc, WELL_KNOWN + parts.path.rstrip("/"), "", ""))


def metadata_paths(resource: str) -> tuple[str, ...]:
    """The paths the gateway serves the metadata document on."""
    path = urlsplit(metadata_url(resource)).path
    return tuple(dict.fromkeys((WELL_KNOWN, WELL_KNOWN + "/mcp", path)))


def metadata_document(settings: OAuthConfig) -> dict[str, Any]:
    """The OAuth 2.0 Protected Resource Metadata document (RFC 9728 section 2)."""
    doc: dict[str, Any] = {
        "resource": settings.audience,
        "authorization_servers": list(settings.authorization_servers or (settings.issuer,)),
        "bearer_methods_supported": ["header"],
        "resource_signing_alg_values_supported": list(settings.algorithms),
    }
    if settings.scopes_supported:
        doc["scopes_supported"] = list(settings.scopes_supported)
    if settings.resource_name:
        doc["resource_name"] = settings.resource_name
    return doc


_UNSAFE = re.compile(r"[^\x20\x21\x23-\x5b\x5d-\x7e]")


def challenge(
    resource_metadata: str | None, error: str | None = None, description: str | None = None
) -> str:
    """A ``WWW-Authenticate`` Bearer challenge (RFC 6750 section 3, RFC 9728 section 5.1).

    The description is reduced to the characters RFC 6750 allows in it.
    """
    params = []
    if resource_metadata is not None:
        params.append(f'resource_metadata="{resource_metadata}"')
    else:
        params.append('realm="mcp-gateway"')
    if error is not None:
        params.append(f'error="{error}"')
        if description:
            params.append(f'error_description="{_UNSAFE.sub("?", description)[:300]}"')
    return "Bearer " + ", ".join(params)


def looks_like_jwt(token: str) -> bool:
    """A compact JWS has three dot-separated parts."""
    return token.count(".") == 2


def roles_from_claim(value: object, role_map: Mapping[str, Sequence[str]]) -> tuple[str, ...]:
    """Roles from a claim: a list of strings or a space-separated string (pure).

    With a ``role_map``, each value gives the roles it maps to and unmapped
    values give none; without one, the values are the roles.
    """
    if isinstance(value, str):
        values = value.split()
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        values = list(value)
    else:
        return ()
    if role_map:
        values = [role for v in values for role in role_map.get(v, ())]
    return tuple(dict.fromkeys(values))


class AccessTokenVerifier:
    """Verifies JWT access tokens of one authorization server and maps them to subjects.

    ``keys`` returns the current JWKS keys; with a ``jwks_file`` it is read
    again when a token names a kid the loaded set lacks and the file changed,
    so rotating a signing key needs no restart.
    """

    def __init__(
        self,
        settings: OAuthConfig,
        keys: Callable[[], tuple[dict[str, Any], ...]] | None = None,
    ) -> None:
        self.settings = settings
        self._load = keys or self._keys_from_settings
        self._mtime: float | None = None
        self._keys = self._load()

    def _keys_from_settings(self) -> tuple[dict[str, Any], ...]:
        if self.settings.jwks is not None:
            return parse_jwks(self.settings.jwks)
        path = self.settings.jwks_file
        if path is None:
            raise ValueError("no JWKS configured")
        try:
            self._mtime = os.stat(path).st_mtime
        except OSError:
            self._mtime = None
        return read_jwks(path)

    def _refresh(self) -> None:
        path = self.settings.jwks_file
        if path is None:
            return
        try:
            mtime = os.stat(path).st_mtime
        except OSError:
            return
        if mtime == self._mtime:
            return
        try:
            self._keys = self._load()
        except ValueError:
            self._mtime = mtime  # a broken file keeps the keys loaded before

    def _key_for(self, kid: object, alg: str) -> Any:
        if kid is None:
            if len(self._keys) != 1:
                raise InvalidToken("token header has no 'kid' and the JWKS holds several keys")
            jwk = self._keys[0]
        else:
            if not isinstance(kid, str):
                raise InvalidToken("token header 'kid' is not a string")
            found = [k for k in self._keys if k.get("kid") == kid]
            if not found:
                self._refresh()
                found = [k for k in self._keys if k.get("kid") == kid]
            if not found:
                raise InvalidToken(f"unknown signing key (kid {kid[:64]!r} is not in the JWKS)")
            jwk = found[0]
        if jwk.get("alg", alg) != alg:
            raise InvalidToken(f"token algorithm {alg} does not match its key ({jwk['alg']})")
        try:
            return PyJWK(jwk, algorithm=alg).key
        except jwt.PyJWTError as exc:
            raise InvalidToken(f"token algorithm {alg} does not fit its key type") from exc

    def verify(self, token: str) -> Subject:
        """The subject of a valid access token, or :class:`InvalidToken` naming the reason."""
        s = self.settings
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise InvalidToken("malformed token: not a JWT") from exc
        alg = header.get("alg")
        if not isinstance(alg, str) or alg.lower() == "none":
            raise InvalidToken("unsigned token (alg 'none') is not accepted")
        if alg not in s.algorithms:
            raise InvalidToken(
                f"token algorithm {alg[:16]!r} is not accepted (allowed: {', '.join(s.algorithms)})"
            )
        key = self._key_for(header.get("kid"), alg)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=s.audience,
                issuer=s.issuer,
                leeway=s.leeway_s,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.InvalidSignatureError as exc:
            raise InvalidToken("bad token signature") from exc
        except jwt.ExpiredSignatureError as exc:
            raise InvalidToken("token expired (exp)") from exc
        except jwt.ImmatureSignatureError as exc:
            raise InvalidToken("token not yet valid (nbf or iat in the future)") from exc
        except jwt.InvalidAudienceError as exc:
            raise InvalidToken(f"token audience (aud) does not include {s.audience}") from exc
        except jwt.InvalidIssuerError as exc:
            raise InvalidToken(f"token issuer (iss) is not {s.issuer}") from exc
        except jwt.MissingRequiredClaimError as exc:
            raise InvalidToken(f"token lacks the required claim {exc.claim!r}") from exc
        except jwt.PyJWTError as exc:
            raise InvalidToken(f"invalid token: {exc}") from exc
        sub = claims.get("sub")
        try:
            subject_id = validate_subject_id(f"{s.subject_prefix}{sub}")
        except InvalidArgument as exc:
            raise InvalidToken(
                "token subject (sub) is not a usable subject id ([A-Za-z0-9._@-]{1,128})"
            ) from exc
        roles = roles_from_claim(claims.get(s.roles_claim), s.role_map)
        return Subject(id=subject_id, roles=roles, auth="jwt")
