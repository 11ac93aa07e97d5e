"""A small stand-in for the API server's list, watch and status-patch calls, over real HTTP, so the
operator's own client (``sft_operator.runtime.client``) is what talks to it.

Lists page like the API server: ``limit`` and ``continue``, one resourceVersion for every page of a
list. ``max_unpaged`` makes a list that would answer more objects than that in one response fail
(what a 30 s timeout on 10,000 pods looks like); ``fail_pages`` makes the n-th page request of a
kind fail with a status (410 Expired: the continue token outlived etcd's compaction). Watches stay
open and send nothing. Status patches are recorded and answered with the patched object.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

PLURALS = {"pods": "Pod", "jobs": "Job", "configmaps": "ConfigMap", "services": "Service",
           "persistentvolumeclaims": "PersistentVolumeClaim", "sftjobs": "SFTJob", "events": "Event",
           "workloads": "Workload"}


class FakeApiServer:
    def __init__(self) -> None:
        self.objects: dict[str, list[dict[str, Any]]] = defaultdict(list)  # kind -> objects
        self.lists: list[tuple[str, dict[str, str]]] = []  # (kind, query) of every list call
        self.status_patches: list[tuple[str, str, list[dict[str, Any]]]] = []
        self.max_unpaged: int | None = None
        self.fail_pages: dict[tuple[str, int], int] = {}  # (kind, n-th list call of it, from 1) -> HTTP status
        self.always_fail: dict[str, int] = {}  # kind -> HTTP status of every list
        self.on_list: Any = None  # (kind, n-th list call of it) -> None, called as each list call arrives
        self.version = 100
        self.server: TestServer | None = None

    def add(self, kind: str, obj: dict[str, Any]) -> None:
        self.objects[kind].append(obj)

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")

    def pages_of(self, kind: str) -> list[dict[str, str]]:
        return [query for k, query in self.lists if k == kind]

    async def __aenter__(self) -> FakeApiServer:
        app = web.Application()
        app.router.add_get("/api/v1/namespaces/{ns}/{plural}", self._list)
        app.router.add_get("/apis/{group}/{version}/namespaces/{ns}/{plural}", self._list)
        app.router.add_patch("/apis/{group}/{version}/namespaces/{ns}/{plural}/{name}/status", self._patch_status)
        self.server = TestServer(app)
        await self.server.start_server()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self.server is not None
        await self.server.close()

    @staticmethod
    def _error(status: int, reason: str) -> web.Response:
        return web.json_response({"kind": "Status", "status": "Failure", "code": status, "reason": reason,
                                  "message": f"{reason} (fake API server)"}, status=status)

    async def _list(self, request: web.Request) -> web.StreamResponse:
        kind = PLURALS[request.match_info["plural"]]
        query = dict(request.query)
        if query.get("watch"):
            response = web.StreamResponse()
            await response.prepare(request)
            await asyncio.sleep(3600)  # an idle watch, until the client goes
            return response
        self.lists.append((kind, query))
        if self.on_list is not None:
            self.on_list(kind, len(self.pages_of(kind)))
        if kind in self.always_fail:
            return self._error(self.always_fail[kind], "InternalError")
        failing = self.fail_pages.get((kind, len(self.pages_of(kind))))
        if failing is not None:
            return self._error(failing, "Expired" if failing == 410 else "InternalError")
        items = [o for o in self.objects[kind] if o["metadata"].get("namespace") == request.match_info["ns"]]
        start = int(query.get("continue") or 0)
        limit = int(query.get("limit") or 0) or len(items)
        if self.max_unpaged is not None and limit > self.max_unpaged:
            return self._error(504, "Timeout")
        page = items[start:start + limit]
        meta: dict[str, Any] = {"resourceVersion": str(self.version)}
        if start + limit < len(items):
            meta["continue"] = str(start + limit)
            meta["remainingItemCount"] = len(items) - start - limit
        return web.json_response({"kind": f"{kind}List", "apiVersion": "v1", "metadata": meta, "items": page})

    async def _patch_status(self, request: web.Request) -> web.Response:
        patch = json.loads(await request.read())
        self.status_patches.append((request.match_info["ns"], request.match_info["name"], patch))
        self.version += 1
        status = next(op["value"] for op in patch if op["path"] == "/status")
        uid = next(op["value"] for op in patch if op["path"] == "/metadata/uid")
        return web.json_response({"metadata": {"name": request.match_info["name"], "namespace": request.match_info["ns"],
                                               "uid": uid, "resourceVersion": str(self.version)}, "status": status})
