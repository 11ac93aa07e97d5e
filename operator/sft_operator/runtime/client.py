"""The one Kubernetes client of the operator and ``sftctl status``/``watch``: asyncio + aiohttp, plain
dicts in and out, a timeout on every call. Logging in (in-cluster, kubeconfig, exec plugins) is
``sft_operator.runtime.credentials``.

Measured before choosing (BENCHMARKS.md, "Kubernetes client"): creating 600 ConfigMaps with 16 in
flight, aiohttp costs 0.55 ms of client CPU per create, kubernetes_asyncio 1.3 ms and the
kubernetes client in threads (what this replaced) 1.9 ms, and it adds no thread pool. Kopf already
depends on aiohttp; its watches keep their own connections. JSON goes through orjson, which decodes a
trainer pod's watch event in about half the standard library's time (BENCHMARKS.md, "JSON").

Every call the operator makes is listed in ``PERMISSIONS`` (verb, API group, resource); a call
outside it fails at once, so the chart's RBAC (tests/unit/test_helm_chart.py) can be checked
against the table (``sftctl`` passes its own, read-only table). Calls share ``slots`` connections
and wait in two queues: status writes go ahead of creates (in a burst a pod that starts is
reflected in seconds, not after the whole creation backlog), and Events behind everything else.
``stalled_seconds`` tells liveness when calls stop getting through.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from sft_operator.api import GROUP, PLURAL, VERSION
from sft_operator.runtime.credentials import Credentials, load_credentials

JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
METADATA_LIST = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"
METADATA = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"  # one object, or each watch event's
STATUS, CREATE, EVENT = 0, 1, 2  # queue priorities, lower first: Events wait until a burst's creates are done
DEFAULT_SLOTS = 16  # calls in flight; the benchmark's bare client uses as many
DEFAULT_TIMEOUT_SECONDS = 30.0
LIST_PAGE_SIZE = 500  # objects per list call, as client-go's reflectors ask
CONNECT_TIMEOUT_SECONDS = 10.0

# kind -> (API group, version, plural)
RESOURCES: dict[str, tuple[str, str, str]] = {
    "SFTJob": (GROUP, VERSION, PLURAL),
    "ConfigMap": ("", "v1", "configmaps"),
    "Service": ("", "v1", "services"),
    "Job": ("batch", "v1", "jobs"),
    "Pod": ("", "v1", "pods"),
    "PersistentVolumeClaim": ("", "v1", "persistentvolumeclaims"),
    "Event": ("", "v1", "events"),
    "TokenReview": ("authentication.k8s.io", "v1", "tokenreviews"),
    "Workload": ("kueue.x-k8s.io", "v1beta2", "workloads"),  # Kueue's, read only (see watch.OPTIONAL_KINDS)
}

# (verb, API group, resource): every call this client makes, and why.
PERMISSIONS: frozenset[tuple[str, str, str]] = frozenset({
    ("create", "", "configmaps"),  # children
    ("create", "", "services"),
    ("create", "batch", "jobs"),
    ("get", "", "configmaps"),  # on 409: ours, or a name conflict?
    ("get", "", "services"),
    ("get", "batch", "jobs"),
    ("patch", "", "configmaps"),  # keep config.json and the progress CA current (CA rotation)
    ("patch", "batch", "jobs"),  # spec.suspend: runPolicy.suspend, and stopping a failed job's pods
    ("list", "", "configmaps"),  # the children's watches (sft_operator.runtime.watch) list, then watch
    ("list", "", "services"),
    ("list", "batch", "jobs"),
    ("list", "", "pods"),
    ("watch", "", "configmaps"),
    ("watch", "", "services"),
    ("watch", "batch", "jobs"),
    ("watch", "", "pods"),
    ("list", GROUP, PLURAL),  # the periodic relist (deletions Kopf's watch missed)
    ("get", "", "pods"),  # the progress endpoint: the calling pod
    ("get", GROUP, PLURAL),  # the progress endpoint: the SFTJob it reports for
    ("patch", GROUP, f"{PLURAL}/status"),  # the one status writer
    ("delete", GROUP, PLURAL),  # ttlSecondsAfterFinished
    ("create", "", "persistentvolumeclaims"),  # the cache claim <job>-cache (docs/storage.md)
    ("list", "", "persistentvolumeclaims"),  # ... watched like the other children
    ("watch", "", "persistentvolumeclaims"),
    ("get", "", "persistentvolumeclaims"),  # nodes > 1: a ReadWriteOnce claim; on 409: ours?
    ("patch", "", "persistentvolumeclaims"),  # release the cache claim of a model whose export failed
    ("create", "", "events"),  # Warning events a person acts on
    ("list", "", "events"),  # why pods are not created (FailedCreate) or stuck (FailedMount, Multi-Attach)
    ("create", "authentication.k8s.io", "tokenreviews"),  # progress endpoint authentication
    ("list", "kueue.x-k8s.io", "workloads"),  # Kueue's own message for a queued job (when Kueue is installed)
    ("watch", "kueue.x-k8s.io", "workloads"),
})

# Not a call: under OwnerReferencesPermissionEnforcement (on by default in OpenShift) creating a child
# whose ownerReference sets blockOwnerDeletion needs update on the owner's finalizers subresource.
OWNER_REFERENCE_PERMISSIONS: frozenset[tuple[str, str, str]] = frozenset({("update", GROUP, f"{PLURAL}/finalizers")})


class ApiError(Exception):
    """An API call that failed: the HTTP status (0 when the server was not reached), the Status
    object's reason (e.g. AlreadyExists, Invalid) and the server's message."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


def resource_path(kind: str, namespace: str | None, name: str | None = None, subresource: str | None = None) -> str:
    group, version, plural = RESOURCES[kind]
    path = f"/api/{version}" if not group else f"/apis/{group}/{version}"
    if namespace:
        path += f"/namespaces/{namespace}"
    path += f"/{plural}"
    if name:
        path += f"/{name}"
    if subresource:
        path += f"/{subresource}"
    return path


class PriorityGate:
    """At most ``slots`` calls in flight; waiters are served by priority, then in arrival order."""

    def __init__(self, slots: int) -> None:
        self.free = slots
        self.waiting: tuple[deque[asyncio.Future[None]], ...] = (deque(), deque(), deque())
        self._started: dict[int, float] = {}  # id of a call -> when it began waiting
        self._last_done = time.monotonic()

    async def __call__(self, priority: int, call: Any) -> Any:
        token = id(call)
        self._started[token] = time.monotonic()
        try:
            if self.free > 0 and not any(self.waiting):
                self.free -= 1
            else:
                turn = asyncio.get_running_loop().create_future()
                self.waiting[priority].append(turn)
                try:
                    await turn
                except asyncio.CancelledError:
                    if turn.done() and not turn.cancelled():  # the slot was ours already: pass it on
                        self._release()
                    call.close()  # never started
                    raise
            try:
                return await call
            finally:
                self._last_done = time.monotonic()
                self._release()
        finally:
            self._started.pop(token, None)

    def _release(self) -> None:
        for queue in self.waiting:
            while queue:
                turn = queue.popleft()
                if not turn.done():
                    turn.set_result(None)
                    return
        self.free += 1

    def stalled_seconds(self) -> float:
        """How long calls have been waiting or in flight without any call finishing (0 when none waits).
        A long queue in a burst is not a stall: calls keep finishing."""
        if not self._started:
            return 0.0
        return time.monotonic() - max(self._last_done, min(self._started.values()))


def _status_error(status: int, text: str) -> ApiError:
    try:
        body = json.loads(text)
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    return ApiError(status, str(body.get("reason") or ""), str(body.get("message") or text.strip() or f"HTTP {status}"))


class KubeClient:
    """Plain-dict calls to the API server; every call carries a timeout and a ``PERMISSIONS`` check."""

    def __init__(
        self,
        credentials: Credentials,
        *,
        slots: int = DEFAULT_SLOTS,
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
        field_manager: str = "sft-operator",
        refresh: Any = None,
        permissions: frozenset[tuple[str, str, str]] = PERMISSIONS,
    ) -> None:
        self.credentials = credentials
        # () -> Credentials: called when an exec plugin's credentials expire, and tried once on 401
        self.refresh = refresh
        self.permissions = permissions  # sftctl reads with its own, smaller table
        self.timeout = aiohttp.ClientTimeout(total=timeout_seconds, connect=CONNECT_TIMEOUT_SECONDS)
        self.gate = PriorityGate(slots)
        self.slots = slots
        self.field_manager = field_manager
        self._session: aiohttp.ClientSession | None = None
        self._watch_session: aiohttp.ClientSession | None = None
        self._token: tuple[float, str | None] = (-1.0, credentials.token)
        self._renewing = asyncio.Lock()

    @classmethod
    def from_kubeconfig(cls, path: str | None = None, **kwargs: Any) -> KubeClient:
        """In-cluster credentials in a pod, otherwise the kubeconfig (``path``, $KUBECONFIG, ~/.kube/config)."""
        return cls(load_credentials(path), refresh=lambda: load_credentials(path), **kwargs)

    async def close(self) -> None:
        for session in (self._session, self._watch_session):
            if session is not None:
                await session.close()
        self._session = self._watch_session = None

    def _session_now(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=self.credentials.ssl_context(), limit=self.slots + 4)
            self._session = aiohttp.ClientSession(
                self.credentials.server, connector=connector, timeout=self.timeout, json_serialize=json.dumps
            )
        return self._session

    def _watch_session_now(self) -> aiohttp.ClientSession:
        """Watches are long-lived: their own connections, never counted against the call slots."""
        if self._watch_session is None or self._watch_session.closed:
            self._watch_session = aiohttp.ClientSession(
                self.credentials.server, connector=aiohttp.TCPConnector(ssl=self.credentials.ssl_context(), limit=0)
            )
        return self._watch_session

    def _bearer(self) -> str | None:
        path = self.credentials.token_file
        if not path:
            return self.credentials.token
        try:
            mtime = os.stat(path).st_mtime
            if mtime != self._token[0]:
                self._token = (mtime, Path(path).read_text().strip())
        except OSError:
            pass
        return self._token[1]

    def stalled_seconds(self) -> float:
        return self.gate.stalled_seconds()

    async def request(
        self,
        verb: str,
        kind: str,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: dict[str, str] | None = None,
        content_type: str = JSON,
        accept: str = JSON,
        priority: int = CREATE,
        subresource: str | None = None,
    ) -> Any:
        group, _, plural = RESOURCES[kind]
        resource = f"{plural}/{subresource}" if subresource else plural
        if (verb, group, resource) not in self.permissions:
            raise PermissionError(f"{verb} {resource}.{group or 'core'} is not in kube.PERMISSIONS")
        await self._renew_if_expired()
        data = orjson.dumps(body) if body is not None else None

        async def call() -> Any:
            headers = {"Accept": accept}
            if body is not None:
                headers["Content-Type"] = content_type
            token = self._bearer()
            if token:
                headers["Authorization"] = f"Bearer {token}"
            try:
                async with self._session_now().request(method, path, data=data, params=params, headers=headers) as resp:
                    raw = await resp.read()
                    if resp.status >= 400:
                        raise _status_error(resp.status, raw.decode(errors="replace"))
                    return orjson.loads(raw) if raw else {}
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise ApiError(0, "Unreachable", f"{method} {path}: {type(exc).__name__}: {exc}") from exc

        try:
            return await self.gate(priority, call())
        except ApiError as exc:
            if exc.status != 401 or self.refresh is None:
                raise
            await self._reauthenticate()
            return await self.gate(priority, call())

    async def _renew_if_expired(self) -> None:
        if self.refresh is None or not self.credentials.expired():
            return
        async with self._renewing:  # calls that find it expired together run the plugin once
            if self.credentials.expired():
                await self._reauthenticate()

    async def _reauthenticate(self) -> None:
        old = self.credentials
        self.credentials = await asyncio.to_thread(self.refresh)
        self._token = (-1.0, self.credentials.token)
        tls = ("server", "ca_file", "insecure", "cert_file", "key_file")
        if all(getattr(old, f) == getattr(self.credentials, f) for f in tls):
            return  # a new token only: each call reads it, the connections stay
        for session in (self._session, self._watch_session):
            if session is not None:
                await session.close()
        self._session = self._watch_session = None

    # ---- objects ----

    async def create(self, obj: dict[str, Any], *, priority: int = CREATE, metadata_only: bool = False) -> dict[str, Any]:
        """Create ``obj``; raises ApiError (409 AlreadyExists included). ``metadata_only``: the answer is the
        created object's metadata (a PartialObjectMetadata), not the whole object sent back."""
        kind, namespace = obj["kind"], obj["metadata"].get("namespace")
        return await self.request("create", kind, "POST", resource_path(kind, namespace), body=obj,
                                  params={"fieldManager": self.field_manager}, priority=priority,
                                  accept=METADATA if metadata_only else JSON)

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        return await self.request("get", kind, "GET", resource_path(kind, namespace, name))

    async def patch(self, kind: str, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        return await self.request("patch", kind, "PATCH", resource_path(kind, namespace, name), body=patch,
                                  params={"fieldManager": self.field_manager}, content_type=MERGE_PATCH)

    async def list_pages(
        self, kind: str, namespace: str | None, *, label_selector: str | None = None, metadata_only: bool = False,
        field_selector: str | None = None, priority: int = CREATE, page_size: int = LIST_PAGE_SIZE,
    ) -> AsyncIterator[tuple[list[dict[str, Any]], str]]:
        """A list, one page (at most ``page_size`` objects) at a time, with the list's resourceVersion (the
        same on every page: the API server serves the pages from one snapshot). Each page is its own call
        with its own timeout, and only one page is decoded at a time: 10,000 pods are 20 small answers,
        not one that outlasts the timeout and the memory limit. A continue token that outlived etcd's
        compaction fails the list with 410; the caller lists again from the start."""
        params = {"limit": str(page_size)}
        if label_selector:
            params["labelSelector"] = label_selector
        if field_selector:
            params["fieldSelector"] = field_selector
        path = resource_path(kind, namespace)
        while True:
            out = await self.request("list", kind, "GET", path, params=params,
                                     accept=METADATA_LIST if metadata_only else JSON, priority=priority)
            meta = out.get("metadata") or {}
            yield out.pop("items", None) or [], str(meta.get("resourceVersion") or "")  # not kept here: one page alive
            if not meta.get("continue"):
                return
            params = {**params, "continue": str(meta["continue"])}

    async def list(
        self, kind: str, namespace: str | None, *, label_selector: str | None = None, metadata_only: bool = False,
        field_selector: str | None = None, priority: int = CREATE,
    ) -> list[dict[str, Any]]:
        """Every object (read in pages, see ``list_pages``)."""
        items: list[dict[str, Any]] = []
        async for page, _ in self.list_pages(kind, namespace, label_selector=label_selector,
                                             metadata_only=metadata_only, field_selector=field_selector,
                                             priority=priority):
            items.extend(page)
        return items

    async def watch(self, kind: str, namespace: str | None, *, resource_version: str,
                    label_selector: str | None = None, field_selector: str | None = None,
                    timeout_seconds: int = 300, metadata_only: bool = False) -> AsyncIterator[dict[str, Any]]:
        """Watch events (ADDED, MODIFIED, DELETED, BOOKMARK, ERROR) until the server ends the stream;
        ``metadata_only``: each event's object is a PartialObjectMetadata (kind, apiVersion of meta.k8s.io).

        Each event is decoded and handed over before the next is read: a consumer that falls behind
        slows the stream down (TCP) instead of piling decoded objects up in memory."""
        group, _, plural = RESOURCES[kind]
        if ("watch", group, plural) not in self.permissions:
            raise PermissionError(f"watch {plural}.{group or 'core'} is not in kube.PERMISSIONS")
        await self._renew_if_expired()
        params = {"watch": "1", "allowWatchBookmarks": "true", "timeoutSeconds": str(timeout_seconds),
                  "resourceVersion": resource_version}
        if label_selector:
            params["labelSelector"] = label_selector
        if field_selector:
            params["fieldSelector"] = field_selector
        headers = {"Accept": METADATA if metadata_only else JSON}
        token = self._bearer()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        timeout = aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT_SECONDS, sock_read=timeout_seconds + 30)
        path = resource_path(kind, namespace)
        try:
            async with self._watch_session_now().get(path, params=params, headers=headers, timeout=timeout) as resp:
                if resp.status >= 400:
                    raise _status_error(resp.status, await resp.text())
                buffer = bytearray()
                async for chunk in resp.content.iter_chunked(64 * 1024):
                    buffer += chunk
                    start = 0  # lines are cut by offset: splitting off each line would copy the rest of the chunk
                    while (end := buffer.find(b"\n", start)) >= 0:
                        line = buffer[start:end]
                        start = end + 1
                        if line.strip():
                            yield orjson.loads(line)
                    del buffer[:start]
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ApiError(0, "Unreachable", f"watch {path}: {type(exc).__name__}: {exc}") from exc

    # ---- SFTJobs ----

    async def replace_status(self, namespace: str, name: str, uid: str, status: dict[str, Any]) -> dict[str, Any]:
        """Write the whole status of exactly this SFTJob: a JSON patch whose first operation tests the
        uid, so a write meant for a deleted SFTJob never lands on a new one of the same name (422)."""
        patch = [{"op": "test", "path": "/metadata/uid", "value": uid}, {"op": "add", "path": "/status", "value": status}]
        return await self.request("patch", "SFTJob", "PATCH", resource_path("SFTJob", namespace, name, "status"),
                                  body=patch, params={"fieldManager": self.field_manager}, content_type=JSON_PATCH,
                                  priority=STATUS, subresource="status")

    async def delete_sftjob(self, namespace: str, name: str, uid: str) -> None:
        """Delete exactly this SFTJob (uid precondition): a re-created one of the same name survives."""
        try:
            await self.request("delete", "SFTJob", "DELETE", resource_path("SFTJob", namespace, name),
                               body={"preconditions": {"uid": uid}, "propagationPolicy": "Background"})
        except ApiError as exc:
            if exc.status not in (404, 409):
                raise

    # ---- events and reviews ----

    async def post_event(self, involved: dict[str, Any], kind: str, reason: str, message: str,
                         component: str = "sft-operator") -> None:
        """A core/v1 Event about ``involved`` (an object with apiVersion, kind and metadata)."""
        meta = involved["metadata"]
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": involved.get("apiVersion"), "kind": involved.get("kind"),
                               "name": meta["name"], "namespace": meta["namespace"], "uid": meta.get("uid")},
            "type": kind,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": component},
            "reportingComponent": component,
            "reportingInstance": component,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        await self.request("create", "Event", "POST", resource_path("Event", meta["namespace"]), body=event,
                           priority=EVENT)

    async def events_of(self, namespace: str, kind: str, name: str, uid: str) -> list[dict[str, Any]]:
        selector = f"involvedObject.kind={kind},involvedObject.name={name},involvedObject.uid={uid}"
        # A scan of the namespace's events for the API server: after a burst's creates, like posting Events.
        return await self.list("Event", namespace, field_selector=selector, priority=EVENT)

    async def token_review(self, token: str, audiences: list[str]) -> dict[str, Any]:
        review = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                  "spec": {"token": token, "audiences": audiences}}
        out = await self.request("create", "TokenReview", "POST", resource_path("TokenReview", None), body=review)
        return out.get("status") or {}
