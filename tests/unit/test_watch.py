"""The children's watches against a fake API server over HTTP: a relist reads in pages, a relist
that fails keeps what the cache knew and lists again after a backoff, and no status is derived from
a cache whose pods were never listed (a restart must not rewrite a Running job as Pending)."""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any

import pytest

from .fake_apiserver import FakeApiServer
from sft_operator.runtime import watch
from sft_operator.runtime.context import Context
from sft_operator.runtime.client import Credentials, KubeClient
from sft_operator.core.render import RenderOptions
from sft_operator.runtime.settings import OperatorSettings

import builders

NS = "team-a"
PAGE_LIMIT = 500  # what the API server answers in one response here before it "times out"


# An old Job's finished pods, each with the pod spec a list answer carries (what the cache slims away).
pod = partial(builders.pod, phase="Succeeded", job="old", job_uid="j-old", resource_version="1",
              spec={"containers": [{"name": "trainer", "image": "trainer:1", "env": [{"name": "X", "value": "y" * 200}]}]})


def context(server: FakeApiServer) -> Context:
    ctx = Context(OperatorSettings(namespaces=(NS,), status_window_seconds=0.01), KubeClient(Credentials(server.url)),
                  RenderOptions())
    ctx.kick = lambda key, delay=0.0: None  # no reconciles: only the watches and the status writer are tested
    return ctx


async def until(predicate, seconds: float = 10.0) -> None:
    for _ in range(int(seconds / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


def cached_pods(ctx: Context) -> int:
    return sum(len(p) for p in ctx.cache.pods.values())


def test_a_relist_of_more_pods_than_one_answer_holds_reads_pages_and_caches_every_pod():
    async def main() -> None:
        async with FakeApiServer() as server:
            server.max_unpaged = PAGE_LIMIT
            for i in range(1234):
                server.add("Pod", pod(f"old-{i}", uid=f"p-old-{i}"))
            ctx = context(server)
            try:
                await watch.Watcher(ctx, "Pod", NS).relist()
                assert cached_pods(ctx) == 1234
                pages = server.pages_of("Pod")
                assert len(pages) == 3 and all(0 < int(p["limit"]) <= PAGE_LIMIT for p in pages)
                assert [p.get("continue") for p in pages] == [None, "500", "1000"]
                assert {p["labelSelector"] for p in pages} == {"sft.dev/job-name"}
            finally:
                await ctx.close()

    asyncio.run(main())


def test_a_relist_that_fails_midway_keeps_what_the_cache_knew_and_lists_again_after_a_backoff(monkeypatch):
    monkeypatch.setattr(watch, "RETRY_FIRST_SECONDS", 0.05)
    held_at_retry: list[int] = []

    async def main() -> None:
        async with FakeApiServer() as server:
            for i in range(1200):
                server.add("Pod", pod(f"old-{i}", uid=f"p-old-{i}"))
            ctx = context(server)
            watcher = watch.Watcher(ctx, "Pod", NS)
            try:
                await watcher.relist()  # what the cache knew: 1,200 pods (3 pages)
                assert cached_pods(ctx) == 1200
                del server.objects["Pod"][0]  # deleted while the watch was away
                server.fail_pages[("Pod", 5)] = 410  # the next list's second page: the continue token expired
                server.on_list = lambda kind, n: held_at_retry.append(cached_pods(ctx)) if n == 6 else None
                task = asyncio.create_task(watcher.run())
                await until(lambda: len(server.pages_of("Pod")) >= 8)  # the failed list, then a whole new one
                await until(lambda: cached_pods(ctx) == 1199)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                assert [p.get("continue") for p in server.pages_of("Pod")[3:8]] == [None, "500", None, "500", "1000"]
            finally:
                await ctx.close()

    asyncio.run(main())
    assert held_at_retry == [1200]  # nothing forgotten while the list was incomplete


def test_a_running_job_is_not_rewritten_as_pending_while_its_pods_cannot_be_listed(monkeypatch):
    monkeypatch.setattr(watch, "RETRY_FIRST_SECONDS", 0.05)
    sftjob = {"apiVersion": "sft.dev/v1alpha1", "kind": "SFTJob",
              "metadata": {"name": "live", "namespace": NS, "uid": "s-live", "generation": 1, "resourceVersion": "5",
                           "creationTimestamp": "2020-01-01T00:00:00Z"},
              "spec": {"model": {"source": "Qwen/Qwen2.5-0.5B"}, "dataset": {"train": {"source": "/d.jsonl"}},
                       "output": {"destination": "/tmp/out"}},
              "status": {"phase": "Running", "startTime": "2020-01-01T00:00:03Z", "jobName": "live"}}
    job = {"apiVersion": "batch/v1", "kind": "Job",
           "metadata": {"name": "live", "namespace": NS, "uid": "j-live", "labels": {"sft.dev/job-name": "live"},
                        "creationTimestamp": "2020-01-01T00:00:01Z",
                        "ownerReferences": [{"uid": "s-live", "controller": True, "kind": "SFTJob", "name": "live"}]},
           "spec": {"suspend": False}, "status": {"active": 1}}

    async def main() -> list[str]:
        async with FakeApiServer() as server:
            server.add("Job", job)
            server.add("Pod", pod("live-0", phase="Running", uid="p-live-0", job="live", job_uid="j-live"))
            server.always_fail["Pod"] = 504  # the pod list times out, again and again
            ctx = context(server)
            try:
                watchers = watch.start_watchers(ctx)
                await until(lambda: len(server.pages_of("Pod")) >= 3 and len(server.pages_of("Job")) >= 1)
                ctx.cache.put("SFTJob", sftjob)  # Kopf's watch goes on after the first lists' time-out
                ctx.writer.mark(("team-a", "live"))
                await asyncio.sleep(0.3)
                held = [p for p in server.status_patches]
                del server.always_fail["Pod"]
                await until(lambda: all(w.listed.is_set() for w in watchers))
                await asyncio.sleep(0.3)
                assert not held, f"a status was derived without the pods: {held}"
                return [op["value"]["phase"] for _, _, patch in server.status_patches for op in patch
                        if op["path"] == "/status"]
            finally:
                await ctx.close()

    assert asyncio.run(main()) == ["Running"]  # written once the pods are in, and Running


@pytest.mark.parametrize("namespaces", [(), ("team-*",)])
def test_cluster_wide_scopes_are_one_watch_per_kind(namespaces):
    assert watch.scopes(namespaces) == [(None, namespaces)]


def queued_sftjob_and_job() -> tuple[dict[str, Any], dict[str, Any]]:
    sftjob = {"apiVersion": "sft.dev/v1alpha1", "kind": "SFTJob",
              "metadata": {"name": "waits", "namespace": NS, "uid": "s-waits", "generation": 1, "resourceVersion": "5",
                           "creationTimestamp": "2020-01-01T00:00:00Z"},
              "spec": {"model": {"source": "Qwen/Qwen2.5-0.5B"}, "dataset": {"train": {"source": "/d.jsonl"}},
                       "output": {"destination": "/tmp/out"}, "scheduling": {"queueName": "team-a"}},
              "status": {"phase": "Pending", "jobName": "waits"}}
    job = {"apiVersion": "batch/v1", "kind": "Job",
           "metadata": {"name": "waits", "namespace": NS, "uid": "j-waits", "creationTimestamp": "2020-01-01T00:00:01Z",
                        "labels": {"sft.dev/job-name": "waits", "kueue.x-k8s.io/queue-name": "team-a"},
                        "ownerReferences": [{"uid": "s-waits", "controller": True, "kind": "SFTJob", "name": "waits"}]},
           "spec": {"suspend": True}, "status": {}}
    return sftjob, job


KUEUE_SAYS = "couldn't assign flavors to pod set main: insufficient unused quota for nvidia.com/gpu in flavor gpu, 1 more needed"


def written_messages(server: FakeApiServer) -> list[tuple[str, str]]:
    """(phase, the Queued condition's message) of every status written."""
    statuses = [op["value"] for _, _, patch in server.status_patches for op in patch if op["path"] == "/status"]
    return [(s["phase"], next(c["message"] for c in s["conditions"] if c["type"] == "Queued")) for s in statuses]


def test_a_job_kueue_holds_shows_kueues_own_message_from_its_workload():
    sftjob, job = queued_sftjob_and_job()
    workload = {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "Workload",
                "metadata": {"name": "job-waits-1a2b3", "namespace": NS, "uid": "w-1", "resourceVersion": "7",
                             "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": "waits",
                                                  "uid": "j-waits", "controller": True}]},
                "spec": {"queueName": "team-a", "podSets": [{"name": "main", "count": 1, "template": {"x": "y" * 100}}]},
                "status": {"conditions": [{"type": "QuotaReserved", "status": "False", "reason": "Pending",
                                           "message": KUEUE_SAYS, "lastTransitionTime": "2020-01-01T00:00:02Z"}]}}

    async def main() -> list[tuple[str, str]]:
        async with FakeApiServer() as server:
            server.add("Job", job)
            server.add("Workload", workload)
            ctx = context(server)
            try:
                watch.start_watchers(ctx)
                await until(lambda: ctx.cache.workload_of(("team-a", "waits"), "j-waits") is not None)
                await until(lambda: not ctx.unlisted)
                ctx.cache.put("SFTJob", sftjob)
                ctx.writer.mark(("team-a", "waits"))
                await until(lambda: server.status_patches)
                assert "podSets" not in str(ctx.cache.workload_of(("team-a", "waits"), "j-waits"))  # slimmed
                # A Workload of an earlier Job of the same name says nothing about this one.
                assert ctx.cache.workload_of(("team-a", "waits"), "j-other") is None
                return written_messages(server)
            finally:
                await ctx.close()

    assert asyncio.run(main()) == [("Queued", f"queue team-a (Kueue): {KUEUE_SAYS}")]


def test_without_kueue_a_queued_job_says_so_in_the_operators_words_and_the_absence_is_logged_once(monkeypatch, caplog):
    monkeypatch.setattr(watch, "OPTIONAL_RECHECK_SECONDS", 0.05)
    sftjob, job = queued_sftjob_and_job()

    async def main() -> list[tuple[str, str]]:
        async with FakeApiServer() as server:
            server.add("Job", job)
            server.always_fail["Workload"] = 404  # the API server does not serve kueue.x-k8s.io
            ctx = context(server)
            try:
                watchers = watch.start_watchers(ctx)
                assert {w.kind for w in watchers} == set(watch.WATCHED_KINDS)  # nobody waits for the optional one
                await until(lambda: len(server.pages_of("Workload")) >= 3)  # looked for again, later
                await until(lambda: not ctx.unlisted)
                ctx.cache.put("SFTJob", sftjob)
                ctx.writer.mark(("team-a", "waits"))
                await until(lambda: server.status_patches)
                return written_messages(server)
            finally:
                await ctx.close()

    with caplog.at_level("INFO", logger="sft_operator.runtime.watch"):
        written = asyncio.run(main())
    assert written == [("Queued", "the trainer Job is suspended until queue team-a admits it")]
    absent = [r.getMessage() for r in caplog.records if "Workload" in r.getMessage()]
    assert len(absent) == 1 and "not installed" in absent[0], absent
    assert not [r for r in caplog.records if r.levelname == "WARNING" and "Workload" in r.getMessage()]
