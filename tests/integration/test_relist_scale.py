"""An operator restart among 10,000 finished trainer pods (issue #19, defect 8), on the real control plane.

The pods are copies of a real trainer pod (the Job's pod template, as the operator renders it), bound
to a simulated GPU node that has since gone away (a Node object no kubelet or kwok serves, so its pods
take two writes each: created, then reported Succeeded), as a cluster that has run many jobs keeps
them.
The operator restarts while one SFTJob runs. Before the fix it listed every labelled pod in one
answer, decoded whole: its memory peaked at 903 MiB here, past the chart's 512 Mi limit (a restart
loop, OOMKilled), and a list that failed left the cache without pods, so the running job was
rewritten as Pending. After it: 21 pages, 133 MiB, the job Running throughout.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sft_devcluster.kwok import KWOK_NODE_ANNOTATION, kwok_node

from sft_operator.runtime.credentials import kubeconfig_credentials
from sft_operator.core.render import LABEL_JOB

from support import OperatorProcess

from .sftjob_cluster import PULL_GRACE, Cluster, metric

pytestmark = [pytest.mark.cluster, pytest.mark.slow]  # about 2 minutes on 2 cores

PODS = 10_000
JOBS = 100  # the finished pods belong to this many (long gone) SFTJobs
MEMORY_LIMIT_MIB = 512  # the chart's default memory limit of the operator container
IN_FLIGHT = 24
NODE = "retired-gpu-0"


async def _calls(kubeconfig: Path, calls: list[tuple[str, str, dict[str, Any] | None, str]]) -> None:
    """Many API calls at once (method, path, body, content type); any failure fails the test."""
    creds = kubeconfig_credentials(str(kubeconfig))
    slots = asyncio.Semaphore(IN_FLIGHT)
    connector = aiohttp.TCPConnector(ssl=creds.ssl_context(), limit=IN_FLIGHT)
    headers = {"Authorization": f"Bearer {creds.token}"} if creds.token else {}
    async with aiohttp.ClientSession(creds.server, connector=connector, headers=headers) as session:

        async def one(method: str, path: str, body: dict[str, Any] | None, content_type: str) -> None:
            async with slots:
                data = json.dumps(body) if body is not None else None
                async with session.request(method, path, data=data, headers={"Content-Type": content_type}) as resp:
                    if resp.status >= 300:
                        raise AssertionError(f"{method} {path}: {resp.status} {await resp.text()}")
                    await resp.read()

        await asyncio.gather(*(one(*call) for call in calls))


def finished_pods(template: dict[str, Any], namespace: str) -> list[dict[str, Any]]:
    """Bare copies of the trainer pod: our labels only (the Job controller's would make the running Job
    adopt them), bound to the retired node, tolerating its unreachable taint (or they would be evicted)."""
    labels = {k: v for k, v in (template["metadata"].get("labels") or {}).items()
              if not (k.startswith("batch.kubernetes.io/") or k in ("controller-uid", "job-name"))}
    pods = []
    for i in range(PODS):
        job = f"done-{i % JOBS}"
        spec = copy.deepcopy(template["spec"])
        spec.update(nodeName=NODE, restartPolicy="Never", tolerations=[{"operator": "Exists"}])
        pods.append({"apiVersion": "v1", "kind": "Pod", "spec": spec,
                     "metadata": {"name": f"{job}-{i}", "namespace": namespace, "labels": {**labels, LABEL_JOB: job},
                                  "annotations": template["metadata"].get("annotations") or {}}})
    return pods


def succeeded(pod: dict[str, Any]) -> dict[str, Any]:
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    done = {"terminated": {"exitCode": 0, "reason": "Completed", "startedAt": now, "finishedAt": now}}
    return {"status": {
        "phase": "Succeeded",
        "conditions": [{"type": "Ready", "status": "False", "reason": "PodCompleted", "lastTransitionTime": now}],
        "containerStatuses": [{"name": c["name"], "image": c["image"], "imageID": "", "ready": False, "restartCount": 0,
                               "started": False, "state": done} for c in pod["spec"]["containers"]],
    }}


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


def test_a_restart_among_10000_finished_pods_lists_them_in_pages_and_a_running_job_stays_running(
        control_plane, namespace, tmp_path):
    k8s = Cluster(control_plane, namespace)
    op = OperatorProcess.plaintext(control_plane.kubeconfig, tmp_path / "operator.log", namespace,
                                   "--pod-start-grace-seconds", str(PULL_GRACE), "--resync-seconds", "1")
    op.start()
    try:
        k8s.launch("live", {"sft.dev/kwok-hold": "true"})
        k8s.wait_phase("live", "Running", timeout=40)
    finally:
        op.kill()
    template = json.loads(k8s.batch.read_namespaced_job("live", namespace, _preload_content=False).data)["spec"]["template"]
    pods = finished_pods(template, namespace)
    base = f"/api/v1/namespaces/{namespace}/pods"
    node = kwok_node(NODE, tainted=True)
    del node["metadata"]["annotations"][KWOK_NODE_ANNOTATION[0]]  # no kwok: nothing runs its pods
    if not k8s.core.list_node(field_selector=f"metadata.name={NODE}").items:
        k8s.core.create_node(node)
    started = time.monotonic()
    asyncio.run(_calls(control_plane.kubeconfig, [("POST", base, pod, "application/json") for pod in pods]))
    created = time.monotonic()
    asyncio.run(_calls(control_plane.kubeconfig, [
        ("PATCH", f"{base}/{pod['metadata']['name']}/status", succeeded(pod), "application/merge-patch+json")
        for pod in pods]))
    print(f"10,000 finished pods: created in {created - started:.0f}s, Succeeded in {time.monotonic() - created:.0f}s")

    phases: list[str] = []
    stop = threading.Event()

    def watch_phase() -> None:  # what `kubectl get sftjob live -w` shows during the restart
        while not stop.is_set():
            phases.append(k8s.status("live").get("phase", ""))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch_phase, daemon=True)
    watcher.start()
    try:
        op.start(timeout=120)
        listed = k8s.cp.wait_for(lambda: re.search(r"listed (\d+) Pods in \S+ in (\d+) pages", op.log_path.read_text()),
                                 60, "the operator's pod list")
        # Three resyncs (--resync-seconds 1), each deriving every status again from the listed pods; each
        # after the first bills the Running job's GPUs, so three more GPU-second samples show three done.
        samples = [metric(op, f'sft_gpu_seconds_total{{namespace="{namespace}"}}')]

        def resynced_three_times() -> bool:
            value = metric(op, f'sft_gpu_seconds_total{{namespace="{namespace}"}}')
            if value != samples[-1]:
                samples.append(value)
            return len(samples) > 3

        k8s.cp.wait_for(resynced_three_times, 30, "three resyncs after the list", interval=0.1)
        memory = peak_rss_mib(op.proc.pid)
    finally:
        stop.set()
        watcher.join(5)
        op.stop()
        asyncio.run(_calls(control_plane.kubeconfig, [
            ("DELETE", f"{base}?labelSelector={LABEL_JOB}!%3Dlive&gracePeriodSeconds=0", None, "application/json")]))
        k8s.core.delete_node(NODE)
    print(f"listed {listed.group(1)} pods in {listed.group(2)} pages; peak RSS {memory:.0f} MiB; phases {set(phases)}")
    assert int(listed.group(1)) == PODS + 1 and int(listed.group(2)) >= PODS // 500
    assert phases and set(phases) == {"Running"}, f"the running job was rewritten: {phases}"
    assert memory < MEMORY_LIMIT_MIB
