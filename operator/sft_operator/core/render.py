"""Pure builders: an SFTJob in, the children the operator creates out (plain dicts).

No I/O here; the handlers fetch, build, create-if-absent and patch status (dask-kubernetes style).
Child names are deterministic, so a handler that runs twice after a crash finds, not duplicates.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from sft_contract.exit_codes import NON_RETRIABLE, UNCOUNTED
from sft_contract.messages import PROGRESS_PATH
from sft_contract.references import split_pvc
from sft_contract.sources import remote_sources
from sft_contract.spec import DEFAULT_CACHE_SIZE, is_s3
from sft_operator.api import API_VERSION, KIND
from sft_operator.api.types import CacheDefaults, PlatformDefaults, SFTJob
from sft_operator.core.advice import grace_period_seconds

TRAINER_CONTAINER = "trainer"
FETCH_CONTAINER = "fetch"  # the init container that fills the cache (python -m sft_trainer.fetch)
CONFIG_DIR = "/etc/sft"
CONFIG_PATH = f"{CONFIG_DIR}/config.json"
CA_KEY = "ca.crt"
TOKEN_DIR = "/var/run/secrets/sft.dev/progress"
TOKEN_PATH = f"{TOKEN_DIR}/token"
PVC_ROOT = "/mnt/pvc"
CACHE_DIR = "/mnt/sft-cache"  # the cache volume: fetched sources, s3:// outputs staged (SFT_CACHE_DIR)
RENDEZVOUS_PORT = 29500
TRAINER_UID = 1000

LABEL_JOB = "sft.dev/job-name"
LABEL_KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
# On the Job: the platform defaults it was rendered with (JSON), which status.appliedDefaults shows.
ANNOTATION_APPLIED_DEFAULTS = "sft.dev/applied-defaults"
COMMON_LABELS = {"app.kubernetes.io/name": "sft-trainer", "app.kubernetes.io/managed-by": "sft-operator"}


@dataclass(frozen=True)
class RenderOptions:
    """Operator-wide settings the children depend on."""

    default_image: str = "ghcr.io/sft-operator/trainer:0.1.0"
    progress_base_url: str | None = None  # e.g. https://sft-operator.sft-system.svc:8443
    progress_ca_pem: str | None = None  # CA the trainer trusts for the progress endpoint
    token_audience: str = "sft.dev/progress"
    token_expiration_seconds: int = 3600
    # The platform's defaults for what a spec leaves out (its image is ``default_image``).
    defaults: PlatformDefaults = field(default_factory=PlatformDefaults)


def config_map_name(job_name: str) -> str:
    return f"{job_name}-config"


def service_name(job_name: str) -> str:
    return job_name


def trainer_job_name(job_name: str) -> str:
    return job_name


def cache_claim_name(job_name: str) -> str:
    """The cache claim the operator creates when the spec names none."""
    return f"{job_name}-cache"


def needs_cache(job: SFTJob) -> bool:
    """A cache volume is mounted when there is something to fetch (hub or s3:// sources), an s3:// output to
    stage, or the spec asks for one."""
    spec = job.spec
    return bool(remote_sources(spec)) or is_s3(spec.output.destination) or bool(spec.storage and spec.storage.cache)


def cache_claim(job: SFTJob) -> str | None:
    """The claim mounted at CACHE_DIR: the spec's ``storage.cache.claimName``, ours, or None (no cache)."""
    if not needs_cache(job):
        return None
    cache = job.spec.storage.cache if job.spec.storage else None
    return cache.claim_name if cache and cache.claim_name else cache_claim_name(job.metadata.name)


def pvc_claim(source: str) -> str | None:
    """`pvc://claim/path` -> `claim`; anything else -> None."""
    return split_pvc(source)[0] if source.startswith("pvc://") else None


def pvc_claims(job: SFTJob) -> dict[str, bool]:
    """Claims the spec reads or writes -> whether the trainer writes to it."""
    spec = job.spec
    reads = [spec.model.source, spec.dataset.train.source]
    if spec.dataset.validation:
        reads.append(spec.dataset.validation.source)
    if spec.dataset.general:
        reads.append(spec.dataset.general.source)
    if spec.evaluation.prompts:
        reads.append(spec.evaluation.prompts.source)
    claims = {c: False for c in map(pvc_claim, reads) if c}
    out_claim = pvc_claim(spec.output.destination)
    if out_claim:
        claims[out_claim] = True
    return dict(sorted(claims.items()))


def applied_defaults(job: SFTJob, options: RenderOptions) -> PlatformDefaults:
    """What the platform's defaults fill in for this job: each field its spec leaves out (the cache's only
    when the operator creates the claim)."""
    spec, platform = job.spec, options.defaults
    sched = spec.scheduling
    cache = spec.storage.cache if spec.storage else None
    own_claim = cache_claim(job) == cache_claim_name(job.metadata.name)
    cache_defaults = platform.cache or CacheDefaults()
    filled_cache = CacheDefaults(
        storage_class_name=cache_defaults.storage_class_name if not (cache and cache.storage_class_name) else None,
        size=cache_defaults.size if not (cache and cache.size) else None,
    )
    return PlatformDefaults(
        image=options.default_image if not spec.image else None,
        node_selector=platform.node_selector if not (sched and sched.node_selector) else None,
        tolerations=platform.tolerations if not (sched and sched.tolerations) else None,
        priority_class_name=platform.priority_class_name if not (sched and sched.priority_class_name) else None,
        cache=filled_cache if own_claim and (filled_cache.storage_class_name or filled_cache.size) else None,
    )


def defaults_json(defaults: PlatformDefaults) -> str:
    return json.dumps(defaults.model_dump(mode="json", by_alias=True, exclude_none=True), sort_keys=True,
                      separators=(",", ":"))


def _labels(job: SFTJob) -> dict[str, str]:
    return {**COMMON_LABELS, LABEL_JOB: job.metadata.name}


def _metadata(job: SFTJob, name: str, extra_labels: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": {**_labels(job), **(extra_labels or {})}}
    if job.metadata.namespace:
        meta["namespace"] = job.metadata.namespace
    uid = (job.metadata.model_extra or {}).get("uid")
    if uid:  # known once the SFTJob exists; `sftctl render` works offline without it
        meta["ownerReferences"] = [
            {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "name": job.metadata.name,
                "uid": uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
    return meta


def trainer_config_json(job: SFTJob) -> str:
    training = job.spec.training_part()
    return json.dumps(training.model_dump(mode="json", by_alias=True, exclude_none=True), indent=2, sort_keys=True)


def build_config_map(job: SFTJob, options: RenderOptions) -> dict[str, Any]:
    data = {"config.json": trainer_config_json(job)}
    if options.progress_ca_pem:
        data[CA_KEY] = options.progress_ca_pem
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(job, config_map_name(job.metadata.name)),
        "data": data,
    }


def build_service(job: SFTJob) -> dict[str, Any]:
    """Headless Service: stable DNS for the rank-0 pod (<job>-0.<service>) in multi-node runs."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(job, service_name(job.metadata.name)),
        "spec": {
            "clusterIP": "None",
            "selector": {LABEL_JOB: job.metadata.name},
            "publishNotReadyAddresses": True,
            "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT}],
        },
    }


def launch_args(job: SFTJob) -> list[str]:
    res = job.spec.resources
    name = job.metadata.name
    args = [f"--nnodes={res.nodes}", f"--nproc-per-node={max(1, res.gpus_per_node)}"]
    if res.nodes > 1:
        args += [
            "--node-rank=$(JOB_COMPLETION_INDEX)",
            f"--master-addr={trainer_job_name(name)}-0.{service_name(name)}",
            f"--master-port={RENDEZVOUS_PORT}",
        ]
    return args + ["--config", CONFIG_PATH]


def _env(job: SFTJob, options: RenderOptions) -> list[dict[str, Any]]:
    name, namespace = job.metadata.name, job.metadata.namespace
    env: list[dict[str, Any]] = [
        {"name": "SFT_CONFIG", "value": CONFIG_PATH},
        {"name": "SFT_JOB_NAME", "value": name},
        {"name": "SFT_JOB_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "SFT_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "SFT_PVC_ROOT", "value": PVC_ROOT},
        # The launcher gives torchrun's workers this long to save after SIGTERM (torchrun's own is 30 s).
        {"name": "SFT_TERMINATION_GRACE_SECONDS", "value": str(grace_period_seconds(job.spec))},
        {"name": "SFT_PROGRESS_TOKEN_FILE", "value": TOKEN_PATH},
        {"name": "HOME", "value": "/tmp"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    if cache_claim(job):  # everything downloaded lands on the cache volume, never in /tmp
        env += [{"name": "SFT_CACHE_DIR", "value": CACHE_DIR}, {"name": "HF_HOME", "value": f"{CACHE_DIR}/hf"}]
    else:
        env.append({"name": "HF_HOME", "value": "/tmp/hf"})
    if options.progress_base_url:
        ns = namespace or "$(SFT_JOB_NAMESPACE)"
        url = options.progress_base_url.rstrip("/") + PROGRESS_PATH.format(namespace=ns, name=name)
        env.append({"name": "SFT_PROGRESS_URL", "value": url})
    if options.progress_ca_pem:
        env.append({"name": "SFT_PROGRESS_CA_FILE", "value": f"{CONFIG_DIR}/{CA_KEY}"})
    uid = (job.metadata.model_extra or {}).get("uid")
    if uid:  # the run's identity: every pod and restart of this SFTJob resumes its checkpoints, no other's
        env.append({"name": "SFT_RUN_ID", "value": uid})
    ref = job.spec.model.token_secret_ref
    if ref:  # referenced, never inlined
        env.append(_secret_env("HF_TOKEN", ref.name, ref.key))
    s3 = job.spec.storage.s3 if job.spec.storage else None
    creds = s3.credentials_secret_ref if s3 else None
    if creds:  # without a reference the SDK's default chain applies (workload identity)
        env += [_secret_env("AWS_ACCESS_KEY_ID", creds.name, creds.access_key_id_key),
                _secret_env("AWS_SECRET_ACCESS_KEY", creds.name, creds.secret_access_key_key)]
        if creds.session_token_key:
            env.append(_secret_env("AWS_SESSION_TOKEN", creds.name, creds.session_token_key))
    mlflow = job.spec.tracking.mlflow if job.spec.tracking else None
    if mlflow and mlflow.token_secret_ref:
        env.append(_secret_env("MLFLOW_TRACKING_TOKEN", mlflow.token_secret_ref.name, mlflow.token_secret_ref.key))
    return env


def _secret_env(name: str, secret: str, key: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def _resources(job: SFTJob, gpus: bool = True) -> dict[str, Any]:
    res = job.spec.resources
    amounts: dict[str, str] = {}
    if res.gpus_per_node and gpus:
        amounts[res.gpu_resource_name] = str(res.gpus_per_node)
    if res.cpu:
        amounts["cpu"] = res.cpu
    if res.memory:
        amounts["memory"] = res.memory
    return {"requests": dict(amounts), "limits": dict(amounts)} if amounts else {}


def _volumes(job: SFTJob, options: RenderOptions) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": config_map_name(job.metadata.name)}},
        {
            "name": "progress-token",
            "projected": {
                "sources": [
                    {
                        "serviceAccountToken": {
                            "audience": options.token_audience,
                            "expirationSeconds": options.token_expiration_seconds,
                            "path": "token",
                        }
                    }
                ]
            },
        },
        {"name": "tmp", "emptyDir": {"sizeLimit": job.spec.resources.scratch_size}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "progress-token", "mountPath": TOKEN_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    claim = cache_claim(job)
    if claim:
        volumes.append({"name": "cache", "persistentVolumeClaim": {"claimName": claim}})
        mounts.append({"name": "cache", "mountPath": CACHE_DIR})
    shm = job.spec.resources.shared_memory
    if shm:
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    for index, (claim, writable) in enumerate(pvc_claims(job).items()):
        vol = f"pvc-{index}"
        volumes.append({"name": vol, "persistentVolumeClaim": {"claimName": claim, "readOnly": not writable}})
        mounts.append({"name": vol, "mountPath": f"{PVC_ROOT}/{claim}", "readOnly": not writable})
    return volumes, mounts


def pod_security_context() -> dict[str, Any]:
    """Pod Security Standards "restricted"."""
    return {
        "runAsNonRoot": True,
        "runAsUser": TRAINER_UID,
        "runAsGroup": TRAINER_UID,
        "fsGroup": TRAINER_UID,
        # A cache or output volume holds many GiB: chown it on mount only when its top is not ours yet.
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def pod_failure_policy(fetch: bool = False) -> dict[str, Any]:
    """Data and config errors fail the job at once; disruptions never count against backoffLimit.

    A disruption is a pod with the DisruptionTarget condition (evicted, preempted), or a trainer that
    exited 75 (Interrupted: SIGTERM, checkpoint saved) or 76 (PeerLost: another rank's pod died, so this
    one cannot go on). In a multi-node run every rank exits 75 or 76 when one pod is evicted, but only
    that pod carries DisruptionTarget. With a fetch stage (``fetch``),
    its terminal codes (NotFound, AccessDenied, CacheTooSmall) fail the job too, and its 75 (SIGTERM
    mid-download) is ignored as the trainer's: the Job API matches init containers by name as well.
    """
    fail = sorted(int(code) for code in NON_RETRIABLE)
    containers = [TRAINER_CONTAINER, FETCH_CONTAINER] if fetch else [TRAINER_CONTAINER]
    return {
        "rules": [
            *({"action": "FailJob", "onExitCodes": {"containerName": name, "operator": "In", "values": fail}}
              for name in containers),
            *({"action": "Ignore", "onExitCodes": {"containerName": name, "operator": "In",
                                                   "values": sorted(int(code) for code in UNCOUNTED)}}
              for name in containers),
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        ]
    }


def build_cache_claim(job: SFTJob, options: RenderOptions | None = None) -> dict[str, Any] | None:
    """The cache claim the operator creates (``<job>-cache``), or None when the spec names one or needs none.
    ReadWriteMany when several nodes share it; deleted with the SFTJob (ownerReference). What the spec
    leaves out comes from the platform's defaults, then DEFAULT_CACHE_SIZE."""
    if cache_claim(job) != cache_claim_name(job.metadata.name):
        return None
    cache = job.spec.storage.cache if job.spec.storage else None
    filled = applied_defaults(job, options or RenderOptions()).cache or CacheDefaults()
    size = (cache.size if cache and cache.size else None) or filled.size or DEFAULT_CACHE_SIZE
    spec: dict[str, Any] = {
        "accessModes": ["ReadWriteMany" if job.spec.resources.nodes > 1 else "ReadWriteOnce"],
        "resources": {"requests": {"storage": size}},
    }
    storage_class = (cache.storage_class_name if cache else None) or filled.storage_class_name
    if storage_class:
        spec["storageClassName"] = storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _metadata(job, cache_claim_name(job.metadata.name)),
        "spec": spec,
    }


def fetch_container(job: SFTJob, image: str, env: list[dict[str, Any]], mounts: list[dict[str, Any]]) -> dict[str, Any]:
    """The init container that downloads hub and s3:// sources into the cache once and then checks the data
    (``sft_trainer.datacheck``), before any rank starts: it reads the spec's claims, and writes none of them."""
    keep = {CONFIG_DIR, TOKEN_DIR, "/tmp", CACHE_DIR}
    res = job.spec.resources
    return {
        "name": FETCH_CONTAINER,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["python", "-m", "sft_trainer.fetch"],
        "args": ["--config", CONFIG_PATH, f"--world-size={res.nodes * max(1, res.gpus_per_node)}"],
        "env": env,
        # No GPUs: init containers run before the trainer, and the pod's request is the larger of the two.
        "resources": _resources(job, gpus=False),
        "volumeMounts": [m for m in mounts if m["mountPath"] in keep]
        + [{**m, "readOnly": True} for m in mounts if m["mountPath"].startswith(f"{PVC_ROOT}/")],
        "securityContext": container_security_context(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def build_job(job: SFTJob, options: RenderOptions) -> dict[str, Any]:
    spec = job.spec
    name = job.metadata.name
    nodes = spec.resources.nodes
    queue = spec.scheduling.queue_name if spec.scheduling else None
    job_labels = {LABEL_KUEUE_QUEUE: queue} if queue else {}
    volumes, mounts = _volumes(job, options)
    image = spec.image or options.default_image
    env = _env(job, options)
    container: dict[str, Any] = {
        "name": TRAINER_CONTAINER,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["python", "-m", "sft_trainer.launch"],
        "args": launch_args(job),
        "env": env,
        "ports": [{"name": "rendezvous", "containerPort": RENDEZVOUS_PORT}],
        "resources": _resources(job),
        "volumeMounts": mounts,
        "securityContext": container_security_context(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        # Time to save a checkpoint after SIGTERM: the spec's, or sized from the estimated checkpoint.
        "terminationGracePeriodSeconds": grace_period_seconds(spec),
        "subdomain": service_name(name),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": pod_security_context(),
        # The fetch stage always runs: it fetches what is remote, then checks the data before any rank starts.
        "initContainers": [fetch_container(job, image, env, mounts)],
        "containers": [container],
        "volumes": volumes,
    }
    if spec.service_account_name:
        pod_spec["serviceAccountName"] = spec.service_account_name
    sched = spec.scheduling
    filled = applied_defaults(job, options)
    priority = (sched.priority_class_name if sched else None) or filled.priority_class_name
    if priority:
        pod_spec["priorityClassName"] = priority
    node_selector = (sched.node_selector if sched else None) or filled.node_selector
    if node_selector:
        pod_spec["nodeSelector"] = dict(sorted(node_selector.items()))
    tolerations = (sched.tolerations if sched else None) or filled.tolerations
    if tolerations:
        pod_spec["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in tolerations]
    job_spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": nodes,
        "parallelism": nodes,
        "backoffLimit": spec.run_policy.backoff_limit,
        "suspend": spec.run_policy.suspend,
        "podFailurePolicy": pod_failure_policy(fetch=True),
        "template": {"metadata": {"labels": _labels(job)}, "spec": pod_spec},
    }
    if spec.run_policy.active_deadline_seconds:
        job_spec["activeDeadlineSeconds"] = spec.run_policy.active_deadline_seconds
    metadata = _metadata(job, trainer_job_name(name), job_labels)
    metadata["annotations"] = {ANNOTATION_APPLIED_DEFAULTS: defaults_json(filled)}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": job_spec}


def render_children(sftjob: SFTJob | dict[str, Any], options: RenderOptions | None = None) -> list[dict[str, Any]]:
    """The ConfigMap, headless Service, cache claim (when the operator creates one) and Indexed Job for one
    SFTJob, in creation order (the Job last: its pods need the rest)."""
    job = sftjob if isinstance(sftjob, SFTJob) else SFTJob.model_validate(sftjob)
    options = options or RenderOptions()
    claim = build_cache_claim(job, options)
    return [build_config_map(job, options), build_service(job), *([claim] if claim else []), build_job(job, options)]
