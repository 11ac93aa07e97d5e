"""A bare asyncio client of the API server (the admin kubeconfig's client certificate): creates with
retries, watches that reconnect, raw reads."""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from sft_devcluster.kwok import kwok_claim
from sft_operator.api import GROUP, PLURAL, VERSION

OUTPUT_CLAIM = "models"  # one per namespace, bound by kwok's volume stage


def path_for(obj: dict[str, Any]) -> str:
    ns = obj["metadata"]["namespace"]
    kind = obj["kind"]
    if kind == "ConfigMap":
        return f"/api/v1/namespaces/{ns}/configmaps"
    if kind == "Service":
        return f"/api/v1/namespaces/{ns}/services"
    if kind == "Job":
        return f"/apis/batch/v1/namespaces/{ns}/jobs"
    if kind == "PersistentVolumeClaim":
        return f"/api/v1/namespaces/{ns}/persistentvolumeclaims"
    if kind == "SFTJob":
        return f"/apis/{GROUP}/{VERSION}/namespaces/{ns}/{PLURAL}"
    raise ValueError(kind)


class Api:
    """A bare asyncio client on the admin kubeconfig (client certificate), JSON in and out."""

    def __init__(self, kubeconfig: Path, workdir: Path, concurrency: int) -> None:
        cfg = yaml.safe_load(kubeconfig.read_text())
        cluster = cfg["clusters"][0]["cluster"]
        user = cfg["users"][0]["user"]
        self.server = cluster["server"]
        files = {}
        for key, data in (("ca", cluster["certificate-authority-data"]), ("crt", user["client-certificate-data"]),
                          ("key", user["client-key-data"])):
            files[key] = workdir / f"bench-{key}.pem"
            files[key].write_bytes(base64.b64decode(data))
            files[key].chmod(0o600)
        self.ssl = ssl.create_default_context(cafile=str(files["ca"]))
        self.ssl.load_cert_chain(str(files["crt"]), str(files["key"]))
        self.concurrency = concurrency
        self.session: aiohttp.ClientSession | None = None
        self.watch_session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Api:  # noqa: PYI034
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self.ssl, limit=self.concurrency + 4))
        self.watch_session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self.ssl, limit=0))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.session and self.watch_session
        await self.session.close()
        await self.watch_session.close()

    async def request(self, method: str, path: str, body: Any = None, **params: str) -> tuple[int, Any]:
        assert self.session
        async with self.session.request(method, self.server + path, json=body, params=params or None) as resp:
            text = await resp.text()
            try:
                return resp.status, json.loads(text) if text else None
            except ValueError:
                return resp.status, text

    async def create(self, obj: dict[str, Any], tries: int = 6) -> dict[str, Any]:
        """POST; 409 AlreadyExists counts as created; 429/5xx/connection errors are retried."""
        delay = 0.2
        for attempt in range(tries):
            try:
                status, out = await self.request("POST", path_for(obj), obj)
            except aiohttp.ClientError as exc:
                status, out = 0, str(exc)
            if status in (200, 201, 202) or status == 409:
                return out if isinstance(out, dict) else {}
            if status not in (0, 429, 500, 502, 503, 504) or attempt == tries - 1:
                raise RuntimeError(f"create {obj['kind']} {obj['metadata']['name']}: HTTP {status}: {str(out)[:300]}")
            await asyncio.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    async def create_all(self, objs: list[dict[str, Any]]) -> tuple[float, float, list[dict[str, Any]]]:
        """Create every object with `concurrency` requests in flight; (start, end, created objects)."""
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(len(objs)):
            queue.put_nowait(i)
        out: list[dict[str, Any]] = [{} for _ in objs]

        async def worker() -> None:
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                out[i] = await self.create(objs[i])

        start = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(self.concurrency)))
        return start, time.monotonic(), out

    async def watch(self, path: str, on_event, **params: str) -> None:
        """Watch forever (cancel to stop), reconnecting from the last resourceVersion."""
        assert self.watch_session
        rv: str | None = None
        while True:
            query = {"watch": "1", "timeoutSeconds": "600", "allowWatchBookmarks": "true", **params}
            if rv:
                query["resourceVersion"] = rv
            try:
                timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=700)
                async with self.watch_session.get(self.server + path, params=query, timeout=timeout) as resp:
                    if resp.status != 200:
                        rv = None
                        await asyncio.sleep(0.5)
                        continue
                    buf = b""
                    async for chunk in resp.content.iter_any():
                        buf += chunk
                        while b"\n" in buf:
                            line, buf = buf.split(b"\n", 1)
                            if not line.strip():
                                continue
                            now = time.monotonic()
                            ev = json.loads(line)
                            obj = ev.get("object") or {}
                            if ev.get("type") == "ERROR":
                                rv = None  # 410 Gone: start over (first-seen times keep the earliest)
                                break
                            rv = (obj.get("metadata") or {}).get("resourceVersion") or rv
                            if ev.get("type") != "BOOKMARK":
                                on_event(ev["type"], obj, now)
            except asyncio.CancelledError:
                raise
            except (TimeoutError, aiohttp.ClientError, ValueError):
                await asyncio.sleep(0.5)

    async def text(self, path: str) -> str:
        assert self.session
        async with self.session.get(self.server + path) as resp:
            return await resp.text()

    async def save(self, path: str, out: Path) -> None:
        assert self.watch_session  # no slot of the request pool is held for the duration
        async with self.watch_session.get(self.server + path, timeout=aiohttp.ClientTimeout(total=None)) as resp:
            out.write_bytes(await resp.read())


async def ensure_namespace(api: Api, ns: str) -> None:
    status, out = await api.request("POST", "/api/v1/namespaces", {"metadata": {"name": ns}})
    if status not in (201, 409):
        raise RuntimeError(f"create namespace {ns}: HTTP {status}: {out}")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status, _ = await api.request("GET", f"/api/v1/namespaces/{ns}/serviceaccounts/default")
        if status == 200:
            break
        await asyncio.sleep(0.2)
    else:
        raise RuntimeError(f"no default ServiceAccount in {ns} after 60 s")
    status, out = await api.request("POST", f"/api/v1/namespaces/{ns}/persistentvolumeclaims",
                                    kwok_claim(OUTPUT_CLAIM))
    if status not in (201, 409):
        raise RuntimeError(f"create claim {ns}/{OUTPUT_CLAIM}: HTTP {status}: {out}")
