"""GitOps assets: the Argo CD health check for SFTJob, run in a real Lua interpreter.

Argo CD runs health checks in gopher-lua (Lua 5.1); `lupa` (dev extra) embeds Lua 5.1 here.
"""

from __future__ import annotations

import copy

import pytest
import yaml

from sft_operator.core import status as sft_status

from .helpers import ROOT

GITOPS = ROOT / "gitops"
HEALTH_LUA = GITOPS / "argocd-health-sftjob.lua"

RUNNING = {
    "apiVersion": "sft.dev/v1alpha1",
    "kind": "SFTJob",
    "metadata": {"name": "demo", "namespace": "team-a", "generation": 1},
    "spec": {"model": {"source": "Qwen/Qwen2.5-0.5B"}, "runPolicy": {"suspend": False}},
    "status": {
        "observedGeneration": 1,
        "phase": "Running",
        "conditions": [
            {"type": "Created", "status": "True", "reason": "ChildrenCreated"},
            {"type": "Running", "status": "True", "reason": "PodsRunning"},
        ],
        "progress": {"percent": 42, "step": 420, "totalSteps": 1000},
        "metrics": {"trainLoss": 1.23456},
    },
}


def _lua():
    try:
        from lupa import lua51
    except ImportError as exc:  # the dev extra installs it
        pytest.fail(f"lupa (Lua for Python) is needed to run the Argo CD health check: {exc}", pytrace=False)
    return lua51.LuaRuntime(unpack_returned_tuples=True)


def health(obj: dict) -> tuple[str, str]:
    lua = _lua()
    lua.globals().obj = lua.table_from(obj, recursive=True)
    # Argo CD wraps the script the same way: it runs as a chunk whose `return` is the result.
    result = lua.execute(HEALTH_LUA.read_text())
    return result["status"], result["message"]


def with_status(**changes) -> dict:
    obj = copy.deepcopy(RUNNING)
    obj["status"].update(changes)
    return obj


def test_new_sftjob_is_progressing():
    obj = copy.deepcopy(RUNNING)
    del obj["status"]
    assert health(obj)[0] == "Progressing"


def test_running_sftjob_is_progressing_with_phase_progress_and_loss():
    state, message = health(RUNNING)
    assert state == "Progressing"
    assert message == "Running 42% loss 1.235"


def test_succeeded_is_healthy():
    obj = with_status(phase="Succeeded", conditions=[
        {"type": "Running", "status": "False", "reason": "Completed"},
        {"type": "Succeeded", "status": "True", "reason": "Completed", "message": "training finished"},
    ], output={"model": "pvc://models/demo"})
    state, message = health(obj)
    assert state == "Healthy"
    assert message == "Completed: training finished; model at pvc://models/demo"


def test_failed_is_degraded_with_the_reason():
    obj = with_status(phase="Failed", conditions=[
        {"type": "Succeeded", "status": "False", "reason": "OOMKilled"},
        {"type": "Failed", "status": "True", "reason": "OOMKilled", "message": "rank 0 ran out of memory"},
    ])
    assert health(obj) == ("Degraded", "OOMKilled: rank 0 ran out of memory")


def test_phase_alone_decides_nothing_terminal():
    """Automation reads conditions: a phase without its condition stays Progressing."""
    assert health(with_status(phase="Succeeded", conditions=[]))[0] == "Progressing"


def test_suspended_is_suspended():
    obj = with_status(phase="Suspended", conditions=[
        {"type": "Suspended", "status": "True", "reason": "Suspended", "message": "runPolicy.suspend is true"}])
    obj["spec"]["runPolicy"]["suspend"] = True
    assert health(obj) == ("Suspended", "Suspended: runPolicy.suspend is true")


def test_an_edit_the_operator_has_not_seen_is_progressing():
    obj = with_status(phase="Suspended", conditions=[{"type": "Suspended", "status": "True", "reason": "Suspended"}])
    obj["metadata"]["generation"] = 2  # the user just resumed it
    state, message = health(obj)
    assert state == "Progressing" and "generation 2" in message


def test_waiting_reason_is_shown():
    obj = with_status(phase="Pending", conditions=[
        {"type": "Running", "status": "False", "reason": "Unschedulable", "message": "0/3 nodes have a free GPU"}])
    obj["status"].pop("progress")
    obj["status"].pop("metrics")
    assert health(obj) == ("Progressing", "Pending (Unschedulable: 0/3 nodes have a free GPU)")


def test_health_check_reads_the_operators_condition_types():
    for kind in ("Failed", "Succeeded", "Suspended", "Running"):
        assert kind in sft_status.CONDITION_TYPES
        assert f'"{kind}"' in HEALTH_LUA.read_text()


def test_argocd_cm_patch_carries_the_health_check_verbatim():
    patch = yaml.safe_load((GITOPS / "argocd-cm-patch.yaml").read_text())
    assert patch["data"]["resource.customizations.health.sft.dev_SFTJob"] == HEALTH_LUA.read_text()
