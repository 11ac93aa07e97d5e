"""The chaos suite: faults a multi-hour, multi-GPU run meets, injected on the real node while a tiny
SFTJob that checkpoints is training (the chart's operator, the trainer image, the `models` claim).

After each fault the test asserts what a user needs: the job ends Succeeded with as many trained
steps as an uninterrupted run, at most one checkpoint interval recomputed, the model exported and
`status.output` set, no disruption counted against the backoff (`backoffLimit: 0`, or the one
failure a SIGKILLed rank really is), one ConfigMap, Service and Job (nothing duplicated), and an
Event that names each interruption of the training. docs/reliability.md has the table and figures.

Faults are injected the way they happen: a SIGKILL of the operator's process (found by its pod's
cgroup), `sftctl dev-cluster stop|start|restart COMPONENT` for the control plane and the node, the
kubelet's own eviction after a node loss, a SIGKILL of one rank's processes, an eviction through the
Eviction API (policy/v1) while the pod's worker is frozen (SIGSTOP) for longer than torchrun's own 30 s.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from kubernetes import client, watch

import sft_devcluster as devcluster
from sft_devcluster.node import NODE_IP, NODE_NAME
from sft_operator.api import GROUP, PLURAL, VERSION
from sft_operator.core.render import LABEL_JOB, TRAINER_CONTAINER
from storage_servers import FaultyProxy

from .test_end_to_end import Installed, Run, installed  # noqa: F401 - the module's helm install
from .test_helm_install import CHART
from .test_storage_end_to_end import BUCKET, exported, s3_spec, secrets, storage  # noqa: F401 - fixtures


pytestmark = [pytest.mark.cluster, pytest.mark.images, pytest.mark.trainer, pytest.mark.slow]

CHECKPOINT_EVERY = 50


@dataclass
class Faults:
    """What a test did to a running job, and when: the step the status showed at that moment, and for a
    fault that stops the trainer (``interrupts``) the step the trainer itself had reached (its log)."""

    injected: list[tuple[str, int]] = field(default_factory=list)
    interruptions: list[int] = field(default_factory=list)
    resumed: dict[str, int] = field(default_factory=dict)  # pod name -> step, read before a fault deleted the pod

    def note(self, what: str, step: int, trainer_at: int | None = None) -> None:
        print(f"  fault: {what} at step {step}" + (f" (trainer at step {trainer_at})" if trainer_at is not None else ""))
        self.injected.append((what, step))
        if trainer_at is not None:
            self.interruptions.append(trainer_at)


def logged_step(installed: Installed, pod: str) -> int:
    """The last step one trainer pod logged."""
    tail = installed.cluster.kubectl("logs", "-n", installed.work, pod, "--tail=20", check=False).stdout
    return max([0, *(int(m) for m in re.findall(r'"event": "progress", "step": (\d+)', tail))])


def trainer_step(installed: Installed, name: str) -> int:
    """The last step the job's running trainer pods logged (the status lags while the operator is down)."""
    return max([0, *(logged_step(installed, p.metadata.name) for p in installed.pods(name) if p.status.phase == "Running")])


def step_of(run: Run) -> int:
    return int((run.status.get("progress") or {}).get("step") or 0)


# ---------------------------------------------------------------- the operator's process


def operator_pod(installed: Installed) -> client.V1Pod | None:
    selector = f"app.kubernetes.io/instance={installed.release.name},app.kubernetes.io/component=operator"
    pods = client.CoreV1Api(installed.cluster.api).list_namespaced_pod(installed.release.namespace,
                                                                         label_selector=selector).items
    live = [p for p in pods if p.metadata.deletion_timestamp is None]
    return live[0] if live else None


def processes_of_pod(uid: str) -> list[int]:
    """The host pids of a pod's containers (not its pause sandbox), by the pod's cgroup (cgroupfs driver:
    .../pod<uid>/<container>)."""
    found = []
    marker = f"pod{uid}"
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cgroups = (entry / "cgroup").read_text()
            command = (entry / "cmdline").read_bytes().split(b"\0")[0].decode()
        except OSError:
            continue
        if marker in cgroups and not command.endswith("pause"):
            found.append(int(entry.name))
    return found


def crash_operator(installed: Installed, hold=None) -> None:
    """SIGKILL the operator's process, as an OOM kill or a crash would, then remove its pod so that the
    Deployment starts the next operator at once instead of after the kubelet's crash-loop back-off.
    ``hold``: called while no operator runs (the Deployment scaled to 0) before it is started again."""
    pod = operator_pod(installed)
    assert pod is not None, "no operator pod"
    pids = processes_of_pod(pod.metadata.uid)
    assert pids, f"no process of operator pod {pod.metadata.name} found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    apps = client.AppsV1Api(installed.cluster.api)
    name, ns = installed.release.fullname, installed.release.namespace
    if hold is not None:
        apps.patch_namespaced_deployment_scale(name, ns, {"spec": {"replicas": 0}})
    client.CoreV1Api(installed.cluster.api).delete_namespaced_pod(pod.metadata.name, ns, grace_period_seconds=0)
    if hold is not None:
        hold()
        apps.patch_namespaced_deployment_scale(name, ns, {"spec": {"replicas": 1}})


def wait_operator_ready(installed: Installed, timeout: float = 120) -> None:
    def ready():
        pod = operator_pod(installed)
        return pod is not None and any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])

    installed.cluster.wait_for(ready, timeout, "the operator Ready again")


def restart(installed: Installed, component: str) -> None:
    """`sftctl dev-cluster restart COMPONENT --kill`, then wait until the API serves reads again."""
    devcluster.cluster.restart_component(installed.cluster.state_dir, component, kill=True)
    deadline = time.monotonic() + 120
    while True:
        try:
            client.CoreV1Api(installed.cluster.api).list_namespace(limit=1, _request_timeout=5)
            return
        except Exception:  # noqa: BLE001 - connection refused, 500 while etcd comes back: wait
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


# ---------------------------------------------------------------- what every fault asserts


def children(installed: Installed, name: str) -> dict[str, int]:
    core, batch = client.CoreV1Api(installed.cluster.api), client.BatchV1Api(installed.cluster.api)
    selector = f"{LABEL_JOB}={name}"
    return {
        "Job": len(batch.list_namespaced_job(installed.work, label_selector=selector).items),
        "ConfigMap": len(core.list_namespaced_config_map(installed.work, label_selector=selector).items),
        "Service": len(core.list_namespaced_service(installed.work, label_selector=selector).items),
    }


def resumed_step(installed: Installed, pod: str) -> int | None:
    """The step a trainer pod resumed from (rank 0's log: "resumed from ... (step N")."""
    match = re.search(r"resumed from \S+ \(step (\d+)", installed.logs(pod))
    return int(match.group(1)) if match else None


def resumed_steps(installed: Installed, name: str, before_deletion: dict[str, int] | None = None) -> list[int]:
    """The step each trainer pod resumed from; ``before_deletion``: those read from pods deleted since."""
    steps = dict(before_deletion or {})
    for pod in installed.pods(name):
        step = resumed_step(installed, pod.metadata.name)
        if step is not None:
            steps[pod.metadata.name] = step
    return list(steps.values())


def assert_survived(installed: Installed, name: str, run: Run, max_steps: int, faults: Faults,
                    interrupted: int = 0, counted: bool = True) -> None:
    """The promises of docs/reliability.md for one job after its faults; ``interrupted``: how many of
    them stopped the training itself (each costs a resume and an Event)."""
    status = run.status
    explain = installed.explain(name, status)
    assert status.get("phase") == "Succeeded", explain
    assert status["progress"]["step"] == max_steps, explain  # as many steps as an uninterrupted run
    assert (installed.models / name / "model" / "config.json").exists(), explain
    assert status["output"]["model"] == f"pvc://models/{name}/model", explain
    assert children(installed, name) == {"Job": 1, "ConfigMap": 1, "Service": 1}
    resumed = resumed_steps(installed, name, faults.resumed)
    print(f"  {name}: Succeeded, {status['progress']['step']} steps, restarts {status.get('restarts', 0)}, "
          f"faults {faults.injected}, resumed from {resumed}")
    if interrupted:
        assert len(resumed) >= interrupted, f"resumed from {resumed} after {faults.injected}\n{explain}"
        # At most one checkpoint interval recomputed per interruption: each resume starts no earlier than
        # one interval before the step the trainer had reached when it was stopped.
        for at, start in zip(sorted(faults.interruptions), sorted(resumed)):
            assert start >= at - CHECKPOINT_EVERY, f"resumed from step {start} after an interruption at step {at}"
        if counted:
            reasons = [e.reason for e in installed.events(name)]
            assert "Restarted" in reasons, reasons
            assert status.get("restarts", 0) >= interrupted, status


def sftjob_spec(max_steps: int, **extra) -> dict:
    return {"hyperparameters": {"maxSteps": max_steps}, "evaluation": {"strategy": "no"},
            "checkpointing": {"strategy": "steps", "steps": CHECKPOINT_EVERY, "keep": 2},
            "runPolicy": {"backoffLimit": 0}, **extra}


# ---------------------------------------------------------------- the faults


def test_the_operator_sigkilled_at_every_stage_of_a_run_loses_nothing(installed, tmp_path):
    """One job meets the operator crashing at every stage: before its children exist, right after its Job
    is created, while it runs and its trainer saves after SIGTERM (one crash: a pod deleted at that moment),
    and between the trainer's exit and the result's write (the operator held down until the trainer pod has
    ended). The job is created suspended, so that it trains only once the operator is back: on a busy
    machine an operator takes 10-80 s to return, and the run must outlast each crash."""
    name, max_steps = "chaos-operator", 1200
    faults = Faults()
    batch = client.BatchV1Api(installed.cluster.api)
    sftjobs = client.CustomObjectsApi(installed.cluster.api)

    crash_operator(installed)  # 1: the SFTJob is applied while no operator runs
    faults.note("operator SIGKILL before the children exist", 0)
    applied = installed.apply(name, tmp_path, **sftjob_spec(max_steps, runPolicy={"backoffLimit": 0, "suspend": True}))
    wait_operator_ready(installed)

    def job_exists():
        try:
            return batch.read_namespaced_job(name, installed.work)
        except client.exceptions.ApiException:
            return None

    installed.cluster.wait_for(job_exists, 120, f"Job {name}", interval=0.05)
    crash_operator(installed)  # 2: right after the Job is created
    faults.note("operator SIGKILL right after the Job was created", 0)
    wait_operator_ready(installed)
    sftjobs.patch_namespaced_custom_object(GROUP, VERSION, installed.work, PLURAL, name,
                                           {"spec": {"runPolicy": {"suspend": False}}})
    done = set()

    def trainer_ended() -> bool:
        return all(p.status.phase in ("Succeeded", "Failed") for p in installed.pods(name))

    def on_running(run: Run) -> None:
        step = step_of(run)
        if ("save" not in done and step >= CHECKPOINT_EVERY + 10
                and list((installed.models / name / "checkpoints").glob("*/COMPLETE"))):
            done.add("save")
            at = trainer_step(installed, name)
            for pod in installed.pods(name):  # 3 and 4: SIGTERM to the running trainer (it saves), the operator killed
                if pod.status.phase == "Running":
                    client.CoreV1Api(installed.cluster.api).delete_namespaced_pod(pod.metadata.name, installed.work)
            crash_operator(installed)
            faults.note("operator SIGKILL while Running, its trainer pod deleted (SIGTERM save)", step, trainer_at=at)
            wait_operator_ready(installed)
        elif "end" not in done and "save" in done and 0 < trainer_step(installed, name) < max_steps - 30:
            done.add("end")
            # 5: the trainer finishes and exits while no operator runs; the result is read afterwards.
            crash_operator(installed, hold=lambda: installed.cluster.wait_for(trainer_ended, 600, "the trainer to end"))
            faults.note("operator SIGKILL between the trainer's exit and the result's write", step)

    run = installed.follow(name, applied, timeout=900, on_running=on_running)
    assert done == {"save", "end"}, f"faults not all injected: {done}\n{installed.explain(name, run.status)}"
    assert_survived(installed, name, run, max_steps, faults, interrupted=1)
    assert run.status["output"].get("model"), run.status  # the late result was written (defect 5)


# ---------------------------------------------------------------- an eviction while the save is slow

FROZEN_S = 40  # the evicted pod's worker saves no sooner than this after SIGTERM: past torchrun's own 30 s
GRACE_S = 90  # runPolicy.terminationGracePeriodSeconds for that run: longer than the held save


@dataclass
class Ending:
    """How one evicted trainer pod ended, as a watch on it saw it until it was gone."""

    disruption: str | None = None  # the DisruptionTarget condition's reason
    deletion: datetime | None = None  # deletionTimestamp: when SIGTERM was sent plus the grace period
    grace: int | None = None
    exit_code: int | None = None  # the trainer container's (the launcher's)
    finished_at: datetime | None = None
    frozen_through: list[str | None] = field(default_factory=list)  # the workers' states at the end of the hold

    def seconds_to_exit(self) -> float:
        return (self.finished_at - (self.deletion - timedelta(seconds=self.grace))).total_seconds()


def process_state(pid: int) -> str | None:
    """A process's state letter (T: stopped, Z: dead and not reaped), None when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def workers_of_pod(uid: str) -> list[int]:
    """A trainer pod's torchrun workers: its processes other than the launcher (``sft_trainer.launch``)."""
    workers = []
    for pid in processes_of_pod(uid):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "sft_trainer.launch" not in command:
            workers.append(pid)
    return workers


def watch_until_gone(core: client.CoreV1Api, namespace: str, name: str, version: str, seen: Ending) -> None:
    """Record what ``seen`` asks for from every change to one pod until it is deleted (the Job controller
    removes an ended pod's finalizer within moments, so a poll could miss its exit code)."""
    for event in watch.Watch().stream(core.list_namespaced_pod, namespace, field_selector=f"metadata.name={name}",
                                      resource_version=version, timeout_seconds=GRACE_S + 120):
        pod = event["object"]
        for cond in pod.status.conditions or []:
            if cond.type == "DisruptionTarget" and cond.status == "True":
                seen.disruption = cond.reason
        if pod.metadata.deletion_timestamp and seen.deletion is None:  # the eviction's (the kubelet's own delete shortens it)
            seen.deletion, seen.grace = pod.metadata.deletion_timestamp, pod.metadata.deletion_grace_period_seconds
        for container in pod.status.container_statuses or []:
            if container.name == TRAINER_CONTAINER and container.state.terminated:
                seen.exit_code, seen.finished_at = container.state.terminated.exit_code, container.state.terminated.finished_at
        if event["type"] == "DELETED":
            return


def evict_with_a_slow_save(installed: Installed, pod: client.V1Pod) -> Ending:
    """Evict ``pod`` (policy/v1, as `kubectl drain` does) while its save cannot finish within 30 s: its
    workers are frozen (SIGSTOP) from just before the eviction for ``FROZEN_S``, as a stalled volume would
    hold a save, so the SIGTERM they are forwarded waits; then they go on, save, and exit."""
    core = client.CoreV1Api(installed.cluster.api)
    name, namespace = pod.metadata.name, installed.work
    workers = workers_of_pod(pod.metadata.uid)
    assert workers, f"no worker process of {name} found"
    seen = Ending()
    version = core.read_namespaced_pod(name, namespace).metadata.resource_version
    watcher = threading.Thread(target=watch_until_gone, args=(core, namespace, name, version, seen), daemon=True)
    watcher.start()
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    try:
        core.create_namespaced_pod_eviction(name, namespace, client.V1Eviction(
            metadata=client.V1ObjectMeta(name=name, namespace=namespace)))
        time.sleep(FROZEN_S)
        seen.frozen_through = [process_state(pid) for pid in workers]  # torchrun's own 30 s would have killed them
    finally:
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    watcher.join(GRACE_S + 120)
    return seen


def test_a_2_pod_run_survives_a_rank_sigkilled_then_an_eviction_while_its_save_takes_over_30_s(installed, tmp_path):
    """A 2-pod run meets two faults. First rank 1's processes are SIGKILLed (a GPU fault, an OOM kill):
    that pod's failure is counted, once; rank 0, which lost its peer, exits 76 (PeerLost), which is not;
    both pods are replaced and the group resumes from its last checkpoint. Then, once the replacements
    train, rank 0's pod (the one that writes the checkpoint) is evicted while its save takes longer than
    torchrun's 30 s: its worker gets the pod's grace period, the save completes, the pod exits 75, and the
    group resumes from that save: nothing counted, nothing recomputed."""
    name, max_steps = "chaos-rank", 160  # both faults come by step ~80 (checkpoints every 50)
    faults = Faults()
    applied = installed.apply(name, tmp_path, **sftjob_spec(max_steps, resources={"nodes": 2}, runPolicy={
        "backoffLimit": 1, "terminationGracePeriodSeconds": GRACE_S}))
    killed: list[str] = []
    first: set[str] = set()
    evicted: dict[str, Ending] = {}

    def kill_rank_1(run: Run) -> None:
        if step_of(run) < CHECKPOINT_EVERY + 10 or not list((installed.models / name / "checkpoints").glob("*/COMPLETE")):
            return
        at = trainer_step(installed, name)
        pods = installed.pods(name)
        for pod in pods:
            index = pod.metadata.annotations.get("batch.kubernetes.io/job-completion-index")
            if index == "1" and pod.status.phase == "Running":
                for pid in processes_of_pod(pod.metadata.uid):
                    os.kill(pid, signal.SIGKILL)
                killed.append(pod.metadata.name)
                first.update(p.metadata.name for p in pods)
                faults.note("rank 1 SIGKILL", step_of(run), trainer_at=at)

    def evict_rank_0(run: Run) -> None:
        replacements = [p for p in installed.pods(name) if p.metadata.name not in first
                        and p.status.phase == "Running" and p.metadata.deletion_timestamp is None]
        rank0 = [p for p in replacements if p.metadata.annotations.get("batch.kubernetes.io/job-completion-index") == "0"]
        if len(replacements) < 2 or not rank0:
            return
        pod = rank0[0].metadata.name
        resumed, at = resumed_step(installed, pod), logged_step(installed, pod)
        if resumed is None or at < resumed + 10:  # the group trains again
            return
        faults.resumed[pod] = resumed  # the eviction deletes the pod and its log
        evicted[pod] = evict_with_a_slow_save(installed, rank0[0])
        faults.note(f"rank 0 evicted, its save held {FROZEN_S} s", step_of(run), trainer_at=at)

    def on_running(run: Run) -> None:
        if not killed:
            kill_rank_1(run)
        elif not evicted:
            evict_rank_0(run)

    run = installed.follow(name, applied, timeout=900, on_running=on_running)
    assert killed and evicted, f"the run ended before both faults: killed {killed}, evicted {list(evicted)}"
    (ending,) = evicted.values()
    assert_survived(installed, name, run, max_steps, faults, interrupted=2)
    # The evicted pod: its frozen worker outlived torchrun's 30 s, its save completed, it said so (exit 75).
    assert ending.disruption == "EvictionByEvictionAPI", ending
    assert ending.frozen_through and all(state == "T" for state in ending.frozen_through), ending
    assert ending.exit_code == 75, f"{ending}\n{installed.explain(name, run.status)}"
    assert ending.seconds_to_exit() > 30, ending
    print(f"  the evicted pod exited {ending.exit_code} {ending.seconds_to_exit():.0f} s after its SIGTERM")
    # Resumed from the save made at the eviction: nothing recomputed.
    assert max(resumed_steps(installed, name)) >= faults.interruptions[-1], (resumed_steps(installed, name), faults)
    # backoffLimit 1: the killed rank's failure is the one counted; rank 0's exit 76 and the eviction are not.
    job = client.BatchV1Api(installed.cluster.api).read_namespaced_job(name, installed.work)
    assert job.status.failed == 1, job.status
    assert run.status.get("restarts", 0) >= 4, run.status  # two pods replaced after each fault
    rank0 = [p for p in installed.pods(name) if p.metadata.name in first and p.status.container_statuses
             and p.status.container_statuses[0].state.terminated
             and p.status.container_statuses[0].state.terminated.exit_code == 76]
    assert rank0, "rank 0 did not exit PeerLost (76) after rank 1 was killed"


def test_the_api_server_and_etcd_restarting_and_a_helm_upgrade_mid_run_lose_nothing(installed, tmp_path):
    """One job meets the control plane going away twice (kube-apiserver SIGKILLed and started again,
    then etcd) and an operator upgrade (`helm upgrade` with a changed value replaces the operator's
    pod). None of them stops the training: its pod keeps running, its progress reports wait out the
    outage, and it ends with everything an uninterrupted run has."""
    name, max_steps = "chaos-control-plane", 900  # the trainer runs on while each fault is repaired
    faults = Faults()
    applied = installed.apply(name, tmp_path, **sftjob_spec(max_steps))
    done: list[str] = []
    plan = [
        (40, "kube-apiserver SIGKILL and restart", lambda: restart(installed, "kube-apiserver")),
        (250, "etcd SIGKILL and restart", lambda: restart(installed, "etcd")),
        (500, "helm upgrade of the operator", lambda: installed.release.helm(
            "upgrade", installed.release.name, str(CHART), "--reuse-values", "--wait", "--timeout", "120s",
            "--set-string", f"podAnnotations.sft\\.dev/upgraded={int(time.time())}")),
    ]
    pods_before = {p.metadata.uid for p in installed.pods(name)}

    def on_running(run: Run) -> None:
        nonlocal pods_before
        step = step_of(run)
        pods_before |= {p.metadata.uid for p in installed.pods(name)}
        for at, what, inject in plan:
            if what not in done and step >= at:
                done.append(what)
                inject()
                faults.note(what, step)
                return

    run = installed.follow(name, applied, timeout=900, on_running=on_running)
    assert len(done) == len(plan), f"faults not all injected: {done}\n{installed.explain(name, run.status)}"
    assert_survived(installed, name, run, max_steps, faults)
    # Nothing was interrupted: one trainer pod from start to end, no restart, no resume.
    assert {p.metadata.uid for p in installed.pods(name)} == pods_before and len(pods_before) == 1
    assert run.status.get("restarts", 0) == 0 and resumed_steps(installed, name) == []


def test_a_lost_node_its_pods_evicted_and_force_deleted_costs_at_most_one_checkpoint_interval(installed, tmp_path):
    """The node's kubelet stops (the node is lost to the control plane; its containers, cut off, may
    run on) for longer than the job's unreachable toleration: the taint manager evicts the trainer pod
    (DisruptionTarget), the admin marks the node out of service so that its pods are force-deleted, the
    replacement waits for a node, and the kubelet comes back. The replacement takes the destination over from the cut-off trainer (fenced: the old
    one stops without deleting anything) and resumes from the last checkpoint."""
    name, max_steps = "chaos-node", 1200  # the cut-off trainer runs on for the ~60 s the node is lost
    faults = Faults()
    core = client.CoreV1Api(installed.cluster.api)
    state_dir = installed.cluster.state_dir
    unreachable = [{"key": f"node.kubernetes.io/{taint}", "operator": "Exists", "effect": "NoExecute",
                    "tolerationSeconds": 10} for taint in ("unreachable", "not-ready")]
    applied = installed.apply(name, tmp_path, **sftjob_spec(max_steps, scheduling={"tolerations": unreachable}))
    lost: list[str] = []

    def on_running(run: Run) -> None:
        step = step_of(run)
        if lost or step < CHECKPOINT_EVERY + 10 or not list((installed.models / name / "checkpoints").glob("*/COMPLETE")):
            return
        (pod,) = [p for p in installed.pods(name) if p.status.phase == "Running"]
        at = trainer_step(installed, name)
        devcluster.cluster.stop_component(state_dir, "kubelet", kill=True)
        faults.note("node lost (kubelet stopped)", step, trainer_at=at)
        lost.append(pod.metadata.name)

        def evicted():
            got = core.read_namespaced_pod(pod.metadata.name, installed.work)
            return got.metadata.deletion_timestamp and any(
                c.type == "DisruptionTarget" and c.status == "True" for c in got.status.conditions or [])

        out_of_service = {"key": "node.kubernetes.io/out-of-service", "value": "nodeshutdown", "effect": "NoExecute"}
        wire = lambda taints: installed.cluster.api.sanitize_for_serialization(taints or [])  # noqa: E731
        node = core.read_node(NODE_NAME)
        try:
            installed.cluster.wait_for(evicted, 240, "the taint manager to evict the lost node's pod", interval=1)
            # The admin's answer to a lost node: mark it out of service, and the pod garbage collector
            # force-deletes its Terminating pods (the Job's finalizer would hold them until the kubelet is back).
            core.patch_node(NODE_NAME, {"spec": {"taints": [*wire(node.spec.taints), out_of_service]}})
            installed.cluster.wait_for(lambda: pod.metadata.name not in {p.metadata.name for p in installed.pods(name)},
                                       120, "the lost pod to be force-deleted")
            installed.cluster.wait_for(lambda: [p for p in installed.pods(name) if p.metadata.name != pod.metadata.name],
                                       120, "the Job's replacement pod")
        finally:  # the node comes back, whatever happened
            taints = [t for t in wire(core.read_node(NODE_NAME).spec.taints) if t["key"] != out_of_service["key"]]
            core.patch_node(NODE_NAME, {"spec": {"taints": taints}})
            devcluster.cluster.start_component(state_dir, "kubelet")

    run = installed.follow(name, applied, timeout=900, on_running=on_running)
    assert lost, "the run ended before a checkpoint was complete"
    # The operator ran on the lost node too: when its replacement never saw the trainer pod go, status.restarts
    # and the Restarted Event miss this one (a known gap, docs/reliability.md); everything else holds.
    assert_survived(installed, name, run, max_steps, faults, interrupted=1, counted=False)


def test_s3_down_90_s_during_the_fetch_and_again_during_the_export_and_mlflow_down_mid_run(
        installed, storage, secrets, tmp_path):
    """Object storage goes away for 90 s while the fetch stage downloads the model (and the operator is
    SIGKILLed meanwhile), and again while rank 0 uploads the trained model; the tracking server goes
    away mid-run for good. The pods wait
    the outages out (backoff inside the pod, nothing counted), the model lands in S3 with COMPLETE
    last, and the lost tracker costs a Warning Event, not the run."""
    name, max_steps, outage = "chaos-s3", 200, 90
    faults = Faults()
    s3 = FaultyProxy(storage.s3.port, host=NODE_IP)
    mlflow = FaultyProxy(storage.mlflow.port, host=NODE_IP)
    s3.rate = 400_000  # bytes/s both ways: the 4 MiB model takes ~10 s to fetch and to export
    outages: dict[str, float] = {}

    def outage_for(what: str, step: int) -> None:
        s3.go_down()
        faults.note(f"S3 down {outage} s {what}", step)
        outages[what] = time.monotonic()
        threading.Timer(outage, s3.come_back).start()

    def on_running(run: Run) -> None:
        progress = run.status.get("progress") or {}
        stage, step = progress.get("stage"), step_of(run)
        if "during the fetch" not in outages and stage == "Fetching" and progress.get("bytesDone", 0) > 0:
            outage_for("during the fetch", step)
            crash_operator(installed)  # the operator's crash while Fetching, too
            faults.note("operator SIGKILL while Fetching", step)
        elif "during the fetch" in outages and "mlflow" not in outages and stage == "Training" and step >= 20:
            mlflow.go_down()
            faults.note("MLflow down for good", step)
            outages["mlflow"] = time.monotonic()
        elif "during the export" not in outages and stage == "Exporting":
            outage_for("during the export", step)

    applied = installed.apply(name, tmp_path, **s3_spec(s3.endpoint, "s3-credentials", name, mlflow=mlflow.endpoint,
                                                         **sftjob_spec(max_steps)))
    try:
        run = installed.follow(name, applied, timeout=900, on_running=on_running)
    finally:
        s3.close()
        mlflow.close()
    assert set(outages) == {"during the fetch", "mlflow", "during the export"}, \
        f"faults not all injected: {outages}\n{installed.explain(name, run.status)}"
    status = run.status
    assert status.get("phase") == "Succeeded", installed.explain(name, status)
    assert status["progress"]["step"] == max_steps
    assert status["output"]["uri"] == f"s3://{BUCKET}/runs/{name}"
    assert "COMPLETE" in exported(storage, name) and "model/config.json" in exported(storage, name)
    assert status.get("restarts", 0) == 0, status  # ridden out inside the pod: nothing restarted, nothing counted
    assert children(installed, name) == {"Job": 1, "ConfigMap": 1, "Service": 1}
    reasons = [e.reason for e in installed.events(name)]
    assert "CompletedWithWarning" in reasons, reasons  # the tracker that went away is named
