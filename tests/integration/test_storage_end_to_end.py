"""Object storage and tracking end to end on the real node: SFTJobs whose model and data live in S3, whose
output goes back to S3 and whose runs are logged to MLflow, run by the helm-installed operator
(test_end_to_end's `installed` fixture: its own release for this module) in the images
scripts/build-images.sh builds. Nothing is simulated:

- the S3 servers (moto: one accepting any keys, one checking signatures and IAM) and `mlflow server`
  run on this machine, bound only to the real node's bridge address (10.244.0.1), which is how pods
  reach the host; a TCP proxy in front of S3 slows transfers down so a test can act while one runs;
- the pods' fetch stage, training, export and tracking are the trainer image's, with the Secrets the
  renderer references, on the cache claims the operator creates (bound to the dev cluster's spare
  local volumes);
- what is asserted is what a user sees: status (phase, reason, progress stage and bytes, output URI,
  MLflow run id, restarts), Events, objects in the bucket, the MLflow run, and the S3 server's own
  request log (what was downloaded, and how often).

The scenarios are combined to keep the suite lean: five SFTJobs, the three failing ones at once (one on
bad rows, which the fetch stage's data check fails before the model loads). Measured warm (images built,
2 busy cores): the module ~2 min including the cluster's start; apply -> end ~26 s for the 2-pod job,
~35 s for the one killed mid-upload, ~5-8 s for the two storage failures, ~15 s for the bad rows (fetch,
the tokenizer loaded, the check). `pytest -s` prints each one's apply -> end time.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from kubernetes import client

from sft_devcluster import node as realnode
from storage_servers import FaultyProxy, MlflowServer, S3Server, free_port, start_mlflow, start_s3, stop

from .test_end_to_end import Installed, Run, installed  # noqa: F401  (the module's helm release)

pytestmark = [pytest.mark.cluster, pytest.mark.images, pytest.mark.trainer, pytest.mark.slow]

NODE_IP = realnode.NODE_IP  # the only address of this machine that pods reach
BUCKET = "sft-e2e"
SOURCES = {"models/tiny/": "model", "data/train.jsonl": "data/train.jsonl", "data/general.jsonl": "data/general.jsonl"}


@dataclass
class Storage:
    s3: S3Server  # any keys accepted
    s3_auth: S3Server  # signatures and IAM checked
    mlflow: MlflowServer
    objects: dict[str, int]  # the sources' object keys and sizes in BUCKET

    def source_gets(self, since: int = 0) -> dict[str, int]:
        """How many times each source object was downloaded (GET of the object itself) after ``since``."""
        counts = dict.fromkeys(self.objects, 0)
        for r in self.s3.requests(since):
            key = r.path.removeprefix(f"/{BUCKET}/")
            if r.method == "GET" and key in counts and r.status in (200, 206):
                counts[key] += 1
        return counts


@pytest.fixture(scope="module")
def storage(real_node, tiny_assets, tmp_path_factory) -> Storage:
    """The servers on the node's bridge address, and the tiny model and data in BUCKET."""
    tmp = tmp_path_factory.mktemp("storage-e2e")
    started = []
    try:
        for sub in ("s3", "s3-auth", "mlflow"):
            (tmp / sub).mkdir()
        s3 = start_s3(tmp / "s3", host=NODE_IP)
        started.append(s3.proc)
        s3_auth = start_s3(tmp / "s3-auth", auth=True, host=NODE_IP)
        started.append(s3_auth.proc)
        mlflow = start_mlflow(tmp / "mlflow", host=NODE_IP)
        started.append(mlflow.proc)
        objects = {}
        for target in (s3, s3_auth):
            c = target.client()
            c.create_bucket(Bucket=BUCKET)
            for prefix, local in SOURCES.items():
                path = tiny_assets / local
                files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
                for f in files:
                    key = prefix + f.relative_to(path).as_posix() if path.is_dir() else prefix
                    c.upload_file(str(f), BUCKET, key)
                    objects[key] = f.stat().st_size
        yield Storage(s3, s3_auth, mlflow, objects)
    finally:
        for proc in started:
            stop(proc)


@pytest.fixture(scope="module")
def secrets(installed, storage) -> dict[str, str]:
    """The Secrets a team creates (values never go into the SFTJob): S3 keys, right and wrong."""
    core = client.CoreV1Api(installed.cluster.api)
    made = {"s3-credentials": (storage.s3.access_key, storage.s3.secret_key),
            "s3-wrong-credentials": (storage.s3_auth.access_key, "not-the-secret-key")}
    for name, (key_id, secret) in made.items():
        core.create_namespaced_secret(installed.work, {"metadata": {"name": name}, "stringData": {
            "AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret}})
    return {name: name for name in made}


def s3_spec(endpoint: str, secret: str, name: str, *, mlflow: str | None = None, **spec) -> dict:
    """The spec fields (merged into the README's tiny example) of a job reading and writing BUCKET."""
    out = {
        "model": {"source": f"s3://{BUCKET}/models/tiny"},
        "dataset": {"train": {"source": f"s3://{BUCKET}/data/train.jsonl"},
                    "general": {"source": f"s3://{BUCKET}/data/general.jsonl", "mixRatio": 0.2, "heldOutRows": 50}},
        "output": {"destination": f"s3://{BUCKET}/runs/{name}"},
        "storage": {"s3": {"endpoint": endpoint, "region": "us-east-1", "credentialsSecretRef": {"name": secret}},
                    "cache": {"size": "1Gi"}},
        **spec,
    }
    if mlflow:
        out["tracking"] = {"mlflow": {"trackingUri": mlflow, "experiment": "sft-e2e"}}
    return out


def exported(storage: Storage, name: str) -> set[str]:
    listed = storage.s3.client().list_objects_v2(Bucket=BUCKET, Prefix=f"runs/{name}/").get("Contents", [])
    return {o["Key"].removeprefix(f"runs/{name}/") for o in listed}


def run_through(proxy: FaultyProxy, installed: Installed, name: str, tmp_path: Path, what: str, *, on_running,
                mlflow: str, **spec) -> Run:
    """Apply a job whose S3 traffic goes through ``proxy`` (the test throttles it from ``on_running``) and
    follow it to its end; prints apply -> end (`pytest -s`)."""
    applied = installed.apply(name, tmp_path, evaluation={"strategy": "no"},
                              **s3_spec(proxy.endpoint, "s3-credentials", name, mlflow=mlflow), **spec)
    try:
        run = installed.follow(name, applied, on_running=on_running)
    finally:
        proxy.close()
    print(f"\nSFTJob {name} ({what}): apply -> {run.status.get('phase')} {run.finished_after:.1f} s")
    return run


def test_a_two_node_sftjob_fetches_its_s3_sources_once_exports_to_s3_and_logs_to_mlflow(
        installed, storage, secrets, tmp_path):
    name = "s3-ddp"
    proxy = FaultyProxy(storage.s3.port, host=NODE_IP)
    proxy.rate = 1_000_000  # bytes/s: the fetch lasts a few seconds, long enough to watch it
    mark = storage.s3.mark()
    seen: dict[str, dict] = {}

    def watch(run: Run) -> None:
        progress = run.status.get("progress") or {}
        if run.status.get("reason") == "Fetching":
            seen.setdefault("reason", run.status)
        if progress.get("stage") == "Fetching":
            seen["progress"] = progress
        if "reason" in seen and "progress" in seen:
            proxy.rate = None  # seen: full speed for the rest

    run = run_through(proxy, installed, name, tmp_path, "2 pods, S3 + MLflow", on_running=watch,
                      mlflow=storage.mlflow.uri, resources={"nodes": 2}, hyperparameters={"maxSteps": 30},
                      checkpointing={"strategy": "steps", "steps": 30})
    status = run.status
    assert status.get("phase") == "Succeeded", installed.explain(name, status)

    # While the init containers ran, status said so: reason Fetching, and bytes done out of the total.
    assert seen.get("reason", {}).get("reason") == "Fetching", seen
    assert seen["progress"]["bytesTotal"] == sum(storage.objects.values()), seen["progress"]
    # The fetch stage ran in both pods, yet every object crossed the wire once: the second pod found it
    # in the shared (ReadWriteMany) cache the operator created.
    assert storage.source_gets(mark) == dict.fromkeys(storage.objects, 1)
    pods = installed.pods(name)
    assert len(pods) == 2 and all(p.spec.init_containers[0].name == "fetch" for p in pods)
    claim = client.CoreV1Api(installed.cluster.api).read_namespaced_persistent_volume_claim(f"{name}-cache", installed.work)
    assert claim.spec.access_modes == ["ReadWriteMany"] and claim.status.phase == "Bound"

    # The export: the model, metrics, log and plot, and COMPLETE (written last) listing them.
    files = exported(storage, name)
    assert {"model/model.safetensors", "model/config.json", "metrics.json", "trainer_log.jsonl", "loss.png",
            "COMPLETE"} <= files, files
    assert not [f for f in files if f.startswith("checkpoints/")]
    complete = json.loads(storage.s3.client().get_object(Bucket=BUCKET, Key=f"runs/{name}/COMPLETE")["Body"].read())
    assert set(complete["files"]) == files - {"COMPLETE"}

    # Status has the durable result: where the output is, and the MLflow run.
    assert status["output"]["uri"] == f"s3://{BUCKET}/runs/{name}"
    run_id = status["output"]["mlflowRunId"]
    ml = storage.mlflow.client().get_run(run_id)
    assert ml.info.status == "FINISHED" and ml.info.run_name == name
    assert ml.data.params["world_size"] == "2" and ml.data.params["effective_batch_size"] == "16"  # 8 x 1 x 2
    assert ml.data.tags["sft.output_uri"] == status["output"]["uri"] and ml.data.tags["sft.namespace"] == installed.work
    curve = storage.mlflow.client().get_metric_history(run_id, "train_loss")
    assert sorted(m.step for m in curve) == list(range(1, 31))
    assert "forgetting" in ml.data.metrics


def test_a_pod_killed_while_exporting_resumes_the_upload_from_the_cache_and_a_dead_tracker_costs_a_warning(
        installed, storage, secrets, tmp_path):
    name = "s3-resume"
    proxy = FaultyProxy(storage.s3.port, host=NODE_IP)
    dead_mlflow = f"http://{NODE_IP}:{free_port(NODE_IP)}"  # nothing listens there
    mark = storage.s3.mark()
    state: dict = {"killed": None, "exporting": None}

    def kill_during_upload(run: Run) -> None:
        if state["killed"]:
            # Slow until the killed pod has stopped (SIGTERM comes a moment after the delete), then full speed.
            if proxy.rate and not [p for p in installed.pods(name) if p.metadata.name == state["killed"][0]
                                   and p.status.phase in ("Pending", "Running")]:
                proxy.rate = None
            return
        if run.status.get("reason") == "PodsRunning":  # fetched: the trainer runs; slow the upload to come
            proxy.rate = 200_000  # bytes/s: model.safetensors (4 MiB) takes ~20 s
        progress = run.status.get("progress") or {}
        if progress.get("stage") == "Exporting":
            state["exporting"] = progress
        if state["exporting"] and "model/config.json" in exported(storage, name):  # mid-upload
            (pod,) = [p for p in installed.pods(name) if p.status.phase == "Running"]
            client.CoreV1Api(installed.cluster.api).delete_namespaced_pod(pod.metadata.name, installed.work)
            state["killed"] = (pod.metadata.name, exported(storage, name))

    # backoffLimit 0: had the kill counted as a failure, the job would have failed.
    run = run_through(proxy, installed, name, tmp_path, "killed while exporting", on_running=kill_during_upload,
                      mlflow=dead_mlflow, runPolicy={"backoffLimit": 0}, hyperparameters={"maxSteps": 40},
                      checkpointing={"strategy": "steps", "steps": 40})
    status = run.status
    assert state["killed"], "the upload finished before the pod could be killed"
    killed, stored_before = state["killed"]
    assert "COMPLETE" not in stored_before  # it really was cut off mid-export
    assert status.get("phase") == "Succeeded", installed.explain(name, status)
    assert status["restarts"] == 1, installed.explain(name, status)  # the kill, retried uncounted
    assert status["output"]["uri"] == f"s3://{BUCKET}/runs/{name}"
    assert state["exporting"] and state["exporting"]["bytesTotal"] > 0, state  # status showed the export
    assert "COMPLETE" in exported(storage, name)

    # The retry's fetch stage found everything in the cache: each source object was downloaded once.
    assert storage.source_gets(mark) == dict.fromkeys(storage.objects, 1)
    # ...and its export did not upload again what the killed pod had stored (same sha256: skipped).
    puts = [r for r in storage.s3.requests(mark) if r.method == "PUT" and r.path == f"/{BUCKET}/runs/{name}/model/config.json"]
    assert len(puts) == 1, puts
    (retry,) = [p for p in installed.pods(name) if p.metadata.name != killed]
    log = installed.logs(retry.metadata.name)
    skipped = re.search(r"(\d+) already there; COMPLETE written last", log)
    assert skipped and int(skipped.group(1)) >= 2, log[-3000:]

    # The tracking server was down the whole time: training succeeded anyway, and a person is told.
    assert "mlflowRunId" not in status["output"]
    warnings = [e for e in installed.events(name) if e.reason == "CompletedWithWarning"]
    assert len(warnings) == 1 and warnings[0].type == "Warning" and dead_mlflow in warnings[0].message, warnings
    succeeded = next(c for c in status["conditions"] if c["type"] == "Succeeded")
    assert dead_mlflow in succeeded["message"]


def test_wrong_credentials_a_missing_key_and_bad_rows_fail_at_once_naming_the_object_or_row_with_no_retry(
        installed, storage, secrets, tmp_path):
    denied = installed.apply("s3-denied", tmp_path, evaluation={"strategy": "no"},
                             **s3_spec(storage.s3_auth.endpoint, secrets["s3-wrong-credentials"], "s3-denied"))
    missing_spec = s3_spec(storage.s3.endpoint, secrets["s3-credentials"], "s3-missing")
    missing_spec["dataset"]["train"]["source"] = f"s3://{BUCKET}/data/missing.jsonl"
    missing = installed.apply("s3-missing", tmp_path, evaluation={"strategy": "no"}, **missing_spec)
    rows = [json.dumps({"instruction": f"Say {i}.", "output": str(i)}) for i in range(20)]
    rows[2] = json.dumps({"instruction": "No answer."})
    storage.s3.client().put_object(Bucket=BUCKET, Key="data/bad-rows.jsonl", Body="\n".join(rows).encode())
    bad_spec = s3_spec(storage.s3.endpoint, secrets["s3-credentials"], "s3-badrows")
    bad_spec["dataset"]["train"]["source"] = f"s3://{BUCKET}/data/bad-rows.jsonl"
    bad = installed.apply("s3-badrows", tmp_path, evaluation={"strategy": "no"}, **bad_spec)
    expected = {
        "s3-denied": ("AccessDenied", f"s3://{BUCKET}/models/tiny: access denied", denied),
        "s3-missing": ("NotFound", f"s3://{BUCKET}/data/missing.jsonl: not found", missing),
        # The data check: after the fetch, before any rank loads the model.
        "s3-badrows": ("DataError", "1 invalid row(s) of 20: ", bad),
    }
    for name, (reason, message, applied) in expected.items():
        run = installed.follow(name, applied, timeout=300)
        print(f"\nSFTJob {name}: apply -> Failed {run.finished_after:.1f} s")
        failed = next(c for c in run.status["conditions"] if c["type"] == "Failed")
        assert (run.status.get("phase"), failed["reason"]) == ("Failed", reason), installed.explain(name, run.status)
        assert f"the fetch stage of pod {name}-0-" in failed["message"] and message in failed["message"], failed
        if reason == "DataError":
            assert "data/bad-rows.jsonl row 3: missing field 'output'" in failed["message"], failed
            assert run.status["data"]["invalidRows"] == 1 and run.status["data"]["rows"] == 20, run.status
        # Terminal: no retry was used although backoffLimit allows 3.
        assert run.status["restarts"] == 0 and len(installed.pods(name)) == 1
        job = client.BatchV1Api(installed.cluster.api).read_namespaced_job(name, installed.work)
        assert job.status.failed == 1 and job.spec.backoff_limit == 3
