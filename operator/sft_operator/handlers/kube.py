"""Thin, blocking Kubernetes calls (run in threads by the async handlers); plain dicts in and out."""

from __future__ import annotations

import asyncio
import json
import os
from collections import deque
from dataclasses import dataclass
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from .. import GROUP, PLURAL, VERSION

MERGE_PATCH = "application/merge-patch+json"  # predictable for built-ins and custom resources alike
# Blocking Kubernetes calls of the reconcile path (child creates, status patches) share a fixed
# number of slots, and a waiting status patch takes the next free slot before any waiting create:
# in a burst a status patch no longer queues behind every create submitted before it, while the
# API server sees no more concurrent calls than before (more, it was measured, slows creation).
CALL_SLOTS = min(32, (os.cpu_count() or 1) + 4)  # the size of asyncio.to_thread's default executor
STATUS, CREATE = 0, 1  # priorities, lower first


class CallGate:
    """At most ``slots`` blocking calls in threads at once; waiters served by priority, then FIFO."""

    def __init__(self, slots: int = CALL_SLOTS) -> None:
        self.free = slots
        self.waiting: tuple[deque[asyncio.Future], ...] = (deque(), deque())

    async def run(self, priority: int, fn: Any, /, *args: Any) -> Any:
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
                raise
        try:
            return await asyncio.to_thread(fn, *args)
        finally:
            self._release()

    def _release(self) -> None:
        for queue in self.waiting:
            while queue:
                turn = queue.popleft()
                if not turn.done():
                    turn.set_result(None)
                    return
        self.free += 1


def api_client() -> client.ApiClient:
    """In-cluster credentials when running in a pod, otherwise $KUBECONFIG / ~/.kube/config."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


def _json(response: Any) -> dict[str, Any]:
    return json.loads(response.data)


@dataclass
class Kube:
    api: client.ApiClient

    def __post_init__(self) -> None:
        self.core = client.CoreV1Api(self.api)
        self.batch = client.BatchV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)

    # ---- children ----

    def _create_fn(self, kind: str):
        return {
            "ConfigMap": self.core.create_namespaced_config_map,
            "Service": self.core.create_namespaced_service,
            "Job": self.batch.create_namespaced_job,
        }[kind]

    def _read_fn(self, kind: str):
        return {
            "ConfigMap": self.core.read_namespaced_config_map,
            "Service": self.core.read_namespaced_service,
            "Job": self.batch.read_namespaced_job,
        }[kind]

    def _patch_fn(self, kind: str):
        return {
            "ConfigMap": self.core.patch_namespaced_config_map,
            "Service": self.core.patch_namespaced_service,
            "Job": self.batch.patch_namespaced_job,
        }[kind]

    def create(self, body: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
        """Create the child; (True, it) when created, (False, the existing one) on 409 AlreadyExists."""
        kind, meta = body["kind"], body["metadata"]
        try:
            return True, _json(self._create_fn(kind)(meta["namespace"], body, _preload_content=False))
        except ApiException as exc:
            if exc.status != 409:
                raise
        return False, self.read(kind, meta["namespace"], meta["name"])

    def read(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        return _json(self._read_fn(kind)(name, namespace, _preload_content=False))

    def patch(self, kind: str, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        return _json(self._patch_fn(kind)(name, namespace, patch, _content_type=MERGE_PATCH, _preload_content=False))

    def list_labelled(self, kind: str, namespace: str | None, selector: str) -> list[dict[str, Any]]:
        if kind == "Job":
            fn = self.batch.list_namespaced_job if namespace else self.batch.list_job_for_all_namespaces
        else:
            fn = self.core.list_namespaced_pod if namespace else self.core.list_pod_for_all_namespaces
        args = (namespace,) if namespace else ()
        return _json(fn(*args, label_selector=selector, _preload_content=False)).get("items", [])

    def failed_create_message(self, namespace: str, job_name: str, job_uid: str) -> str | None:
        """The newest FailedCreate event of the Job (e.g. a pod rejected by a ResourceQuota)."""
        selector = f"involvedObject.kind=Job,involvedObject.name={job_name},involvedObject.uid={job_uid},reason=FailedCreate"
        items = _json(self.core.list_namespaced_event(namespace, field_selector=selector, _preload_content=False))["items"]
        if not items:
            return None
        newest = max(items, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")
        return newest.get("message")

    # ---- SFTJobs ----

    def patch_status(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        return _json(
            self.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, PLURAL, name, {"status": patch},
                _content_type=MERGE_PATCH, _preload_content=False,
            )
        )

    def delete_sftjob(self, namespace: str, name: str, uid: str) -> None:
        """Delete exactly this SFTJob (uid precondition): a recreated one of the same name survives."""
        try:
            self.custom.delete_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name,
                body={"preconditions": {"uid": uid}, "propagationPolicy": "Background"},
            )
        except ApiException as exc:
            if exc.status not in (404, 409):
                raise
