"""The Helm chart on the real control plane: install, upgrade, uninstall, and RBAC proven both ways.

- `helm install` into a namespace that enforces Pod Security "restricted" creates every object of
  the release, and the Deployment's pod, created by the ReplicaSet controller, is admitted. The
  pod lands on a kwok node, which runs no container: the operator itself is tested below.
- Enough privilege: the operator (`python -m sft_operator`, as the image runs it) runs with a
  kubeconfig holding a TokenRequest token of the chart's ServiceAccount, and takes an SFTJob
  through its whole life: children created, suspend/resume (Job patch), a trainer progress report
  over the chart's TLS certificate (TokenReview, pod/Job reads, status patch), Succeeded, Events,
  and deletion by ttlSecondsAfterFinished. Its log must show no Forbidden.
- Not too much: `kubectl auth can-i --as=system:serviceaccount:<ns>:<sa>` denies Secrets, pods/exec,
  creating pods and RBAC.

The subprocess gets the environment the chart gives the pod (SFT_WATCH_NAMESPACES included), so
in the cluster-wide mode it really watches all namespaces, as the deployed operator would.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import ssl
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from sft_operator.api import GROUP, PLURAL, VERSION
from sft_operator.core.render import LABEL_JOB

from builders import cluster_manifest
from support import REPO, OperatorProcess

pytestmark = pytest.mark.cluster

CHART = REPO / "helm" / "sft-operator"
AUDIENCE = "sft.dev/progress"
RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted", "pod-security.kubernetes.io/enforce-version": "latest"}


class Release:
    """One `helm install` of the chart, driven with the control plane's admin kubeconfig."""

    def __init__(self, control_plane, namespace: str, values: dict[str, Any]) -> None:
        self.cp, self.namespace, self.values = control_plane, namespace, values
        self.name = f"sft-{uuid.uuid4().hex[:6]}"
        self.fullname = f"{self.name}-sft-operator"
        self.core = client.CoreV1Api(control_plane.api)

    def helm(self, *args: str, values: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(self.cp.bin_dir / "helm"), *args, "--kubeconfig", str(self.cp.kubeconfig), "-n", self.namespace]
        if values is not None:
            cmd += ["-f", "-"]
        proc = subprocess.run(cmd, input=json.dumps(values) if values is not None else None,
                              capture_output=True, text=True, timeout=180)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def install(self) -> subprocess.CompletedProcess:
        return self.helm("install", self.name, str(CHART), "--wait", "--timeout", "90s", values=self.values)

    def manifest(self) -> list[dict[str, Any]]:
        return [d for d in yaml.safe_load_all(self.helm("get", "manifest", self.name).stdout) if d]

    def uninstall(self) -> None:
        self.helm("uninstall", self.name, "--wait", "--timeout", "60s", check=False)

    def tls(self) -> dict[str, bytes]:
        secret = self.core.read_namespaced_secret(f"{self.fullname}-tls", self.namespace)
        return {k: base64.b64decode(v) for k, v in secret.data.items()}

    def can_i(self, *args: str) -> bool:
        sa = f"system:serviceaccount:{self.namespace}:{self.fullname}"
        proc = self.cp.kubectl("auth", "can-i", f"--as={sa}", *args, check=False)
        assert proc.stdout.strip() in ("yes", "no"), proc.stdout + proc.stderr
        return proc.stdout.strip() == "yes"

    def kubeconfig_for_service_account(self, path: Path) -> Path:
        """A kubeconfig authenticating with a TokenRequest token of the chart's ServiceAccount."""
        request = client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=3600))
        token = self.core.create_namespaced_service_account_token(self.fullname, self.namespace, request).status.token
        admin = yaml.safe_load(self.cp.kubeconfig.read_text())
        cluster = admin["clusters"][0]
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "clusters": [cluster],
            "users": [{"name": self.fullname, "user": {"token": token}}],
            "contexts": [{"name": "operator", "context": {"cluster": cluster["name"], "user": self.fullname}}],
            "current-context": "operator",
        }))
        return path


def make_namespace(control_plane, prefix: str, labels: dict[str, str]) -> str:
    core = client.CoreV1Api(control_plane.api)
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": name, "labels": {"sft.dev/test": "true", **labels}}})
    control_plane.wait_for(lambda: core.read_namespaced_service_account("default", name), 30, f"SA default in {name}")
    return name


def delete_namespace(control_plane, name: str) -> None:
    try:
        client.CoreV1Api(control_plane.api).delete_namespace(name)
    except ApiException as exc:
        if exc.status != 404:
            raise


@pytest.fixture
def restricted_namespace(control_plane, namespace) -> str:
    client.CoreV1Api(control_plane.api).patch_namespace(namespace, {"metadata": {"labels": RESTRICTED}})
    return namespace


def _exists(control_plane, doc: dict[str, Any]) -> bool:
    kind, meta = doc["kind"], doc["metadata"]
    args = ["get", f"{kind}.{doc['apiVersion'].split('/')[0]}" if "/" in doc["apiVersion"] else kind, meta["name"]]
    if meta.get("namespace"):
        args += ["-n", meta["namespace"]]
    return control_plane.kubectl(*args, "-o", "name", check=False).returncode == 0


# ---- install / upgrade / uninstall -----------------------------------------------------------


def test_install_in_a_restricted_namespace_upgrade_and_uninstall(control_plane, restricted_namespace):
    ns = restricted_namespace
    core, apps = client.CoreV1Api(control_plane.api), client.AppsV1Api(control_plane.api)
    # The namespace really enforces "restricted": a root, privileged pod is refused.
    bad = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "bad"},
           "spec": {"containers": [{"name": "c", "image": "busybox", "securityContext": {"privileged": True}}]}}
    with pytest.raises(ApiException) as refused:
        core.create_namespaced_pod(ns, bad, dry_run="All")
    assert "violates PodSecurity" in refused.value.body

    release = Release(control_plane, ns, {})
    try:
        installed = release.install()
        # NOTES.txt tells the user the next steps with the real names.
        assert f"rollout status deployment/{release.fullname}" in installed.stdout, installed.stdout
        assert f"https://{release.fullname}.{ns}.svc:8443" in installed.stdout
        docs = release.manifest()
        assert {d["kind"] for d in docs} == {"ServiceAccount", "Secret", "ClusterRole", "ClusterRoleBinding",
                                            "Service", "Deployment", "NetworkPolicy", "ConfigMap",
                                            "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}
        missing = [f"{d['kind']}/{d['metadata']['name']}" for d in docs if not _exists(control_plane, d)]
        assert not missing, f"not created: {missing}"
        # The CRD comes from crds/ (already present here: helm leaves it alone).
        assert control_plane.kubectl("get", "crd", f"{PLURAL}.{GROUP}", check=False).returncode == 0

        # The pod is admitted: the ReplicaSet controller created it under "restricted" and it runs.
        selector = f"app.kubernetes.io/instance={release.name},app.kubernetes.io/component=operator"
        (pod,) = core.list_namespaced_pod(ns, label_selector=selector).items
        assert pod.metadata.owner_references[0].kind == "ReplicaSet"
        deployment = apps.read_namespaced_deployment(release.fullname, ns)
        assert deployment.status.available_replicas == 1
        assert pod.spec.security_context.run_as_non_root is True
        assert pod.spec.containers[0].security_context.read_only_root_filesystem is True

        # Upgrade keeps the generated CA and serving certificate (trainer pods trust that CA).
        before = release.tls()
        release.helm("upgrade", release.name, str(CHART), "--reuse-values", "--wait", "--timeout", "90s",
                     values={"trainer": {"image": "registry.example/trainer:0.2.0"}})
        assert release.tls() == before
        env = {e.name: e.value for e in
               apps.read_namespaced_deployment(release.fullname, ns).spec.template.spec.containers[0].env}
        assert env["SFT_TRAINER_IMAGE"] == "registry.example/trainer:0.2.0"
    finally:
        release.uninstall()

    leftovers = [f"{d['kind']}/{d['metadata']['name']}" for d in docs if _exists(control_plane, d)]
    assert not leftovers, f"left after uninstall: {leftovers}"
    # CRDs from crds/ are never deleted by Helm: SFTJobs survive an uninstall.
    assert control_plane.kubectl("get", "crd", f"{PLURAL}.{GROUP}", check=False).returncode == 0


# ---- RBAC: enough and not too much ----------------------------------------------------------------


class Operator(OperatorProcess):
    """The operator as a subprocess, authenticated as the chart's ServiceAccount, serving TLS."""

    def __init__(self, release: Release, tmp: Path) -> None:
        self.release, self.tmp = release, tmp
        # The kubeconfig is written at start(), once `helm install` has made the ServiceAccount.
        super().__init__(tmp / "operator.kubeconfig", tmp / "operator.log", args=["--log-format", "plain"])

    def start(self) -> None:
        """Run with the environment the chart gives the pod; only ports and file paths are local."""
        apps = client.AppsV1Api(self.release.cp.api)
        deployment = apps.read_namespaced_deployment(self.release.fullname, self.release.namespace)
        self.env.update({e.name: e.value or "" for e in deployment.spec.template.spec.containers[0].env})
        for key, data in self.release.tls().items():
            (self.tmp / key).write_bytes(data)
        self.release.kubeconfig_for_service_account(Path(self.env["KUBECONFIG"]))
        self.env.update({
            "SFT_METRICS_PORT": str(self.ports["metrics"]), "SFT_HEALTH_PORT": str(self.ports["health"]),
            "SFT_PROGRESS_PORT": str(self.ports["progress"]),
            "SFT_PROGRESS_TLS_CERT": str(self.tmp / "tls.crt"), "SFT_PROGRESS_TLS_KEY": str(self.tmp / "tls.key"),
            "SFT_PROGRESS_CA_FILE": str(self.tmp / "ca.crt"),
        })
        super().start()

    def log(self) -> str:
        return self.log_tail(400)

    def post_progress(self, namespace: str, name: str, token: str, report: dict[str, Any]) -> int:
        """POST as a trainer pod does: HTTPS verified against the chart's CA, for the Service's DNS name."""
        context = ssl.create_default_context(cafile=str(self.tmp / "ca.crt"))
        host = f"{self.release.fullname}.{self.release.namespace}.svc"
        raw = socket.create_connection(("127.0.0.1", self.ports["progress"]), timeout=10)
        conn = http.client.HTTPSConnection(host, self.ports["progress"], context=context, timeout=10)
        conn.sock = context.wrap_socket(raw, server_hostname=host)
        try:
            conn.request("POST", f"/v1/namespaces/{namespace}/sftjobs/{name}/progress", body=json.dumps(report),
                         headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            return response.status
        finally:
            conn.close()


FIELD_MANAGER = "platform-gitops"


def apply_server_side(control_plane, namespace: str, manifest: dict[str, Any], tmp: Path) -> None:
    path = tmp / "sftjob.yaml"
    path.write_text(yaml.safe_dump(manifest))
    proc = control_plane.kubectl("apply", "--server-side", f"--field-manager={FIELD_MANAGER}", "-n", namespace,
                                 "-f", str(path), check=False)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("mode", ["cluster-wide", "namespaced"])
def test_rbac_is_enough_for_a_whole_sftjob_life_and_no_more(control_plane, restricted_namespace, tmp_path, mode):
    ns = restricted_namespace
    work = make_namespace(control_plane, "sft-work", RESTRICTED)  # trainer pods are "restricted" too
    core, batch = client.CoreV1Api(control_plane.api), client.BatchV1Api(control_plane.api)
    custom = client.CustomObjectsApi(control_plane.api)
    release = Release(control_plane, ns, {"watchNamespaces": [work]} if mode == "namespaced" else {})
    operator = Operator(release, tmp_path)
    try:
        release.install()

        # -- not too much
        for verb in (["get", "secrets", "-A"], ["list", "secrets", "-n", work], ["get", "secrets", "-n", ns],
                     ["create", "pods", "-n", work], ["create", "pods", "--subresource=exec", "-n", work],
                     ["create", "roles.rbac.authorization.k8s.io", "-n", work],
                     ["create", "rolebindings.rbac.authorization.k8s.io", "-n", work],
                     ["create", "clusterroles.rbac.authorization.k8s.io"],
                     ["bind", "clusterroles.rbac.authorization.k8s.io"],
                     ["delete", "jobs.batch", "-n", work], ["delete", "pods", "-n", work],
                     ["delete", "persistentvolumeclaims", "-n", work]):
            assert not release.can_i(*verb), f"the operator's ServiceAccount can {' '.join(verb)}"
        # ...and can-i answers yes where the chart grants (the checks above can fail).
        assert release.can_i("patch", f"{PLURAL}.{GROUP}", "--subresource=status", "-n", work)
        assert not release.can_i("patch", f"{PLURAL}.{GROUP}", "-n", work)  # the operator writes only status
        assert release.can_i("create", "tokenreviews.authentication.k8s.io")
        if mode == "namespaced":
            assert not release.can_i("list", f"{PLURAL}.{GROUP}", "-n", "default")
            assert not release.can_i("create", "jobs.batch", "-n", "default")

        # -- enough: a whole SFTJob life, as the chart's ServiceAccount
        operator.start()
        name = "rbac-proof"
        # Applied the GitOps way (examples/server-side-apply.md): server-side, with our field manager.
        # A hub model: a fetch stage and the cache claim <name>-cache; eight GPUs: it lands on a kwok GPU node.
        manifest = cluster_manifest(name, output={"destination": "s3://models/rbac-proof"},
                                    runPolicy={"suspend": True, "ttlSecondsAfterFinished": 3})
        apply_server_side(control_plane, work, manifest, tmp_path)
        control_plane.wait_for(lambda: batch.read_namespaced_job(name, work), 30, "the trainer Job")
        cache = core.read_namespaced_persistent_volume_claim(f"{name}-cache", work)  # created with the chart's RBAC
        assert cache.metadata.owner_references[0].name == name
        assert core.read_namespaced_config_map(f"{name}-config", work).data["ca.crt"] == release.tls()["ca.crt"].decode()
        # Keep the kwok pod Running long enough to report progress (Kueue may edit a suspended Job's template).
        batch.patch_namespaced_job(name, work, {"spec": {"template": {"metadata": {
            "annotations": {"sft.dev/kwok-delay": "15s"}}}}})
        manifest["spec"]["runPolicy"]["suspend"] = False
        apply_server_side(control_plane, work, manifest, tmp_path)

        def running_pod():
            pods = core.list_namespaced_pod(work, label_selector=f"{LABEL_JOB}={name}").items
            return next((p for p in pods if p.status.phase == "Running"), None)

        pod = control_plane.wait_for(running_pod, 40, "a Running trainer pod (the operator resumed the Job)")
        bound = client.V1BoundObjectReference(kind="Pod", api_version="v1", name=pod.metadata.name, uid=pod.metadata.uid)
        token = core.create_namespaced_service_account_token(
            pod.spec.service_account_name or "default", work,
            client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(
                audiences=[AUDIENCE], expiration_seconds=600, bound_object_ref=bound))).status.token
        report = {"step": 30, "totalSteps": 100, "epoch": 0.3, "trainLoss": 1.5, "learningRate": 2e-5,
                  "tokensPerSecond": 1000.0}
        code = operator.post_progress(work, name, token, report)
        assert code == 202, f"progress report answered {code}:\n{operator.log()[-3000:]}"

        seen: dict[str, Any] = {}

        def observe():
            obj = custom.get_namespaced_custom_object(GROUP, VERSION, work, PLURAL, name)
            status = obj.get("status") or {}
            if status.get("progress", {}).get("step") == 30:
                seen["progress"] = status["progress"]
            if any(c["type"] == "Succeeded" and c["status"] == "True" for c in status.get("conditions", [])):
                seen["succeeded"] = status
                seen["managedFields"] = obj["metadata"]["managedFields"]
            return "succeeded" in seen

        control_plane.wait_for(observe, 60, "SFTJob Succeeded")
        assert seen.get("progress", {}).get("percent") == 30 or seen["succeeded"]["progress"]["step"] == 30
        assert seen["succeeded"]["phase"] == "Succeeded"

        # The operator never writes the spec: only our field manager owns spec fields (docs/helm.md).
        spec_owners = {m["manager"] for m in seen["managedFields"] if "f:spec" in m.get("fieldsV1", {})}
        assert spec_owners == {FIELD_MANAGER}, seen["managedFields"]

        def event_reasons() -> set[str]:
            return {e.reason for e in core.list_namespaced_event(work).items
                    if e.involved_object.kind == "SFTJob" and e.involved_object.name == name}

        control_plane.wait_for(lambda: "Advice" in event_reasons(), 15, "the operator's advice event")

        def deleted():
            try:
                custom.get_namespaced_custom_object(GROUP, VERSION, work, PLURAL, name)
                return False
            except ApiException as exc:
                return exc.status == 404

        control_plane.wait_for(deleted, 30, "deletion by ttlSecondsAfterFinished")

        # RBAC denials read `User "system:serviceaccount:<ns>:<sa>" cannot <verb> resource ...`.
        log = operator.log()
        denied = [line for line in log.splitlines()
                  if f"system:serviceaccount:{ns}:{release.fullname}\" cannot" in line or "Not enough permissions" in line]
        assert not denied, "the operator was denied:\n" + "\n".join(denied[:10])
    finally:
        operator.stop()
        print(f"--- operator log ({mode}) ---\n{operator.log()[-6000:]}")
        release.uninstall()
        delete_namespace(control_plane, work)
