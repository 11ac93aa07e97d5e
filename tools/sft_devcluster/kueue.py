"""Kueue in the dev cluster: its manager as one more component (``kueue``), built from its Go module
(scripts/kueue-bin.sh), with its CRDs and webhooks.

A real install runs Kueue as a pod behind a Service, and its webhooks are called through that Service
with a certificate Kueue makes itself. Here the manager runs on the host like the rest of the control
plane, so its webhook server listens on loopback with a certificate from the cluster's CA, and the
webhook configurations call ``https://127.0.0.1:<port>/<path>`` instead of a Service. Only the batch/Job
integration is enabled (the operator's trainer Job is what Kueue queues: docs/operator.md), and only the
webhooks of what is enabled are registered: a webhook with ``failurePolicy: Fail`` whose path nobody
serves would refuse every pod or Deployment in the cluster.

    sftctl dev-cluster up --kueue          # or, on a running cluster: install(state_dir)
"""

from __future__ import annotations

import base64
import copy
import time
from pathlib import Path
from typing import Any

import yaml

from .pki import Pki, ensure_serving_cert
from .processes import DevClusterError, free_port, running, wait_until

NAMESPACE = "kueue-system"
FRAMEWORKS = ("batch/job",)
# Webhooks served with FRAMEWORKS enabled: Kueue's own kinds and batch/v1 Jobs.
WEBHOOK_GROUPS = {"kueue.x-k8s.io", "batch"}
WEBHOOK_KINDS = {"MutatingWebhookConfiguration": "mutating", "ValidatingWebhookConfiguration": "validating"}
PORTS = ("kueue-webhook", "kueue-health")
CERT_NAME = "kueue-webhook"
LOOPBACK = "127.0.0.1"
# With its internal cert manager off, Kueue's main reads a metrics certificate from this fixed path and
# exits if it is missing, even with metrics off (v0.17.0). Any valid pair will do: nothing scrapes it here.
METRICS_CERT_DIR = Path("/etc/kueue/metrics/certs")


def configuration(ports: dict[str, int], cert_dir: Path) -> dict[str, Any]:
    """Kueue's Configuration for the dev cluster (pure): webhook and probes on loopback, no leader
    election (one manager), certificates from ``cert_dir`` instead of its internal cert manager, no
    metrics endpoint (nothing scrapes it here)."""
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": NAMESPACE,
        "health": {"healthProbeBindAddress": f"{LOOPBACK}:{ports['kueue-health']}"},
        "metrics": {"bindAddress": "0"},
        "webhook": {"host": LOOPBACK, "port": ports["kueue-webhook"], "certDir": str(cert_dir)},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
        "manageJobsWithoutQueueName": False,
        "integrations": {"frameworks": list(FRAMEWORKS)},
    }


def loopback_webhooks(manifests: list[dict[str, Any]], port: int, ca_bundle: bytes) -> list[dict[str, Any]]:
    """Kueue's webhook configurations, with only the webhooks of ``WEBHOOK_GROUPS``, each calling the
    manager on loopback with ``ca_bundle`` (pure)."""
    out = []
    for manifest in manifests:
        manifest = copy.deepcopy(manifest)
        kept = []
        for hook in manifest.get("webhooks") or []:
            groups = {g for rule in hook.get("rules") or [] for g in rule.get("apiGroups") or []}
            if not groups or not groups <= WEBHOOK_GROUPS:
                continue
            path = hook["clientConfig"]["service"]["path"]
            hook["clientConfig"] = {"url": f"https://{LOOPBACK}:{port}{path}",
                                    "caBundle": base64.b64encode(ca_bundle).decode()}
            kept.append(hook)
        if kept:
            manifest["webhooks"] = kept
            manifest["metadata"] = {"name": f"kueue-{manifest['metadata']['name']}"}
            out.append(manifest)
    return out


def command(kueue_dir: Path, config_path: Path, kubeconfig: Path) -> list[str]:
    # The visibility API (an aggregated API server) needs an APIService and front proxy; not used here.
    return [str(kueue_dir / "bin" / "kueue"), f"--config={config_path}", f"--kubeconfig={kubeconfig}",
            "--feature-gates=VisibilityOnDemand=false", "--zap-log-level=info"]


def files(state_dir: Path) -> dict[str, Path]:
    base = state_dir / "kueue"
    return {"config": base / "config.yaml", "certs": base / "certs"}


def ensure_built() -> Path:
    """scripts/kueue-bin.sh: the Kueue dir (bin/kueue, crds/, webhooks.yaml), built once."""
    from .state import REPO_ROOT, run_build_script

    return run_build_script(REPO_ROOT / "scripts" / "kueue-bin.sh")


def prepare(info, kueue_dir: Path) -> None:
    """Ports, certificate and configuration of the ``kueue`` component of ``info``'s cluster."""
    state_dir = Path(info.state_dir)
    for name in PORTS:
        info.ports.setdefault(name, free_port())
    paths = files(state_dir)
    pki = Pki(state_dir / "pki")
    crt, key = ensure_serving_cert(pki, CERT_NAME, [f"IP:{LOOPBACK}", "DNS:localhost"])
    for directory in (paths["certs"], METRICS_CERT_DIR):
        try:
            directory.mkdir(parents=True, exist_ok=True)
            (directory / "tls.crt").write_bytes(crt.read_bytes())
            (directory / "tls.key").write_bytes(key.read_bytes())
            (directory / "tls.key").chmod(0o600)
        except PermissionError:
            raise DevClusterError(f"Kueue reads a certificate from {directory}, which this user cannot write: "
                                  "run as root (as the real node does)") from None
    paths["config"].write_text(yaml.safe_dump(configuration(info.ports, paths["certs"])))
    info.kueue = str(kueue_dir)
    info.save()


def install(state_dir: Path | None = None, timeout: float = 120.0, say=print):
    """Start Kueue in the running dev cluster of ``state_dir``: CRDs, its namespace, the manager, then the
    webhooks once it answers. Returns the updated ClusterInfo. Idempotent."""
    from kubernetes import client, config

    from . import cluster, control_plane

    state_dir, info = cluster._cluster_with(state_dir, "kube-apiserver")
    kueue_dir = ensure_built()
    api = config.new_client_from_config(config_file=info.kubeconfig)
    try:
        ext = client.ApiextensionsV1Api(api)
        crds = [yaml.safe_load(p.read_text()) for p in sorted((kueue_dir / "crds").glob("*.yaml"))]
        for crd in crds:
            _create_or_keep(lambda crd=crd: ext.create_custom_resource_definition(crd))
        _create_or_keep(lambda: client.CoreV1Api(api).create_namespace({"metadata": {"name": NAMESPACE}}))
        deadline = time.monotonic() + timeout
        wait_until("Kueue's CRDs Established", lambda: all(
            any(c.type == "Established" and c.status == "True"
                for c in ext.read_custom_resource_definition(crd["metadata"]["name"]).status.conditions or [])
            for crd in crds), deadline, {}, state_dir)
        prepare(info, kueue_dir)
        procs = {}
        if not running(state_dir, ["kueue"]):
            procs["kueue"] = cluster._launch(info, "kueue")
            info.pids["kueue"] = procs["kueue"].pid
            info.save()
            wait_until("kueue /readyz", lambda: control_plane.HEALTH_CHECKS["kueue"](info, 0.0), deadline, procs, state_dir)
        manifests = [d for d in yaml.safe_load_all((kueue_dir / "webhooks.yaml").read_text()) if d]
        ca = (state_dir / "pki" / "ca.crt").read_bytes()
        admission = client.AdmissionregistrationV1Api(api)
        for hooks in loopback_webhooks(manifests, info.ports["kueue-webhook"], ca):
            _create_or_replace(admission, hooks)
        # The webhooks answer through the API server: a dry-run ResourceFlavor goes through both of them.
        custom = client.CustomObjectsApi(api)
        probe = {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor",
                 "metadata": {"name": "sft-devcluster-probe"}, "spec": {}}
        wait_until("Kueue's webhooks answering", lambda: custom.create_cluster_custom_object(
            "kueue.x-k8s.io", "v1beta2", "resourceflavors", probe, dry_run="All") is not None,
            deadline, procs, state_dir)
    finally:
        api.close()
    say(f"kueue running (webhooks on https://{LOOPBACK}:{info.ports['kueue-webhook']})")
    return info


def uninstall(state_dir: Path | None = None) -> None:
    """Remove Kueue's webhooks (first: nothing must call a stopped server) and stop its manager. Its CRDs
    and objects stay."""
    from kubernetes import client, config

    from . import cluster

    state_dir, info = cluster._cluster_with(state_dir, "kueue")
    api = config.new_client_from_config(config_file=info.kubeconfig)
    try:
        admission = client.AdmissionregistrationV1Api(api)
        for kind in WEBHOOK_KINDS.values():
            try:
                getattr(admission, f"delete_{kind}_webhook_configuration")(f"kueue-{kind}-webhook-configuration")
            except client.ApiException as exc:
                if exc.status != 404:
                    raise
    finally:
        api.close()
    cluster.stop_component(state_dir, "kueue")
    cluster.pidfile(state_dir, "kueue").unlink(missing_ok=True)
    remove_host_files()
    info.kueue = ""
    info.pids.pop("kueue", None)
    info.save()


def remove_host_files() -> None:
    """Undo what ``prepare`` wrote outside the state dir (``down`` and ``uninstall``): the metrics
    certificate, and its folders up to /etc/kueue when nothing else is in them."""
    for name in ("tls.crt", "tls.key"):
        (METRICS_CERT_DIR / name).unlink(missing_ok=True)
    for folder in (METRICS_CERT_DIR, METRICS_CERT_DIR.parent, METRICS_CERT_DIR.parent.parent):
        try:
            folder.rmdir()
        except OSError:  # not empty (someone else's), or gone
            return


def _create_or_keep(create) -> None:
    from kubernetes import client

    try:
        create()
    except client.ApiException as exc:
        if exc.status != 409:
            raise


def _create_or_replace(admission, hooks: dict[str, Any]) -> None:
    """Create a webhook configuration, or replace the one of that name (a second install's port)."""
    from kubernetes import client

    kind, name = WEBHOOK_KINDS[hooks["kind"]], hooks["metadata"]["name"]
    try:
        getattr(admission, f"create_{kind}_webhook_configuration")(hooks)
    except client.ApiException as exc:
        if exc.status != 409:
            raise
        version = getattr(admission, f"read_{kind}_webhook_configuration")(name).metadata.resource_version
        getattr(admission, f"replace_{kind}_webhook_configuration")(
            name, {**hooks, "metadata": {**hooks["metadata"], "resourceVersion": version}})
