"""End to end on the real control plane: the operator runs, the real trainer fine-tunes the tiny
model on the process-backed node, progress flows trainer -> progress endpoint -> status, the
per-job metrics show on /metrics while it trains and disappear when it is done.

Nothing is mocked: kube-apiserver, the Job controller and the scheduler place the trainer pod
on ``sft-local-0``, which runs the pod's command (``python -m sft_trainer.launch ...``) as a
local process with its projected token; ``pvc://`` sources are PVCs bound by the kwok volume
stages, whose content lives in ``<state-dir>/pvc/<claim>`` on this machine.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from kubernetes import client

from sft_operator import GROUP, PLURAL, VERSION
from sft_trainer.config import TrainerResult

from .conftest import PROCESS_NODE_PLACEMENT
from support import OperatorProcess

pytestmark = [pytest.mark.cluster, pytest.mark.trainer, pytest.mark.slow]

# Long enough (~15 s of CPU training) for the trainer's 5 s progress posts to land at least twice.
MAX_STEPS = 300


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> Path:
    """The trainer engineer's offline tiny model + data (`python -m sft_trainer.tiny DIR`)."""
    out = tmp_path_factory.mktemp("tiny") / "tiny"
    result = subprocess.run([sys.executable, "-m", "sft_trainer.tiny", str(out)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, f"sft_trainer.tiny failed:\n{result.stdout}\n{result.stderr}"
    assert (out / "model" / "config.json").exists() and (out / "data" / "train.jsonl").exists()
    return out


@pytest.fixture
def operator(control_plane, namespace, tmp_path):
    op = OperatorProcess.plaintext(control_plane.kubeconfig, tmp_path / "operator.log", namespace)
    try:
        op.start()
        yield op
    finally:
        op.stop()


def job_series(text: str, namespace: str, name: str) -> dict[str, float]:
    """Per-job samples `sft_job_*{namespace=..., sftjob=...}` in a scrape."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(sft_job_[a-z_]+)\{([^}]*)\} (\S+)$", line)
        if m and f'namespace="{namespace}"' in m.group(2) and f'sftjob="{name}"' in m.group(2):
            out[m.group(1)] = float(m.group(3))
    return out


def pvc(name: str) -> dict:
    return {"metadata": {"name": name},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}


def test_tiny_model_trains_end_to_end(control_plane, namespace, operator, tiny_assets):
    core = client.CoreV1Api(control_plane.api)
    custom = client.CustomObjectsApi(control_plane.api)
    suffix = uuid.uuid4().hex[:6]
    assets_claim, output_claim = f"tiny-{suffix}", f"models-{suffix}"
    # The process node maps a claim to <state-dir>/pvc/<claim> (not namespaced): unique claim names.
    shutil.copytree(tiny_assets, control_plane.state_dir / "pvc" / assets_claim)
    for claim in (assets_claim, output_claim):
        core.create_namespaced_persistent_volume_claim(namespace, pvc(claim))

    name = "tiny-e2e"
    manifest = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "SFTJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"source": f"pvc://{assets_claim}/model"},
            "dataset": {
                "train": {"source": f"pvc://{assets_claim}/data/train.jsonl"},
                "validationSplit": 0.1,
                "maxSeqLength": 128,
            },
            "hyperparameters": {
                "learningRate": 1e-3,
                "maxSteps": MAX_STEPS,
                "perDeviceBatchSize": 8,
                "gradientAccumulationSteps": 1,
                "precision": "fp32",
            },
            "evaluation": {"strategy": "steps", "steps": 100},
            "checkpointing": {"strategy": "steps", "steps": 100, "keep": 1},
            "output": {"destination": f"pvc://{output_claim}/run"},
            "resources": {"gpusPerNode": 0},
            "scheduling": PROCESS_NODE_PLACEMENT,
        },
    }
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest)

    steps_seen: set[int] = set()
    losses_seen: set[float] = set()
    metrics_while_running: dict[str, float] = {}
    deadline = time.monotonic() + 600
    status: dict = {}
    while time.monotonic() < deadline:
        status = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name).get("status") or {}
        phase = status.get("phase")
        if phase in ("Succeeded", "Failed"):
            break
        step = (status.get("progress") or {}).get("step")
        loss = (status.get("metrics") or {}).get("trainLoss")
        if step is not None and loss is not None and (status.get("progress") or {}).get("totalSteps"):
            steps_seen.add(step)
            losses_seen.add(loss)
            if not metrics_while_running:
                metrics_while_running = job_series(operator.metrics(), namespace, name)
        assert operator.proc.poll() is None, f"the operator died:\n{operator.log_tail(200)}"
        time.sleep(0.25)
    else:
        pytest.fail(f"the SFTJob did not finish within 600 s; status {status}\noperator log:\n{operator.log_tail(200)}")

    pod_logs = "\n".join(
        f"--- {p.metadata.name}\n{control_plane.pod_log(namespace, p.metadata.name)[-6000:]}"
        for p in core.list_namespaced_pod(namespace, label_selector=f"sft.dev/job-name={name}").items
    )
    context = f"status: {status}\noperator log:\n{operator.log_tail(200)}\ntrainer pods:\n{pod_logs}"
    assert status.get("phase") == "Succeeded", context
    succeeded = {c["type"]: c for c in status.get("conditions") or []}.get("Succeeded")
    assert succeeded and succeeded["status"] == "True", context

    # Progress and the loss moved while it trained (at least two different steps observed).
    print(f"steps observed while running: {sorted(steps_seen)}; per-job series: {metrics_while_running}")
    assert len(steps_seen) >= 2, f"steps observed while running: {sorted(steps_seen)}\n{context}"
    assert len(losses_seen) >= 2 or len(steps_seen) >= 2
    assert status["progress"]["totalSteps"] == MAX_STEPS, context
    assert status["progress"]["step"] == MAX_STEPS and status["progress"]["percent"] == 100, context
    assert status["metrics"]["trainLoss"] > 0, context

    # The per-job series were on /metrics while it ran...
    assert {"sft_job_train_loss", "sft_job_progress_ratio"} <= set(metrics_while_running), metrics_while_running
    assert 0 <= metrics_while_running["sft_job_progress_ratio"] <= 1

    # ...the output is recorded and on the claim; the trainer left its result in the pod's termination
    # message, which is what the operator reads (a lost last progress report would change nothing)...
    output = status.get("output") or {}
    assert output.get("model") == f"pvc://{output_claim}/run/model", context
    (trainer_pod,) = core.list_namespaced_pod(namespace, label_selector=f"sft.dev/job-name={name}").items
    result = TrainerResult.model_validate_json(trainer_pod.status.container_statuses[0].state.terminated.message)
    assert f"pvc://{output_claim}/run" in (result.output_model or result.output_uri or ""), context
    model_dir = control_plane.state_dir / "pvc" / output_claim / "run" / "model"
    assert (model_dir / "config.json").exists(), f"{sorted(p.name for p in model_dir.glob('*'))}\n{context}"
    assert list(model_dir.glob("*.safetensors")), sorted(p.name for p in model_dir.glob("*"))

    # ...and the per-job series are gone once the job finished (bounded cardinality).
    control_plane.wait_for(lambda: not job_series(operator.metrics(), namespace, name), 30,
                           "per-job series to be removed from /metrics")
    scrape = operator.metrics()
    assert re.search(rf'sft_jobs_finished_total\{{[^}}]*namespace="{namespace}"[^}}]*result="Succeeded"', scrape), \
        "sft_jobs_finished_total counts the success"
