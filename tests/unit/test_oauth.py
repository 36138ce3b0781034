"""JWT access tokens, JWKS checks, metadata and challenges of the resource-server side."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from gateway import config
from gateway.auth import TokenAuthenticator
from gateway.config import OAuthConfig, TokenConfig, hash_token
from gateway.errors import InvalidToken, Unauthenticated
from gateway.oauth import (
    AccessTokenVerifier,
    challenge,
    metadata_document,
    metadata_paths,
    metadata_url,
    parse_jwks,
    roles_from_claim,
)

pytestmark = pytest.mark.unit

ISSUER = "https://as.example.test"
AUDIENCE = "https://gateway.example.test/mcp"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _jwk(key: Any, kid: str) -> dict[str, Any]:
    algorithm = RSAAlgorithm if isinstance(key, rsa.RSAPrivateKey) else ECAlgorithm
    doc: dict[str, Any] = algorithm.to_jwk(key.public_key(), as_dict=True)
    return {**doc, "kid": kid, "use": "sig"}


JWKS = {"keys": [_jwk(RSA_KEY, "rsa-1"), _jwk(EC_KEY, "ec-1")]}
SETTINGS = OAuthConfig(issuer=ISSUER, audience=AUDIENCE, jwks=JWKS, role_map={})
VERIFIER = AccessTokenVerifier(SETTINGS)


def _token(
    claims: dict[str, Any] | None = None,
    *,
    key: Any = RSA_KEY,
    alg: str = "RS256",
    kid: str | None = "rsa-1",
    drop: tuple[str, ...] = (),
) -> str:
    now = int(time.time())
    body: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "agent-7",
        "iat": now,
        "exp": now + 300,
        "roles": ["developer"],
        **(claims or {}),
    }
    for name in drop:
        body.pop(name)
    headers = {"kid": kid} if kid is not None else {}
    return jwt.encode(body, key, algorithm=alg, headers=headers)


def test_valid_rsa_and_ec_tokens() -> None:
    """Tokens signed by either JWKS key give the sub and the roles claim."""
    for token in (_token(), _token(key=EC_KEY, alg="ES256", kid="ec-1")):
        subject = VERIFIER.verify(token)
        assert (subject.id, subject.roles, subject.auth) == ("agent-7", ("developer",), "jwt")


def test_audience_list_containing_ours_is_accepted() -> None:
    """aud may be a list; it must contain the gateway's resource URL."""
    assert VERIFIER.verify(_token({"aud": ["https://other.test", AUDIENCE]})).id == "agent-7"


def _alg_none() -> str:
    return jwt.encode(
        {"iss": ISSUER, "aud": AUDIENCE, "sub": "x", "exp": int(time.time()) + 60},
        "",
        algorithm="none",
    )


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (lambda: _token({"exp": int(time.time()) - 600}), "expired"),
        (lambda: _token({"nbf": int(time.time()) + 600}), "not yet valid"),
        (lambda: _token({"aud": "https://other.test"}), "audience"),
        (lambda: _token({"iss": "https://evil.test"}), "issuer"),
        (lambda: _token(key=OTHER_KEY), "signature"),
        (lambda: _token(kid="nope"), "unknown signing key"),
        (lambda: _token(kid=None), "no 'kid'"),
        (lambda: _token(drop=("exp",)), "'exp'"),
        (lambda: _token(drop=("sub",)), "'sub'"),
        (lambda: _token({"sub": "../etc"}), "subject"),
        (_alg_none, "alg 'none'"),
        (lambda: _token(alg="HS256", key=b"k" * 32), "not accepted"),
        (lambda: _token(key=OTHER_KEY, alg="RS384"), "not accepted"),
        (lambda: _token(key=EC_KEY, alg="ES256", kid="rsa-1"), "does not fit its key"),
        (lambda: "a.b.c", "malformed"),
    ],
)
def test_rejections_name_the_reason(token: Callable[[], str], reason: str) -> None:
    """Each defect gives InvalidToken whose message names it."""
    with pytest.raises(InvalidToken, match=reason.replace("(", r"\(")):
        VERIFIER.verify(token())


def test_leeway_accepts_slight_skew() -> None:
    """An exp a few seconds past is within leeway_s."""
    assert VERIFIER.verify(_token({"exp": int(time.time()) - 5})).id == "agent-7"


@pytest.mark.parametrize(
    ("value", "role_map", "roles"),
    [
        (["a", "b", "a"], {}, ("a", "b")),
        ("mcp:exec mcp:read", {}, ("mcp:exec", "mcp:read")),
        (
            "mcp:exec mcp:read other",
            {"mcp:exec": ("developer",), "mcp:read": ("readonly",)},
            (
                "developer",
                "readonly",
            ),
        ),
        (None, {}, ()),
        ([1, 2], {}, ()),
    ],
)
def test_roles_from_claim(value: object, role_map: dict[str, tuple[str, ...]], roles: Any) -> None:
    """Lists or space-separated strings become roles, optionally through role_map."""
    assert roles_from_claim(value, role_map) == roles


def test_scope_claim_with_role_map_and_prefix() -> None:
    """roles_claim 'scope' with a role_map; subject_prefix keeps namespaces apart."""
    settings = SETTINGS.model_copy(
        update={
            "roles_claim": "scope",
            "role_map": {"gateway:exec": ("developer",)},
            "subject_prefix": "oidc.",
        }
    )
    subject = AccessTokenVerifier(settings).verify(_token({"scope": "openid gateway:exec"}))
    assert (subject.id, subject.roles) == ("oidc.agent-7", ("developer",))


def test_metadata_url_and_paths() -> None:
    """RFC 9728: the well-known prefix goes before the resource's path."""
    assert metadata_url(AUDIENCE) == (
        "https://gateway.example.test/.well-known/oauth-protected-resource/mcp"
    )
    assert (
        metadata_url("https://gw.test/") == "https://gw.test/.well-known/oauth-protected-resource"
    )
    assert metadata_paths("https://gw.test/api/mcp") == (
        "/.well-known/oauth-protected-resource",
        "/.well-known/oauth-protected-resource/mcp",
        "/.well-known/oauth-protected-resource/api/mcp",
    )


def test_metadata_document() -> None:
    """The document lists the resource, its authorization servers and bearer methods."""
    doc = metadata_document(SETTINGS.model_copy(update={"scopes_supported": ("gateway:exec",)}))
    assert doc["resource"] == AUDIENCE
    assert doc["authorization_servers"] == [ISSUER]
    assert doc["bearer_methods_supported"] == ["header"]
    assert doc["scopes_supported"] == ["gateway:exec"]


def test_challenge_escapes_the_description() -> None:
    """Quotes and backslashes cannot break out of the quoted description."""
    value = challenge("https://gw/.well-known/x", "invalid_token", 'bad "sig" \\ here')
    assert value == (
        'Bearer resource_metadata="https://gw/.well-known/x", error="invalid_token", '
        'error_description="bad ?sig? ? here"'
    )
    assert challenge(None) == 'Bearer realm="mcp-gateway"'


def test_static_tokens_work_alongside() -> None:
    """A configured static token still authenticates; a bad JWT is invalid_token."""
    auth = TokenAuthenticator(
        [TokenConfig(subject="alice", roles=("developer",), sha256=hash_token("s3cret"))],
        oauth=VERIFIER,
    )
    assert auth.authenticate("Bearer s3cret").auth == "token"
    assert auth.authenticate(f"Bearer {_token()}").auth == "jwt"
    with pytest.raises(InvalidToken) as info:
        auth.authenticate(f"Bearer {_token(kid='zzz')}")
    assert 'error="invalid_token"' in auth.challenge(info.value)
    assert "resource_metadata=" in auth.challenge(info.value)
    with pytest.raises(Unauthenticated) as missing:
        auth.authenticate(None)
    assert "error=" not in auth.challenge(missing.value)


@pytest.mark.parametrize(
    ("jwks", "reason"),
    [
        ({}, "'keys' list"),
        ({"keys": []}, "no keys"),
        ({"keys": ["x"]}, "must be an object"),
        ({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}, "symmetric"),
        ({"keys": [{**_jwk(RSA_KEY, "a"), "use": "enc"}]}, "'use'"),
        ({"keys": [_jwk(RSA_KEY, "a"), _jwk(EC_KEY, "a")]}, "duplicate kid"),
        ({"keys": [{"kty": "RSA", "kid": "broken", "n": "AQAB"}]}, "not a usable public key"),
    ],
)
def test_bad_jwks_rejected(jwks: dict[str, Any], reason: str) -> None:
    """Each broken JWKS is refused with a reason."""
    with pytest.raises(ValueError, match=reason):
        parse_jwks(jwks)


def _oauth(**kw: object) -> dict[str, object]:
    return {"auth": {"oauth": {"issuer": ISSUER, "audience": AUDIENCE, "jwks": JWKS, **kw}}}


@pytest.mark.parametrize(
    ("doc", "key"),
    [
        (_oauth(issuer="not a url"), "auth.oauth.issuer"),
        (_oauth(audience="mcp"), "auth.oauth.audience"),
        (_oauth(jwks={"keys": []}), "auth.oauth.jwks"),
        (
            _oauth(jwks_file="/nonexistent/jwks.json", jwks=None),
            "auth.oauth.jwks_file: cannot read",
        ),
        (_oauth(jwks_file="jwks.json"), "auth.oauth: .*exactly one"),
        (_oauth(algorithms=["HS256"]), "auth.oauth.algorithms"),
        (_oauth(algorithms=[]), "auth.oauth.algorithms"),
        (_oauth(leeway_s=-1), "auth.oauth.leeway_s"),
        (_oauth(bogus=1), "auth.oauth.bogus"),
        ({"auth": {"oauth": {"issuer": ISSUER, "audience": AUDIENCE}}}, "auth.oauth"),
    ],
)
def test_config_errors_name_the_key(doc: dict[str, object], key: str) -> None:
    """Every invalid auth.oauth value stops loading with its dotted key."""
    with pytest.raises(config.ConfigError, match=key.replace(".", r"\.").replace(r"\.*", ".*")):
        config.parse(doc)


def test_jwks_file_is_checked_and_resolved(tmp_path: Path) -> None:
    """jwks_file is relative to the config file and checked at load."""
    (tmp_path / "jwks.json").write_text(json.dumps(JWKS))
    cfg_file = tmp_path / "gateway.yaml"
    cfg_file.write_text(
        json.dumps(
            {"auth": {"oauth": {"issuer": ISSUER, "audience": AUDIENCE, "jwks_file": "jwks.json"}}}
        )
    )
    cfg = config.load(cfg_file, env={})
    assert cfg.auth.oauth is not None
    assert cfg.auth.oauth.jwks_file == tmp_path / "jwks.json"
    (tmp_path / "jwks.json").write_text("{")
    with pytest.raises(config.ConfigError, match=r"auth\.oauth\.jwks_file: .*not JSON"):
        config.load(cfg_file, env={})


def test_jwks_file_rotation_is_picked_up(tmp_path: Path) -> None:
    """A token with a new kid is accepted once the JWKS file holds that key."""
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [_jwk(RSA_KEY, "rsa-1")]}))
    verifier = AccessTokenVerifier(SETTINGS.model_copy(update={"jwks": None, "jwks_file": path}))
    token = _token(key=OTHER_KEY, kid="rsa-2")
    with pytest.raises(InvalidToken, match="unknown signing key"):
        verifier.verify(token)
    path.write_text(json.dumps({"keys": [_jwk(RSA_KEY, "rsa-1"), _jwk(OTHER_KEY, "rsa-2")]}))
    os.utime(path, (time.time() + 5, time.time() + 5))
    assert verifier.verify(token).id == "agent-7"
