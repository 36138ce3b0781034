"""Configuration loading: validation names the key, env overrides apply."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway import config

pytestmark = pytest.mark.unit

DEV = Path(__file__).parents[2] / "gateway" / "resources" / "dev.yaml"


def test_dev_config_loads_and_resolves_paths() -> None:
    """The shipped development config is valid; relative paths follow the file."""
    cfg = config.load(DEV, env={})
    assert cfg.server.host == "127.0.0.1"
    assert cfg.policy.engine == "embedded"
    assert cfg.policy.dir == (DEV.parent / "../../policies").resolve()
    assert cfg.audit_path == cfg.state_dir / "audit.log"
    assert len(cfg.auth.tokens) == 3


@pytest.mark.parametrize(
    ("doc", "key"),
    [
        ({"server": {"port": 70000}}, "server.port"),
        ({"server": {"port": "eighty"}}, "server.port"),
        ({"tasks": {"max_concurrent": 0}}, "tasks.max_concurrent"),
        ({"bogus": 1}, "bogus"),
        ({"server": {"bogus": 1}}, "server.bogus"),
        ({"auth": {"tokens": [{"subject": "a", "sha256": "xyz"}]}}, "auth.tokens.0.sha256"),
        ({"audit": {"redact": ["("]}}, "audit.redact"),
        ({"policy": {"engine": "magic"}}, "policy.engine"),
        ({"sandbox": {"warm": {"per_subject": 9}}}, "sandbox.warm.per_subject"),
        ({"sandbox": {"warm": {"idle_s": 0}}}, "sandbox.warm.idle_s"),
        (
            {"sandbox": {"limits": {"timeout_s": 100, "max_timeout_s": 10}}},
            "sandbox.limits.timeout_s",
        ),
    ],
)
def test_invalid_values_name_the_key(doc: dict[str, object], key: str) -> None:
    """Each invalid value stops loading with a message naming its dotted key."""
    with pytest.raises(config.ConfigError, match=key.replace(".", r"\.")):
        config.parse(doc)


def test_top_level_must_be_mapping() -> None:
    """A YAML list at the top level is refused clearly."""
    with pytest.raises(config.ConfigError, match="mapping"):
        config.parse([1, 2])


def test_env_overrides_nested_keys() -> None:
    """MCP_GATEWAY__A__B=v overrides nested keys, parsed as YAML scalars."""
    env = {
        "MCP_GATEWAY__SERVER__PORT": "9000",
        "MCP_GATEWAY__LOGGING__FORMAT": "json",
        "MCP_GATEWAY__TASKS__MAX_QUEUE": "3",
        "UNRELATED": "x",
    }
    cfg = config.parse({"server": {"host": "0.0.0.0"}}, env)
    assert cfg.server.port == 9000
    assert cfg.server.host == "0.0.0.0"
    assert cfg.logging.format == "json"
    assert cfg.tasks.max_queue == 3


def test_env_override_invalid_value_names_key() -> None:
    """A bad override is reported with the key it targets."""
    with pytest.raises(config.ConfigError, match=r"server\.port"):
        config.parse({}, {"MCP_GATEWAY__SERVER__PORT": "-1"})


def test_unreadable_and_invalid_yaml(tmp_path: Path) -> None:
    """Missing files and broken YAML give one-line errors."""
    with pytest.raises(config.ConfigError, match="cannot read"):
        config.load(tmp_path / "missing.yaml", env={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("server: [\n")
    with pytest.raises(config.ConfigError, match="not valid YAML"):
        config.load(bad, env={})


def test_hash_token_is_sha256_hex() -> None:
    """Tokens are stored as SHA-256 hex digests."""
    assert config.hash_token("dev-token") == (
        "c91cbbedf8c712e8e2b7517ddeca8fe4fde839ebd8339e0b2001363002b37712"
    )


@pytest.mark.parametrize(
    ("tls", "message"),
    [
        ({"enabled": True, "key_file": "k.pem"}, "tls.cert_file: required"),
        ({"enabled": True, "cert_file": "c.pem"}, "tls.key_file: required"),
        (
            {"enabled": True, "cert_file": "c", "key_file": "k", "client_auth": "required"},
            "tls.client_auth: 'required' needs tls.client_ca_file",
        ),
        (
            {
                "enabled": True,
                "cert_file": "c",
                "key_file": "k",
                "mtls_subjects": [{"cn": "a", "subject": "a"}],
            },
            "tls.mtls_subjects: needs tls.client_ca_file",
        ),
        (
            {"mtls_subjects": [{"subject": "a"}]},
            "tls.mtls_subjects.0: Value error, give exactly one",
        ),
        ({"mtls_subjects": [{"cn": "a", "san": "b", "subject": "a"}]}, "tls.mtls_subjects.0"),
        ({"client_auth": "sometimes"}, "tls.client_auth"),
        ({"mtls_subjects": [{"cn": "a", "subject": "a b"}]}, "tls.mtls_subjects.0.subject"),
    ],
)
def test_tls_errors_name_the_key(tls: dict[str, object], message: str) -> None:
    with pytest.raises(config.ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        config.parse({"tls": tls}, env={})


def test_tls_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(
        "tls: {enabled: true, cert_file: pki/s.pem, key_file: /abs/s-key.pem,"
        " client_ca_file: pki/ca.pem, client_auth: required,"
        " mtls_subjects: [{cn: alice, subject: alice, roles: [developer]}]}\n"
    )
    tls = config.load(path, env={}).tls
    assert tls.cert_file == tmp_path / "pki" / "s.pem"
    assert tls.key_file == Path("/abs/s-key.pem")
    assert tls.client_ca_file == tmp_path / "pki" / "ca.pem"
    assert tls.mtls_subjects[0].roles == ("developer",)
    assert config.parse({}, env={}).tls.enabled is False


def test_config_check_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """mcp-gateway config check: 0 and a summary for a good file, 2 naming the key otherwise."""
    from gateway.cli import main

    good = tmp_path / "good.yaml"
    good.write_text("server: {port: 9000}\n")
    assert main(["config", "check", str(good)]) == 0
    assert "ok (policy engine embedded, REST 127.0.0.1:9000" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("server: {port: nine}\n")
    assert main(["config", "check", str(bad)]) == 2
    assert "server.port" in capsys.readouterr().err
