"""Bearer token authentication."""

from __future__ import annotations

import pytest

from gateway.auth import TokenAuthenticator
from gateway.config import TokenConfig, hash_token
from gateway.errors import Unauthenticated

pytestmark = pytest.mark.unit

AUTH = TokenAuthenticator(
    [TokenConfig(subject="alice", roles=("developer",), sha256=hash_token("s3cret"))]
)


def test_known_token_maps_to_subject() -> None:
    """A configured token yields its subject and roles."""
    subject = AUTH.authenticate("Bearer s3cret")
    assert subject.id == "alice"
    assert subject.roles == ("developer",)
    assert subject.auth == "token"


@pytest.mark.parametrize(
    "header", [None, "", "Bearer", "Bearer ", "Basic s3cret", "Bearer wrong", "s3cret"]
)
def test_bad_headers_are_unauthenticated(header: str | None) -> None:
    """Missing, malformed or unknown credentials are refused."""
    with pytest.raises(Unauthenticated):
        AUTH.authenticate(header)


def test_error_never_echoes_the_token() -> None:
    """The error message does not contain the presented token."""
    with pytest.raises(Unauthenticated) as info:
        AUTH.authenticate("Bearer guess-123")
    assert "guess-123" not in str(info.value)
