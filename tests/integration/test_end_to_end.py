"""End to end on the real node, with the images scripts/build-images.sh builds: what a platform
engineer and an ML engineer do on a real cluster, nothing simulated.

One `helm install` of the chart serves the module: the operator image runs on sft-node-0 in a
namespace that enforces Pod Security "restricted", talks to the API server in-cluster
(`kubernetes.default`, TLS) and serves its progress endpoint (TLS) and /metrics through the
chart's Service. SFTJobs run in a second restricted namespace: its `datasets` claim holds the
tiny offline model and data, its `models` claim receives the results (local volumes, i.e. folders
on this machine). The node advertises nvidia.com/gpu, so the renderer's unchanged GPU pods
schedule there and the trainer image trains on the CPU; trainer pods push progress through the
chart's Service with their projected token.

Each SFTJob is the README's examples/dev-cluster-tiny.yaml with fewer steps. The apply -> Running
and apply -> Succeeded times are printed (`pytest -s`); BENCHMARKS.md has them from
bench/real_node.py.
"""

from __future__ import annotations

import ipaddress
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from kubernetes import client

import sft_devcluster as devcluster
from sft_devcluster import node as realnode
from sft_operator.api import GROUP, PLURAL, VERSION
from sft_operator.core.render import LABEL_JOB
from sft_contract.messages import TrainerResult

from .conftest import ControlPlane
from .test_helm_install import CHART, RESTRICTED, Release, delete_namespace, make_namespace

pytestmark = [pytest.mark.cluster, pytest.mark.images, pytest.mark.trainer, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "dev-cluster-tiny.yaml"
OPERATOR_UID = 10001  # helm/sft-operator/values.yaml podSecurityContext.runAsUser


@dataclass
class Run:
    """What a user saw of one SFTJob: times from `kubectl apply`, status while it ran, the end."""

    name: str
    running_after: float | None = None
    finished_after: float | None = None
    steps_while_running: list[int] = field(default_factory=list)
    metrics_while_running: dict[str, float] = field(default_factory=dict)
    status: dict = field(default_factory=dict)


@dataclass
class Installed:
    """The chart installed on the real node's cluster, and a namespace to run SFTJobs in."""

    cluster: ControlPlane
    release: Release
    work: str
    models: Path  # host folder of the `models` claim in `work`

    def apply(self, name: str, tmp: Path, **spec) -> float:
        """`kubectl apply` the example as ``name`` with ``spec`` merged in; returns when it was applied."""
        manifest = yaml.safe_load(EXAMPLE.read_text())
        manifest["metadata"]["name"] = name
        manifest["spec"]["output"]["destination"] = f"pvc://models/{name}"
        for key, value in spec.items():
            manifest["spec"][key] = {**manifest["spec"].get(key, {}), **value}
        path = tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(manifest))
        applied = time.monotonic()
        self.cluster.kubectl("apply", "-n", self.work, "-f", str(path))
        return applied

    def status(self, name: str) -> dict:
        obj = client.CustomObjectsApi(self.cluster.api).get_namespaced_custom_object(GROUP, VERSION, self.work, PLURAL, name)
        return obj.get("status") or {}

    def metrics(self) -> str:
        """/metrics through the chart's Service (the API server's service proxy picks its endpoint)."""
        path = f"/api/v1/namespaces/{self.release.namespace}/services/{self.release.fullname}:metrics/proxy/metrics"
        return self.cluster.kubectl("get", "--raw", path).stdout

    def pods(self, name: str) -> list:
        return client.CoreV1Api(self.cluster.api).list_namespaced_pod(self.work, label_selector=f"{LABEL_JOB}={name}").items

    def logs(self, pod: str, all_containers: bool = False) -> str:
        """The trainer's log; with ``all_containers`` the fetch stage's (an init container) first."""
        return self.cluster.kubectl("logs", "-n", self.work, pod, *(["--all-containers"] if all_containers else []),
                                    check=False).stdout

    def events(self, name: str) -> list:
        """The Events on the SFTJob, as `kubectl describe sftjob` shows them."""
        return [e for e in client.CoreV1Api(self.cluster.api).list_namespaced_event(self.work).items
                if e.involved_object.kind == "SFTJob" and e.involved_object.name == name]

    def follow(self, name: str, applied: float, timeout: float = 600, on_running=None) -> Run:
        """Poll the SFTJob as `kubectl get sftjobs -w` would, until it ends."""
        run = Run(name)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run.status = self.status(name)
            phase = run.status.get("phase")
            if phase in ("Succeeded", "Failed"):
                run.finished_after = time.monotonic() - applied
                return run
            if phase == "Running":
                run.running_after = run.running_after or time.monotonic() - applied
                step = (run.status.get("progress") or {}).get("step")
                if step and step not in run.steps_while_running:
                    run.steps_while_running.append(step)
                    if not run.metrics_while_running:
                        run.metrics_while_running = job_series(self.metrics(), self.work, name)
                if on_running:
                    on_running(run)
            time.sleep(0.25)
        pytest.fail(f"SFTJob {name} did not finish within {timeout} s:\n{self.explain(name, run.status)}")

    def explain(self, name: str, status: dict) -> str:
        """Status, the trainer pods' logs and the operator's log, for a failure message."""
        pods = "\n".join(f"--- {p.metadata.name} ({p.status.phase})\n"
                         f"{self.logs(p.metadata.name, all_containers=True)[-4000:]}" for p in self.pods(name))
        operator = self.cluster.kubectl("logs", "-n", self.release.namespace, f"deployment/{self.release.fullname}",
                                        "--tail=80", check=False).stdout
        return f"status: {status}\ntrainer pods:\n{pods}\noperator log:\n{operator}"


def job_series(text: str, namespace: str, name: str) -> dict[str, float]:
    """Per-job samples `sft_job_*{namespace=..., sftjob=...}` in a scrape."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(sft_job_[a-z_]+)\{([^}]*)\} (\S+)$", line)
        if m and f'namespace="{namespace}"' in m.group(2) and f'sftjob="{name}"' in m.group(2):
            out[m.group(1)] = float(m.group(3))
    return out


def unreadable_by_others(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.is_file() and not p.stat().st_mode & 0o004]


@pytest.fixture(scope="module")
def installed(request, real_node, images, tiny_assets) -> Installed:
    """The chart with the built operator image in a restricted namespace, and a restricted namespace
    whose claims hold the tiny assets (`datasets`) and receive the results (`models`). Helm values: the
    module's `RELEASE_VALUES` where it sets them, else none, as a user installs."""
    for image in images.values():  # imported only when the node lacks this build
        real_node.import_images(image.tar)
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    # The chart's defaults are the refs the build script tags: the user installs with no --set.
    assert images["operator"].ref == f"{values['image']['repository']}:{chart['appVersion']}"
    assert images["trainer"].ref == values["trainer"]["image"]

    system = make_namespace(real_node, "sft-system", RESTRICTED)
    work = make_namespace(real_node, "team-a", RESTRICTED)
    release = Release(real_node, system, getattr(request.module, "RELEASE_VALUES", {}))
    datasets = devcluster.create_volume(real_node.api, real_node.state_dir, work, "datasets")
    shutil.copytree(tiny_assets, datasets / "tiny", dirs_exist_ok=True)
    models = devcluster.create_volume(real_node.api, real_node.state_dir, work, "models")
    try:
        release.install()
        yield Installed(real_node, release, work, models)
    finally:
        release.uninstall()
        delete_namespace(real_node, work)
        delete_namespace(real_node, system)


def test_operator_runs_on_the_real_node_as_non_root_on_a_read_only_root(installed):
    cluster, release = installed.cluster, installed.release
    selector = f"app.kubernetes.io/instance={release.name},app.kubernetes.io/component=operator"
    (pod,) = client.CoreV1Api(cluster.api).list_namespaced_pod(release.namespace, label_selector=selector).items
    assert pod.spec.node_name == realnode.NODE_NAME
    assert ipaddress.ip_address(pod.status.pod_ip) in ipaddress.ip_network(realnode.POD_CIDR)
    assert {c.type: c.status for c in pod.status.conditions}["Ready"] == "True"
    # What the runtime enforces, seen from inside the container (kubectl exec through the kubelet).
    probe = ("import os; print(os.getuid(), os.getgid()); "
             "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('CapEff')][0])\n"
             "try: open('/probe', 'w')\nexcept OSError as e: print(e.strerror)")
    inside = cluster.kubectl("exec", "-n", release.namespace, pod.metadata.name, "--", "python", "-c", probe, check=False)
    assert inside.returncode == 0, inside.stderr
    assert inside.stdout.splitlines() == [f"{OPERATOR_UID} {OPERATOR_UID}", "0000000000000000", "Read-only file system"]


def test_the_node_keeps_each_image_once(installed, images):
    """Imported images are kept as unpacked snapshots only: the trainer's 6 GiB of layers are not
    also stored as blobs in containerd's content store (disk is what a dev machine runs out of)."""
    ctr = [str(devcluster.state.node_cache_dir() / "bin" / "ctr"), f"--address={realnode.RUN_DIR}/containerd.sock",
           "--namespace=k8s.io"]
    listed = subprocess.run(ctr + ["images", "ls", "-q"], capture_output=True, text=True, check=True).stdout.split()
    assert {images["operator"].ref, images["trainer"].ref} <= set(listed)
    blobs = devcluster.state.node_cache_dir() / "containerd" / "io.containerd.content.v1.content" / "blobs"

    def blob_bytes() -> int:
        return sum(f.stat().st_size for f in blobs.rglob("*") if f.is_file())

    # containerd's garbage collector drops the layer blobs shortly after an import.
    installed.cluster.wait_for(lambda: blob_bytes() < 64 * 2**20, 60, "layer blobs to leave the content store")


def test_tiny_sftjob_trains_in_the_trainer_image_and_reports_progress_through_the_service(installed, images, tmp_path):
    name = "tiny"
    # ~8 s of training on 2 cores: long enough for two of the trainer's 5 s progress posts.
    applied = installed.apply(name, tmp_path, hyperparameters={"maxSteps": 200},
                              evaluation={"strategy": "steps", "steps": 100},
                              checkpointing={"strategy": "steps", "steps": 100, "keep": 1})
    run = installed.follow(name, applied)
    print(f"\nSFTJob {name} on the real node: apply -> Running {run.running_after:.1f} s, "
          f"apply -> Succeeded {run.finished_after:.1f} s; steps seen while Running: {run.steps_while_running}")
    status = run.status
    assert status.get("phase") == "Succeeded", installed.explain(name, status)
    # The operator (in-cluster, TLS to kubernetes.default) made the Job, the pod ran on the real node...
    (pod,) = installed.pods(name)
    assert pod.spec.node_name == realnode.NODE_NAME and pod.status.phase == "Succeeded"
    assert pod.spec.containers[0].image == images["trainer"].ref
    wide = installed.cluster.kubectl("get", "pods", "-n", installed.work, "-o", "wide").stdout
    assert pod.status.pod_ip in wide and realnode.NODE_NAME in wide
    env = {e.name: e.value for e in pod.spec.containers[0].env}
    assert env["SFT_PROGRESS_URL"].startswith(f"https://{installed.release.fullname}.{installed.release.namespace}.svc:8443/")

    # ...progress came through the chart's Service (TLS, projected token) while it trained...
    assert len(run.steps_while_running) >= 2, run.steps_while_running
    assert status["progress"]["step"] == status["progress"]["totalSteps"] == 200
    assert status["progress"]["percent"] == 100 and status["metrics"]["trainLoss"] > 0
    # ...and /metrics, scraped through the Service, showed the job while it ran, and its end after.
    assert {"sft_job_train_loss", "sft_job_progress_ratio"} <= set(run.metrics_while_running), run.metrics_while_running
    finished = rf'sft_jobs_finished_total\{{[^}}]*namespace="{installed.work}"[^}}]*result="Succeeded"[^}}]*\}} 1\.0'
    installed.cluster.wait_for(lambda: re.search(finished, installed.metrics()), 30, "sft_jobs_finished_total")
    installed.cluster.wait_for(lambda: not job_series(installed.metrics(), installed.work, name), 30,
                               "the per-job series to go from /metrics (bounded cardinality)")

    # The model is on the claim: files in the volume's folder on this machine, readable by anyone.
    out = installed.models / name
    assert (out / "model" / "config.json").exists() and list((out / "model").glob("*.safetensors")), \
        sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert unreadable_by_others(out / "model") == []
    assert status["output"]["model"] == f"pvc://models/{name}/model"
    # The trainer left its result in the pod's termination message, which is what the operator reads
    # (an operator restart or a lost last progress report changes nothing).
    result = TrainerResult.model_validate_json(pod.status.container_statuses[0].state.terminated.message)
    assert result.output_model == f"pvc://models/{name}/model" and result.steps == 200

    # kubectl logs shows the trainer's lines: its plan, and one progress line per step.
    logs = installed.logs(pod.metadata.name)
    assert "training: 200 steps" in logs, logs[-3000:]
    assert '{"event": "progress", "step": 200, "totalSteps": 200' in logs


def test_two_node_sftjob_trains_with_ddp_over_the_pod_network(installed, tmp_path):
    name = "ddp"
    applied = installed.apply(name, tmp_path, hyperparameters={"maxSteps": 30}, resources={"nodes": 2},
                              evaluation={"strategy": "no"})
    run = installed.follow(name, applied)
    print(f"\nSFTJob {name} (2 pods, DDP): apply -> Running {run.running_after:.1f} s, "
          f"apply -> Succeeded {run.finished_after:.1f} s")
    assert run.status.get("phase") == "Succeeded", installed.explain(name, run.status)
    pods = {p.metadata.annotations["batch.kubernetes.io/job-completion-index"]: p for p in installed.pods(name)}
    assert set(pods) == {"0", "1"}, pods
    assert all(p.spec.node_name == realnode.NODE_NAME and p.status.phase == "Succeeded" for p in pods.values())
    assert pods["0"].status.pod_ip != pods["1"].status.pod_ip
    # Rank 1 found rank 0 by the headless Service's DNS name, and both trained as one world of 2.
    assert f"--master-addr={name}-0.{name}" in pods["1"].spec.containers[0].args
    rank0 = installed.logs(pods["0"].metadata.name)
    assert "x 2 processes" in rank0, rank0[-3000:]
    assert (installed.models / name / "model" / "config.json").exists()


def test_a_deleted_trainer_pod_resumes_from_its_checkpoint_without_counting_against_backoff_limit(installed, tmp_path):
    name = "resume"
    # backoffLimit 0: had the deletion counted as a failure, the job would fail.
    applied = installed.apply(name, tmp_path, hyperparameters={"maxSteps": 600}, runPolicy={"backoffLimit": 0},
                              evaluation={"strategy": "no"},
                              checkpointing={"strategy": "steps", "steps": 50, "keep": 2})
    checkpoints = installed.models / name / "checkpoints"
    deleted: list[str] = []

    def delete_once_a_checkpoint_exists(run: Run) -> None:
        if deleted or not list(checkpoints.glob("*/COMPLETE")):
            return
        for pod in installed.pods(name):
            if pod.status.phase == "Running":  # `kubectl delete pod`: SIGTERM, then the grace period
                client.CoreV1Api(installed.cluster.api).delete_namespaced_pod(pod.metadata.name, installed.work)
                deleted.append(pod.metadata.name)

    run = installed.follow(name, applied, on_running=delete_once_a_checkpoint_exists)
    assert deleted, "the trainer finished before a checkpoint was complete"
    status = run.status
    assert status.get("phase") == "Succeeded", installed.explain(name, status)
    assert status.get("restarts", 0) >= 1, status
    assert status["progress"]["step"] == 600
    # The next pod resumed from a step > 0 (the checkpoint the first one saved on SIGTERM, or an earlier one).
    (resumed,) = [p for p in installed.pods(name) if p.metadata.name not in deleted]
    match = re.search(r"resumed from \S+ \(step (\d+)", installed.logs(resumed.metadata.name))
    assert match and int(match.group(1)) > 0, installed.logs(resumed.metadata.name)[-3000:]
