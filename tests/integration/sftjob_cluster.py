"""SFTJobs on the real control plane: small API helpers bound to a namespace (shared by the operator's
integration tests; the fixtures are in conftest.py). The manifest builder is tests/builders.py's."""

from __future__ import annotations

import re
import time
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from sft_operator.api import GROUP, PLURAL, VERSION
from sft_operator.core.render import LABEL_JOB

from builders import cluster_manifest as manifest  # noqa: F401  (re-exported)

PULL_GRACE = 4  # --pod-start-grace-seconds of the operator under test


def metric(operator, series: str) -> float:
    """A sample of the operator's /metrics (``series`` with its labels, as exposed), 0 while absent."""
    found = re.search(rf"^{re.escape(series)} (\S+)$", operator.metrics(), re.M)
    return float(found.group(1)) if found else 0.0


def reconciles(operator) -> float:
    """How many reconciles the operator has finished (its sft_reconcile_duration_seconds histogram)."""
    return metric(operator, "sft_reconcile_duration_seconds_count")


class Cluster:
    """Small API helpers bound to the namespace under test."""

    def __init__(self, control_plane, namespace: str) -> None:
        self.cp, self.ns = control_plane, namespace
        self.custom = client.CustomObjectsApi(control_plane.api)
        self.batch = client.BatchV1Api(control_plane.api)
        self.core = client.CoreV1Api(control_plane.api)

    def create(self, doc: dict[str, Any]) -> dict[str, Any]:
        return self.custom.create_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, doc)

    def get(self, name: str) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name)

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, self.ns, PLURAL, name, {"spec": spec}, _content_type="application/merge-patch+json"
        )

    def status(self, name: str) -> dict[str, Any]:
        return self.get(name).get("status") or {}

    def job(self, name: str) -> client.V1Job:
        return self.batch.read_namespaced_job(name, self.ns)

    def pods(self, name: str) -> list[client.V1Pod]:
        return self.core.list_namespaced_pod(self.ns, label_selector=f"{LABEL_JOB}={name}").items

    def wait_phase(self, name: str, *phases: str, timeout: float = 60) -> dict[str, Any]:
        def check():
            status = self.status(name)
            return status if status.get("phase") in phases else None

        try:
            return self.cp.wait_for(check, timeout, f"{name} in phase {phases}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; status now: {self.status(name)}") from None

    def launch(self, name: str, pod_annotations: dict[str, str], **spec: Any) -> None:
        """Create suspended, annotate the Job's pod template (as Kueue may), then resume."""
        spec["runPolicy"] = {**spec.get("runPolicy", {}), "suspend": True}
        self.create(manifest(name, **spec))
        self.cp.wait_for(lambda: self.job(name), 30, f"Job {name}")
        self.batch.patch_namespaced_job(name, self.ns, {"spec": {"template": {"metadata": {"annotations": pod_annotations}}}})
        self.patch_spec(name, {"runPolicy": {"suspend": False}})

    def kubelet_terminates(self, pod: str) -> None:
        """What a kubelet does with a deleted running pod: kill the container (SIGTERM, exit 143) and
        report the pod Failed. kwok's delete stage only deletes; the Job's tracking finalizer then
        keeps the pod, still "Running", until something reports it terminal."""
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        try:
            self.core.patch_namespaced_pod_status(pod, self.ns, {"status": {"phase": "Failed", "containerStatuses": [{
                "name": "trainer", "image": "ghcr.io/sft-operator/trainer:0.1.0", "imageID": "", "ready": False,
                "restartCount": 0, "started": False,
                "state": {"terminated": {"exitCode": 143, "reason": "Error", "startedAt": now, "finishedAt": now}},
            }]}})
        except ApiException as exc:
            if exc.status != 404:  # gone already: nothing to report
                raise

    def kubelet_reports_waiting(self, pod: str, reason: str, message: str = "") -> None:
        """What a kubelet writes for a scheduled pod whose container cannot start (kwok never does). kwok ends
        init containers at once and an ended one cannot wait again: for a pod that must not be past its init
        containers (a volume problem), launch it with the annotation sft.dev/kwok-unstarted."""
        self.core.patch_namespaced_pod_status(pod, self.ns, {"status": {
            "phase": "Pending",
            "containerStatuses": [{
                "name": "trainer", "image": "ghcr.io/sft-operator/trainer:0.1.0", "imageID": "", "ready": False,
                "restartCount": 0, "started": False, "state": {"waiting": {"reason": reason, "message": message}},
            }],
        }})

    def report_pod_event(self, pod: client.V1Pod, reason: str, message: str, component: str = "kubelet") -> None:
        """A Warning Event on a pod, as the kubelet (FailedMount) or the attach-detach controller posts it."""
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.core.create_namespaced_event(self.ns, {
            "metadata": {"generateName": f"{pod.metadata.name}."},
            "involvedObject": {"apiVersion": "v1", "kind": "Pod", "name": pod.metadata.name, "namespace": self.ns,
                               "uid": pod.metadata.uid},
            "type": "Warning", "reason": reason, "message": message, "source": {"component": component},
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        })

    def wide_reason(self, name: str) -> str:
        """The REASON column of `kubectl get sftjobs -o wide`."""
        header, row = self.cp.kubectl("get", "sftjobs", name, "-n", self.ns, "-o", "wide").stdout.splitlines()[:2]
        start = header.index("REASON")  # columns are aligned; empty cells are blank
        end = header.index(" ", start + len("REASON")) if " " in header[start:] else len(header)
        while end < len(header) and header[end] == " ":
            end += 1
        return row[start:end].strip() or "<none>"

    def deny(self, name: str, operations: list[str], expression: str, message: str, reason: str = "Forbidden") -> None:
        """A ValidatingAdmissionPolicy (built-in CEL admission) denying Job writes in this namespace only."""
        admission = client.AdmissionregistrationV1Api(self.cp.api)
        admission.create_validating_admission_policy({
            "metadata": {"name": name},
            "spec": {"failurePolicy": "Fail",
                     "matchConstraints": {"resourceRules": [{"apiGroups": ["batch"], "apiVersions": ["v1"],
                                                             "operations": operations, "resources": ["jobs"]}]},
                     "validations": [{"expression": expression, "message": message, "reason": reason}]},
        })
        admission.create_validating_admission_policy_binding({
            "metadata": {"name": name},
            "spec": {"policyName": name, "validationActions": ["Deny"],
                     "matchResources": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": self.ns}}}},
        })

    def allow(self, name: str) -> None:
        admission = client.AdmissionregistrationV1Api(self.cp.api)
        admission.delete_validating_admission_policy_binding(name)
        admission.delete_validating_admission_policy(name)

    def events(self, name: str) -> list[client.CoreV1Event]:
        return [e for e in self.core.list_namespaced_event(self.ns).items
                if e.involved_object.kind == "SFTJob" and e.involved_object.name == name]

    def event_reasons(self, name: str) -> set[str]:
        return {e.reason for e in self.events(name)}


def cond(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == kind)
