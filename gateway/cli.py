"""``mcp-gateway``: run the server, drive a gateway, verify an audit log.

Client commands read ``MCP_GATEWAY_URL`` and ``MCP_GATEWAY_TOKEN`` unless
``--url``/``--token`` are given.  Errors print one line ``error: CODE: message``
and exit 1 (2 for bad usage or configuration); ``exec`` exits with the
command's own exit code.  ``mcp-stdio`` serves MCP on stdin/stdout for local
MCP clients, forwarding to a gateway's ``/mcp`` (docs/mcp.md).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gateway import __version__
from gateway.errors import InvalidArgument, McpError

DEFAULT_URL = "http://127.0.0.1:8081"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mcp-gateway", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=__version__)
    p.add_argument("--url", default=os.environ.get("MCP_GATEWAY_URL", DEFAULT_URL))
    p.add_argument("--token", default=os.environ.get("MCP_GATEWAY_TOKEN"))
    sub = p.add_subparsers(dest="cmd", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", type=Path, required=True)

    ex = sub.add_parser("exec", help="run a command in the sandbox, print its output live")
    ex.add_argument("--cwd")
    ex.add_argument("--timeout", type=float)
    ex.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    ex.add_argument("argv", nargs=argparse.REMAINDER)

    task = sub.add_parser("task", help="inspect or cancel a task")
    task.add_argument("action", choices=["status", "cancel", "output"])
    task.add_argument("task_id")

    files = sub.add_parser("files", help="workspace files")
    files.add_argument("action", choices=["get", "put", "rm", "ls"])
    files.add_argument("path", nargs="?", default="")
    files.add_argument("source", nargs="?", help="put: local file to upload (default stdin)")
    files.add_argument("--recursive", action="store_true")
    files.add_argument("--mode", default="644")
    files.add_argument("--create-dirs", action="store_true")

    bridge = sub.add_parser(
        "mcp-stdio", help="serve MCP on stdin/stdout, forwarding to a gateway's /mcp"
    )
    bridge.add_argument(
        "--url", dest="mcp_url", help="gateway base URL or its /mcp URL (default: --url)"
    )
    bridge.add_argument(
        "--token-file", type=Path, help="file holding the bearer token (default: MCP_GATEWAY_TOKEN)"
    )
    bridge.add_argument("--ca", type=Path, help="CA bundle to verify the gateway (https)")
    bridge.add_argument("--cert", type=Path, help="client certificate (PEM) for mTLS")
    bridge.add_argument("--key", type=Path, help="its private key (PEM), if not in --cert")

    audit = sub.add_parser("audit", help="audit log tools")
    audit.add_argument("action", choices=["verify"])
    audit.add_argument("file", type=Path)

    policy = sub.add_parser("policy", help="check, test and evaluate the policies")
    policy.add_argument("action", choices=["check", "test", "eval"])
    policy.add_argument("--dir", type=Path, help="policy directory (check/test; default: config)")
    policy.add_argument("--config", type=Path, help="gateway config (default engine and dir)")
    policy.add_argument("--opa", default=None, help="OPA binary (default: PATH, then .tools/bin)")
    policy.add_argument("--input", default="-", help="eval: input document file, - for stdin")

    cfg = sub.add_parser("config", help="configuration tools")
    cfg.add_argument("action", choices=["check"])
    cfg.add_argument("file", type=Path)

    token = sub.add_parser("token", help="token helpers")
    token.add_argument("action", choices=["hash"])

    certs = sub.add_parser("certs", help="development CA for TLS/mTLS (docs/tls.md)")
    certs.add_argument("action", choices=["init", "issue"])
    certs.add_argument("--dir", type=Path, required=True, help="CA directory")
    kind = certs.add_mutually_exclusive_group()
    kind.add_argument("--server", dest="kind", action="store_const", const="server")
    kind.add_argument("--client", dest="kind", action="store_const", const="client")
    certs.add_argument("--name", help="server: DNS name (SAN); client: CN = subject id")
    certs.add_argument("--dns", action="append", default=[], help="server: extra DNS SAN")
    certs.add_argument("--ip", action="append", default=[], help="server: IP address SAN")
    certs.add_argument("--days", type=int, help="validity (default: server 397, client 90)")
    certs.add_argument("--force", action="store_true", help="init: replace an existing CA")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        handler = _HANDLERS[args.cmd]
        return handler(args)
    except McpError as exc:
        print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _serve(args: argparse.Namespace) -> int:
    from gateway import config as config_mod
    from gateway import logs
    from gateway.server import serve

    try:
        config = config_mod.load(args.config)
    except config_mod.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logs.configure(config.logging.level, config.logging.format)
    return asyncio.run(serve(config))


def _client(args: argparse.Namespace) -> Any:
    from gateway.client import AsyncClient

    return AsyncClient(args.url, args.token)


def _exec(args: argparse.Namespace) -> int:
    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        print("error: exec needs a command: mcp-gateway exec -- CMD [ARGS...]", file=sys.stderr)
        return 2
    env = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"error: --env {item!r} is not KEY=VALUE", file=sys.stderr)
            return 2
        env[key] = value

    async def run() -> int:
        async with _client(args) as client:
            task = await client.execute(
                argv[0], argv[1:], cwd=args.cwd, env=env, timeout=args.timeout
            )
            task_id = task["task_id"]
            loop = asyncio.get_running_loop()

            pending: set[asyncio.Task[Any]] = set()

            def on_signal() -> None:
                # Ctrl-C cancels the remote task; its end then closes the stream.
                cancel = asyncio.ensure_future(client.cancel(task_id))
                pending.add(cancel)
                cancel.add_done_callback(pending.discard)

            loop.add_signal_handler(signal.SIGINT, on_signal)
            end: dict[str, Any] = {}
            async for line in client.stream_output(task_id):
                if line.get("event") == "end":
                    end = line
                    continue
                _emit(line)
            return _exit_code(end)

    return asyncio.run(run())


def _emit(line: dict[str, Any]) -> None:
    out = sys.stdout.buffer if line["stream"] == "stdout" else sys.stderr.buffer
    if "data" in line:
        out.write(line["data"].encode())
    else:
        out.write(base64.b64decode(line["data_base64"]))
    out.flush()


def _exit_code(end: dict[str, Any]) -> int:
    state = end.get("state")
    if state == "COMPLETED" and isinstance(end.get("exit_code"), int):
        code: int = end["exit_code"]
        return code
    print(f"mcp-gateway: task {state}: {end.get('reason', '')}", file=sys.stderr)
    return 124 if state == "TIMED_OUT" else 125


def _task(args: argparse.Namespace) -> int:
    async def run() -> int:
        async with _client(args) as client:
            if args.action == "status":
                print(json.dumps(await client.status(args.task_id), indent=2))
            elif args.action == "cancel":
                print(json.dumps(await client.cancel(args.task_id), indent=2))
            else:
                async for line in client.stream_output(args.task_id):
                    if line.get("event") != "end":
                        _emit(line)
            return 0

    return asyncio.run(run())


def _files(args: argparse.Namespace) -> int:
    async def run() -> int:
        async with _client(args) as client:
            if args.action == "get":
                sys.stdout.buffer.write(await client.read_file(args.path))
            elif args.action == "put":
                data = await asyncio.to_thread(_read_source, args.source)
                await client.write_file(
                    args.path, data, mode=int(args.mode, 8), create_dirs=args.create_dirs
                )
            elif args.action == "rm":
                await client.delete_file(args.path, recursive=args.recursive)
            else:
                for entry in await client.list_files(args.path):
                    kind = "d" if entry["type"] == "dir" else "-"
                    print(f"{kind}{entry['mode']:>4} {entry['size']:>10} {entry['name']}")
            return 0

    return asyncio.run(run())


def _read_source(source: str | None) -> bytes:
    return Path(source).read_bytes() if source else sys.stdin.buffer.read()


def _mcp_stdio(args: argparse.Namespace) -> int:
    import logging

    from gateway import mcp_stdio

    # stdout carries the protocol: every log line goes to stderr.
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
    try:
        token = mcp_stdio.read_token(args.token_file) if args.token_file else args.token
        options = mcp_stdio.BridgeOptions(
            url=mcp_stdio.endpoint(args.mcp_url or args.url),
            token=token,
            ca=args.ca,
            cert=args.cert,
            key=args.key,
        )
        if not options.token and options.cert is None:
            raise InvalidArgument(
                "no credentials: give --token-file, MCP_GATEWAY_TOKEN or --cert", field="token"
            )
        mcp_stdio.tls_context(options)  # load the TLS files now, for a clear error
    except McpError as exc:
        print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
        return 2
    try:
        asyncio.run(mcp_stdio.run(options))
    except Exception as exc:  # the edge: one line, never a traceback
        leaf = _leaf(exc)
        status = getattr(getattr(leaf, "response", None), "status_code", 0)
        code = {401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED"}.get(int(status), "UNAVAILABLE")
        print(f"error: {code}: {options.url}: {leaf or type(leaf).__name__}", file=sys.stderr)
        return 1
    return 0


def _leaf(exc: BaseException) -> BaseException:
    """The innermost exception of a group (task groups wrap transport errors)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _audit(args: argparse.Namespace) -> int:
    from gateway.audit import verify_file

    result = verify_file(args.file)
    if result.ok:
        print(f"ok: {result.records} records, chain intact")
        return 0
    print(f"BROKEN at line {result.first_bad_line}: {result.reason}", file=sys.stderr)
    return 1


def _policy(args: argparse.Namespace) -> int:
    import json as json_mod
    import shutil
    import subprocess

    from gateway import config as config_mod

    try:
        config = config_mod.load(args.config) if args.config else config_mod.parse({})
    except config_mod.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    policy_dir = args.dir or config.policy.dir
    if args.action == "eval":
        return asyncio.run(_policy_eval(config, args.input))
    opa = args.opa or shutil.which("opa") or str(Path(".tools/bin/opa"))
    if not Path(opa).exists():
        print("error: no OPA binary (give --opa, or run `make opa`)", file=sys.stderr)
        return 2
    argv = (
        [opa, "check", "--strict", str(policy_dir)]
        if args.action == "check"
        else [opa, "test", "--coverage", "--format=json", str(policy_dir)]
    )
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if args.action == "test" and result.returncode == 0:
        report = json_mod.loads(result.stdout)
        print(f"ok: policy tests passed, coverage {report['coverage']:.2f}%")
        return 0
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    if args.action == "check" and result.returncode == 0:
        print(f"ok: {policy_dir} compiles (opa check --strict)")
    return result.returncode


async def _policy_eval(config: Any, source: str) -> int:
    import json as json_mod

    from gateway.app import make_policy

    text = await asyncio.to_thread(
        lambda: sys.stdin.read() if source == "-" else Path(source).read_text()
    )
    try:
        doc = json_mod.loads(text)
    except ValueError as exc:
        print(f"error: input: not valid JSON ({exc})", file=sys.stderr)
        return 2
    engine = make_policy(config)
    try:
        decision = await engine.decide(doc)
    finally:
        await engine.close()
    print(
        json_mod.dumps(
            {
                "allow": decision.allow,
                "deny_reasons": list(decision.deny_reasons),
                "warnings": list(decision.warnings),
                "limits": decision.limits,
                "engine": decision.engine,
                "decision_id": decision.decision_id,
                "revision": decision.revision,
            },
            indent=2,
        )
    )
    return 0 if decision.allow else 3


def _config(args: argparse.Namespace) -> int:
    """``config check FILE``: validate without starting (Ansible's ``validate:`` uses it)."""
    from gateway import config as config_mod

    try:
        config = config_mod.load(args.file, env={})
    except config_mod.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"{args.file}: ok (policy engine {config.policy.engine}, "
        f"REST {config.server.host}:{config.server.port}, TLS {config.tls.enabled})"
    )
    return 0


def _token(args: argparse.Namespace) -> int:
    from gateway.config import hash_token

    token = sys.stdin.readline().strip()
    if not token:
        print("error: give the token on standard input", file=sys.stderr)
        return 2
    print(hash_token(token))
    return 0


def _certs(args: argparse.Namespace) -> int:
    from gateway import certs

    try:
        if args.action == "init":
            paths = certs.init_ca(args.dir, force=args.force)
        elif args.kind is None or (not args.name and not args.ip):
            print("error: certs issue needs --server or --client, and --name", file=sys.stderr)
            return 2
        else:
            paths = certs.issue(
                args.dir,
                args.kind,
                args.name or "",
                dns_names=args.dns,
                ips=args.ip,
                days=args.days,
            )
    except (OSError, ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


_HANDLERS = {
    "serve": _serve,
    "exec": _exec,
    "task": _task,
    "files": _files,
    "mcp-stdio": _mcp_stdio,
    "audit": _audit,
    "policy": _policy,
    "config": _config,
    "token": _token,
    "certs": _certs,
}


if __name__ == "__main__":
    sys.exit(main())
