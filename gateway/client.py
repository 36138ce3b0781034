"""Python client for the gateway's REST API, async and sync, same method names.

Errors come back as the gateway's own :mod:`gateway.errors` classes, rebuilt
from the JSON error body.  Only requests that are safe to repeat are retried
(reads, and any request that failed to connect before it was sent).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any

import aiohttp

from gateway.errors import McpError, Unavailable, from_dict

TERMINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"})


class AsyncClient:
    """Async REST client; use as ``async with AsyncClient(url, token) as c``."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8081",
        token: str | None = None,
        *,
        timeout_s: float = 300.0,
        retries: int = 2,
    ) -> None:
        self._base = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._retries = retries
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(headers=self._headers, timeout=self._timeout)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _request(
        self,
        method: str,
        path: str,
        *,
        idempotent: bool,
        json_body: Any = None,
        data: bytes | None = None,
        params: Mapping[str, str] | None = None,
    ) -> tuple[int, bytes]:
        attempt = 0
        while True:
            try:
                async with self._http().request(
                    method, self._base + path, json=json_body, data=data, params=params
                ) as resp:
                    body = await resp.read()
                    if resp.status >= 400:
                        raise _error(resp.status, body)
                    return resp.status, body
            except aiohttp.ClientConnectorError as exc:
                # Nothing was sent: always safe to try again.
                if attempt >= self._retries:
                    raise Unavailable(f"cannot connect to {self._base}: {exc}") from exc
            except (aiohttp.ClientError, TimeoutError) as exc:
                if not idempotent or attempt >= self._retries:
                    raise Unavailable(f"request to {self._base} failed: {exc}") from exc
            attempt += 1
            await asyncio.sleep(0.1 * 2**attempt)

    async def _json(self, method: str, path: str, *, idempotent: bool, **kw: Any) -> Any:
        _, body = await self._request(method, path, idempotent=idempotent, **kw)
        return json.loads(body)

    # -- commands and tasks ----------------------------------------------------------

    async def execute(
        self,
        command: str,
        args: Sequence[str] = (),
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        stdin: str | None = None,
        wait: bool = False,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"command": command, "args": list(args), "wait": wait}
        if cwd is not None:
            body["cwd"] = cwd
        if env:
            body["env"] = dict(env)
        if timeout is not None:
            body["timeout"] = timeout
        if stdin is not None:
            body["stdin"] = stdin
        result: dict[str, Any] = await self._json(
            "POST", "/v1/commands", idempotent=False, json_body=body
        )
        return result

    async def status(self, task_id: str, *, output: bool = False) -> dict[str, Any]:
        params = {"output": "true"} if output else None
        result: dict[str, Any] = await self._json(
            "GET", f"/v1/tasks/{task_id}", idempotent=True, params=params
        )
        return result

    async def wait(self, task_id: str) -> dict[str, Any]:
        """Follow the output stream to its end, then return the final status."""
        async for _ in self.stream_output(task_id):
            pass
        return await self.status(task_id, output=True)

    async def stream_output(self, task_id: str) -> AsyncIterator[dict[str, Any]]:
        """Yield NDJSON lines: output chunks, then one ``{"event": "end", ...}``."""
        async with self._http().get(self._base + f"/v1/tasks/{task_id}/output") as resp:
            if resp.status >= 400:
                raise _error(resp.status, await resp.read())
            async for raw in resp.content:
                if raw.strip():
                    yield json.loads(raw)

    async def cancel(self, task_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._json(
            "POST", f"/v1/tasks/{task_id}/cancel", idempotent=True
        )
        return result

    # -- files ------------------------------------------------------------------------

    async def read_file(self, path: str) -> bytes:
        _, body = await self._request("GET", f"/v1/files/{_quote(path)}", idempotent=True)
        return body

    async def write_file(
        self, path: str, data: bytes, *, mode: int = 0o644, create_dirs: bool = False
    ) -> dict[str, Any]:
        params = {"mode": f"{mode:o}", "create_dirs": "true" if create_dirs else "false"}
        result: dict[str, Any] = await self._json(
            "PUT", f"/v1/files/{_quote(path)}", idempotent=True, data=data, params=params
        )
        return result

    async def delete_file(self, path: str, *, recursive: bool = False) -> dict[str, Any]:
        params = {"recursive": "true" if recursive else "false"}
        result: dict[str, Any] = await self._json(
            "DELETE", f"/v1/files/{_quote(path)}", idempotent=True, params=params
        )
        return result

    async def list_files(self, path: str = "") -> list[dict[str, Any]]:
        target = f"/v1/files/{_quote(path)}" if path else "/v1/files"
        result = await self._json("GET", target, idempotent=True, params={"list": "true"})
        entries: list[dict[str, Any]] = result["entries"]
        return entries


def _quote(path: str) -> str:
    from urllib.parse import quote

    return quote(path, safe="/")


def _error(status: int, body: bytes) -> McpError:
    try:
        doc = json.loads(body)
        if isinstance(doc, dict) and isinstance(doc.get("error"), dict):
            return from_dict(doc)
    except ValueError:
        pass
    return Unavailable(f"HTTP {status}: {body[:200].decode(errors='replace')}")


class Client:
    """Blocking twin of :class:`AsyncClient`, running its own event loop."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._async = AsyncClient(*args, **kwargs)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._loop.run_until_complete(self._async.close())
        self._loop.close()

    def execute(self, command: str, args: Sequence[str] = (), **kw: Any) -> dict[str, Any]:
        return self._loop.run_until_complete(self._async.execute(command, args, **kw))

    def status(self, task_id: str, *, output: bool = False) -> dict[str, Any]:
        return self._loop.run_until_complete(self._async.status(task_id, output=output))

    def wait(self, task_id: str) -> dict[str, Any]:
        return self._loop.run_until_complete(self._async.wait(task_id))

    def stream_output(self, task_id: str) -> Iterator[dict[str, Any]]:
        agen = aiter(self._async.stream_output(task_id))
        try:
            while True:
                try:
                    yield self._loop.run_until_complete(agen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            aclose = getattr(agen, "aclose", None)
            if aclose is not None:
                self._loop.run_until_complete(aclose())

    def cancel(self, task_id: str) -> dict[str, Any]:
        return self._loop.run_until_complete(self._async.cancel(task_id))

    def read_file(self, path: str) -> bytes:
        return self._loop.run_until_complete(self._async.read_file(path))

    def write_file(self, path: str, data: bytes, **kw: Any) -> dict[str, Any]:
        return self._loop.run_until_complete(self._async.write_file(path, data, **kw))

    def delete_file(self, path: str, *, recursive: bool = False) -> dict[str, Any]:
        return self._loop.run_until_complete(self._async.delete_file(path, recursive=recursive))

    def list_files(self, path: str = "") -> list[dict[str, Any]]:
        return self._loop.run_until_complete(self._async.list_files(path))
