"""The operator's Kubernetes client: the call queue, timeouts, and the table of permitted calls."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest

from sft_operator.runtime.client import CREATE, PERMISSIONS, STATUS, ApiError, Credentials, KubeClient, PriorityGate


def test_status_writes_are_served_before_waiting_creates():
    order: list[str] = []

    async def call(name: str, wait: asyncio.Event | None = None) -> str:
        if wait is not None:
            await wait.wait()
        order.append(name)
        return name

    async def main() -> list[str]:
        gate = PriorityGate(slots=1)
        release = asyncio.Event()
        first = asyncio.ensure_future(gate(CREATE, call("first", release)))
        await asyncio.sleep(0.01)
        creates = [asyncio.ensure_future(gate(CREATE, call(f"create{i}"))) for i in range(2)]
        cancelled = asyncio.ensure_future(gate(STATUS, call("cancelled")))
        status = asyncio.ensure_future(gate(STATUS, call("status")))
        await asyncio.sleep(0.01)
        assert gate.stalled_seconds() > 0  # calls wait and none has finished since
        cancelled.cancel()
        release.set()
        results = await asyncio.gather(first, *creates, status)
        assert gate.free == 1 and gate.stalled_seconds() == 0
        return results

    assert asyncio.run(main()) == ["first", "create0", "create1", "status"]
    assert order == ["first", "status", "create0", "create1"]


@pytest.fixture
def black_hole():
    """A TCP server that accepts connections and never answers (a black-holed API server)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join(2)
    for conn in held:
        conn.close()
    server.close()


def test_a_call_to_a_server_that_never_answers_times_out_and_frees_its_slot(black_hole):
    async def main() -> tuple[ApiError, float, float]:
        client = KubeClient(Credentials(black_hole), slots=1, timeout_seconds=0.5)
        started = time.monotonic()
        try:
            with pytest.raises(ApiError) as exc:
                await client.get("Job", "a", "demo")
            took = time.monotonic() - started
            with pytest.raises(ApiError):  # the one slot is free again: the next call runs (and times out)
                await client.get("Job", "a", "demo")
            return exc.value, took, client.stalled_seconds()
        finally:
            await client.close()

    error, took, waiting = asyncio.run(main())
    assert error.status == 0 and "Timeout" in error.message
    assert took < 3 and waiting == 0


def test_a_call_outside_the_permission_table_is_refused_before_it_is_sent():
    async def main() -> None:
        client = KubeClient(Credentials("http://127.0.0.1:9"))
        with pytest.raises(PermissionError, match="delete jobs.batch"):
            await client.request("delete", "Job", "DELETE", "/apis/batch/v1/namespaces/a/jobs/demo")
        await client.close()

    asyncio.run(main())
    assert ("create", "batch", "jobs") in PERMISSIONS and ("delete", "batch", "jobs") not in PERMISSIONS
    assert not [p for p in PERMISSIONS if p[0] in ("update", "deletecollection") or "secrets" in p[2]]


def test_a_list_is_read_in_pages_each_within_the_timeout():
    """The periodic SFTJob relist and the event reads: 1,100 objects come as three answers, not one."""
    from .fake_apiserver import FakeApiServer

    async def main() -> tuple[int, list[dict[str, str]]]:
        async with FakeApiServer() as server:
            server.max_unpaged = 500  # a bigger answer "times out"
            for i in range(1100):
                server.add("SFTJob", {"metadata": {"name": f"job-{i}", "namespace": "a", "uid": f"u-{i}"}})
            client = KubeClient(Credentials(server.url))
            try:
                items = await client.list("SFTJob", "a", metadata_only=True)
            finally:
                await client.close()
            return len(items), server.pages_of("SFTJob")

    count, pages = asyncio.run(main())
    assert count == 1100
    assert [(p["limit"], p.get("continue")) for p in pages] == [("500", None), ("500", "500"), ("500", "1000")]


def test_a_watch_by_metadata_asks_for_partial_objects_and_reads_events_cut_anywhere_by_the_network():
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    events = [{"type": "ADDED", "object": {"kind": "PartialObjectMetadata", "metadata": {"name": f"s{i}", "labels": {
        "sft.dev/job-name": "é" * i}}}} for i in range(40)]
    accepts: list[str] = []

    async def serve(request: web.Request) -> web.StreamResponse:
        accepts.append(request.headers["Accept"])
        response = web.StreamResponse()
        await response.prepare(request)
        stream = b"".join(json.dumps(e, ensure_ascii=False).encode() + b"\n" for e in events) + b"\n"
        for start in range(0, len(stream), 7):  # events (and a 2-byte character) split across writes
            await response.write(stream[start:start + 7])
        return response

    async def main() -> list[dict]:
        app = web.Application()
        app.router.add_get("/api/v1/namespaces/a/services", serve)
        async with TestServer(app) as server:
            client = KubeClient(Credentials(str(server.make_url("")).rstrip("/")))
            try:
                return [e async for e in client.watch("Service", "a", resource_version="1", metadata_only=True)]
            finally:
                await client.close()

    assert asyncio.run(main()) == events
    assert accepts == ["application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"]
