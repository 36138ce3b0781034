"""Gateway configuration: one YAML file plus ``MCP_GATEWAY__SECTION__KEY`` overrides.

The file is validated by pydantic; any unknown or invalid key stops start-up
with a :class:`ConfigError` naming the dotted key (``tasks.max_queue``), never
with a traceback.  Environment overrides use a double underscore between
levels and are parsed as YAML scalars, so ``MCP_GATEWAY__SERVER__PORT=9000``
and ``MCP_GATEWAY__LOGGING__FORMAT=json`` do what they say.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from gateway.oauth import parse_jwks, read_jwks

ENV_PREFIX = "MCP_GATEWAY__"


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8081
    max_body_bytes: Annotated[int, Field(ge=1024)] = 8 * 1024 * 1024
    public_paths: tuple[str, ...] = ("/health", "/ready", "/metrics")
    shutdown_grace_s: Annotated[float, Field(ge=0)] = 10.0


class GrpcConfig(_Section):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 50051


class TokenConfig(_Section):
    """An API token, stored as the hex SHA-256 of the token text."""

    subject: Annotated[str, Field(pattern=r"^[A-Za-z0-9._@-]{1,128}$")]
    roles: tuple[str, ...] = ()
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


_Algorithm = Literal[
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"
]
_HTTP_URL = re.compile(r"https?://[^\s/?#@]+(/[^\s?#]*)?")


def _http_url(value: str) -> str:
    if _HTTP_URL.fullmatch(value) is None:
        raise ValueError("must be an http(s) URL without query or fragment")
    return value


_HttpUrl = Annotated[str, AfterValidator(_http_url)]


class OAuthConfig(_Section):
    """An authorization server whose JWT access tokens the gateway accepts (docs/mcp.md)."""

    issuer: _HttpUrl
    # This gateway's resource URL (RFC 8707): tokens must carry it in ``aud``.
    audience: _HttpUrl
    jwks_file: Path | None = None
    jwks: dict[str, Any] | None = None
    # Advertised in the metadata document; default: [issuer].
    authorization_servers: tuple[_HttpUrl, ...] = ()
    # Default: derived from audience (RFC 9728 section 3.1).
    resource_metadata_url: _HttpUrl | None = None
    scopes_supported: tuple[str, ...] = ()
    resource_name: str | None = None
    algorithms: Annotated[tuple[_Algorithm, ...], Field(min_length=1)] = ("RS256", "ES256")
    leeway_s: Annotated[float, Field(ge=0, le=300)] = 30.0
    roles_claim: Annotated[str, Field(min_length=1)] = "roles"
    role_map: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    subject_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9._@-]{0,64}$")] = ""

    @field_validator("jwks")
    @classmethod
    def _jwks_valid(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            parse_jwks(value)
        return value

    @model_validator(mode="after")
    def _one_key_source(self) -> OAuthConfig:
        if (self.jwks is None) == (self.jwks_file is None):
            raise ValueError("give exactly one of 'jwks_file' or 'jwks'")
        return self


class AuthConfig(_Section):
    tokens: tuple[TokenConfig, ...] = ()
    oauth: OAuthConfig | None = None


class MtlsSubjectConfig(_Section):
    """A verified client certificate (by CN or by a DNS/URI SAN) to a subject."""

    cn: Annotated[str, Field(min_length=1)] | None = None
    san: Annotated[str, Field(min_length=1)] | None = None
    subject: Annotated[str, Field(pattern=r"^[A-Za-z0-9._@-]{1,128}$")]
    roles: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _one_selector(self) -> MtlsSubjectConfig:
        if (self.cn is None) == (self.san is None):
            raise ValueError("give exactly one of 'cn' or 'san'")
        return self


class TlsConfig(_Section):
    """TLS for REST and gRPC; with ``client_ca_file``, client certificates (mTLS)."""

    enabled: bool = False
    cert_file: Path | None = None
    key_file: Path | None = None
    client_ca_file: Path | None = None
    client_auth: Literal["optional", "required"] = "optional"
    mtls_subjects: tuple[MtlsSubjectConfig, ...] = ()


class PolicyConfig(_Section):
    engine: Literal["embedded", "opa"] = "embedded"
    dir: Path = Path("policies")
    timeout_s: Annotated[float, Field(gt=0, le=30)] = 1.0
    # engine "opa" only: where OPA listens (unix:///path or http(s)://127.0.0.1:8181)
    # and a file holding the bearer token for OPA's --authentication=token.
    opa_url: Annotated[str, Field(pattern=r"^(unix:///\S+|https?://\S+)$")] = (
        "unix:///run/opa/opa.sock"
    )
    opa_token_file: Path | None = None
    # engine "embedded" only: how often to look for changed policy files
    # (0 turns the watch off; SIGHUP reloads either way).
    watch_interval_s: Annotated[float, Field(ge=0)] = 2.0
    # engine "embedded" only: the OPA binary that compiles the policies to
    # WebAssembly (a name looked up on PATH, or a path; relative paths are
    # taken from the config file's directory).
    opa_binary: Annotated[str, Field(min_length=1)] = "opa"


class LimitsConfig(_Section):
    """Defaults and hard caps for every sandboxed run; policy may lower them."""

    timeout_s: Annotated[float, Field(gt=0, le=86400)] = 30.0
    max_timeout_s: Annotated[float, Field(gt=0, le=86400)] = 3600.0
    memory_bytes: Annotated[int, Field(ge=16 * 1024 * 1024)] = 512 * 1024 * 1024
    pids: Annotated[int, Field(ge=4)] = 128
    cpu_seconds: Annotated[int, Field(ge=1)] = 60
    cpu_quota: Annotated[float, Field(gt=0, le=64)] = 1.0
    nofile: Annotated[int, Field(ge=16)] = 256
    fsize_bytes: Annotated[int, Field(ge=1024)] = 256 * 1024 * 1024
    tmp_size_bytes: Annotated[int, Field(ge=1024 * 1024)] = 64 * 1024 * 1024
    output_bytes: Annotated[int, Field(ge=1024)] = 1024 * 1024


class WarmConfig(_Section):
    """Sandboxes set up ahead of a subject's next command (see gateway.warm)."""

    per_subject: Annotated[int, Field(ge=0, le=8)] = 2  # 0 turns warm sandboxes off
    total: Annotated[int, Field(ge=0, le=256)] = 16
    idle_s: Annotated[float, Field(gt=0, le=86400)] = 120.0


class SandboxConfig(_Section):
    bwrap: Path = Path("/usr/bin/bwrap")
    cgroup_parent: str = "mcp-gateway"
    limits: LimitsConfig = LimitsConfig()
    env_allowlist: tuple[str, ...] = ("TERM", "TZ", "LANG", "LC_ALL")
    warm: WarmConfig = WarmConfig()


class TasksConfig(_Section):
    max_concurrent: Annotated[int, Field(ge=1, le=1024)] = 16
    max_queue: Annotated[int, Field(ge=0, le=100000)] = 256
    retention_s: Annotated[float, Field(gt=0)] = 24 * 3600.0
    max_args: Annotated[int, Field(ge=1)] = 1024
    max_arg_bytes: Annotated[int, Field(ge=1)] = 128 * 1024
    max_stdin_bytes: Annotated[int, Field(ge=0)] = 1024 * 1024


class FilesConfig(_Section):
    max_read_bytes: Annotated[int, Field(ge=1)] = 16 * 1024 * 1024
    max_write_bytes: Annotated[int, Field(ge=1)] = 16 * 1024 * 1024
    max_list_entries: Annotated[int, Field(ge=1)] = 10000


class AuditConfig(_Section):
    path: Path | None = None  # default: <state_dir>/audit.log
    redact: tuple[str, ...] = ()
    journald: bool = False

    @field_validator("redact")
    @classmethod
    def _patterns_compile(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"invalid regular expression {pattern!r}: {exc}") from exc
        return value


class LoggingConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    # "auto": JSON lines under systemd (JOURNAL_STREAM is set), console otherwise.
    format: Literal["auto", "console", "json"] = "auto"


class TracingConfig(_Section):
    """OpenTelemetry traces over OTLP; off by default (see docs/observability.md)."""

    enabled: bool = False
    # OTLP endpoint: for "grpc" host:port or http(s)://host:port; for
    # "http/protobuf" the base URL (the exporter appends /v1/traces).
    endpoint: Annotated[str, Field(min_length=1)] = "http://127.0.0.1:4317"
    protocol: Literal["grpc", "http/protobuf"] = "grpc"
    headers: dict[str, str] = Field(default_factory=dict)
    # TLS towards the collector: "insecure" means plaintext (loopback only).
    insecure: bool = True
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    timeout_s: Annotated[float, Field(gt=0, le=60)] = 10.0
    # Head sampling for new traces; a sampled parent from the caller is honoured.
    sample_ratio: Annotated[float, Field(ge=0, le=1)] = 1.0
    service_name: Annotated[str, Field(min_length=1)] = "mcp-gateway"
    # Extra resource attributes (deployment.environment, service.instance.id...).
    resource: dict[str, str] = Field(default_factory=dict)


class HaConfig(_Section):
    """High availability (docs/ha.md): where keepalived's notify hook records the role."""

    vrrp_state_file: Path | None = None
    poll_interval_s: Annotated[float, Field(gt=0, le=60)] = 0.5
    # This node's name (task ids carry it) and its peers' names (for LOST answers).
    node_name: Annotated[str, Field(min_length=1, max_length=255)] = Field(
        default_factory=socket.gethostname
    )
    peers: tuple[Annotated[str, Field(min_length=1, max_length=255)], ...] = ()


class Config(_Section):
    state_dir: Path = Path("/var/lib/mcp-gateway")
    server: ServerConfig = ServerConfig()
    grpc: GrpcConfig = GrpcConfig()
    auth: AuthConfig = AuthConfig()
    tls: TlsConfig = TlsConfig()
    policy: PolicyConfig = PolicyConfig()
    sandbox: SandboxConfig = SandboxConfig()
    tasks: TasksConfig = TasksConfig()
    files: FilesConfig = FilesConfig()
    audit: AuditConfig = AuditConfig()
    logging: LoggingConfig = LoggingConfig()
    tracing: TracingConfig = TracingConfig()
    ha: HaConfig = HaConfig()

    @property
    def audit_path(self) -> Path:
        return self.audit.path or self.state_dir / "audit.log"


def hash_token(token: str) -> str:
    """The form tokens are stored in: hex SHA-256 of the UTF-8 text."""
    return hashlib.sha256(token.encode()).hexdigest()


def _format_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{key}: {msg}")
    return "invalid configuration: " + "; ".join(lines)


def apply_env(data: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """Return ``data`` with every ``MCP_GATEWAY__A__B=v`` override applied (pure)."""
    merged: dict[str, Any] = dict(data)
    for name, raw in sorted(env.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        keys = [k.lower() for k in name[len(ENV_PREFIX) :].split("__")]
        if not all(keys):
            raise ConfigError(f"invalid override {name}: empty key component")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"invalid override {name}: not a YAML scalar") from exc
        node = merged
        for key in keys[:-1]:
            child = node.get(key)
            child = dict(child) if isinstance(child, dict) else {}
            node[key] = child
            node = child
        node[keys[-1]] = value
    return merged


def parse(data: object, env: Mapping[str, str] | None = None, base: Path | None = None) -> Config:
    """Validate a loaded YAML document (plus overrides) into a :class:`Config`.

    Relative paths are resolved against ``base`` (the config file's directory).
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("invalid configuration: the top level must be a mapping")
    data = apply_env(data, env or {})
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc)) from None
    if config.sandbox.limits.timeout_s > config.sandbox.limits.max_timeout_s:
        raise ConfigError("sandbox.limits.timeout_s: must not exceed sandbox.limits.max_timeout_s")
    _check_tls(config.tls)
    _check_tracing(config.tracing)
    if base is not None:
        config = _resolve(config, base)
    _check_oauth(config.auth.oauth)
    return config


def _check_oauth(oauth: OAuthConfig | None) -> None:
    if oauth is None or oauth.jwks_file is None:
        return
    try:
        read_jwks(oauth.jwks_file)
    except ValueError as exc:
        raise ConfigError(f"invalid configuration: auth.oauth.jwks_file: {exc}") from None


def _check_tls(tls: TlsConfig) -> None:
    if not tls.enabled:
        return
    for key in ("cert_file", "key_file"):
        if getattr(tls, key) is None:
            raise ConfigError(
                f"invalid configuration: tls.{key}: required when tls.enabled is true"
            )
    if tls.client_ca_file is None:
        if tls.client_auth == "required":
            raise ConfigError(
                "invalid configuration: tls.client_auth: 'required' needs tls.client_ca_file"
            )
        if tls.mtls_subjects:
            raise ConfigError("invalid configuration: tls.mtls_subjects: needs tls.client_ca_file")


def _check_tracing(tracing: TracingConfig) -> None:
    if (tracing.cert_file is None) != (tracing.key_file is None):
        raise ConfigError(
            "invalid configuration: tracing.cert_file: give both cert_file and key_file or neither"
        )
    if tracing.insecure and (tracing.ca_file or tracing.cert_file):
        raise ConfigError("invalid configuration: tracing.insecure: true conflicts with TLS files")


def _resolve(config: Config, base: Path) -> Config:
    def rel(path: Path) -> Path:
        return path if path.is_absolute() else (base / path).resolve()

    audit = config.audit
    if audit.path is not None:
        audit = audit.model_copy(update={"path": rel(audit.path)})
    tls = config.tls.model_copy(
        update={
            key: rel(value)
            for key in ("cert_file", "key_file", "client_ca_file")
            if (value := getattr(config.tls, key)) is not None
        }
    )
    auth = config.auth
    if auth.oauth is not None and auth.oauth.jwks_file is not None:
        oauth = auth.oauth.model_copy(update={"jwks_file": rel(auth.oauth.jwks_file)})
        auth = auth.model_copy(update={"oauth": oauth})
    return config.model_copy(
        update={
            "state_dir": rel(config.state_dir),
            "auth": auth,
            "tls": tls,
            "policy": config.policy.model_copy(
                update={
                    "dir": rel(config.policy.dir),
                    "opa_binary": str(rel(Path(config.policy.opa_binary)))
                    if "/" in config.policy.opa_binary
                    else config.policy.opa_binary,
                }
            ),
            "audit": audit,
            "tracing": config.tracing.model_copy(
                update={
                    key: rel(value)
                    for key in ("ca_file", "cert_file", "key_file")
                    if (value := getattr(config.tracing, key)) is not None
                }
            ),
        }
    )


def load(path: Path, env: Mapping[str, str] | None = None) -> Config:
    """Read, override and validate the YAML file at ``path``."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read configuration {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"configuration {path} is not valid YAML: {exc}") from exc
    return parse(data, os.environ if env is None else env, base=path.parent)
