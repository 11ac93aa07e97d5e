"""What the trainer reported, into status: progress reports (``with_progress``) and the result rank 0
left in its termination message (``result_from_pods``, ``with_result``) (pure)."""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from sft_contract.messages import EvaluationResult, ProgressReport, TrainerResult
from sft_operator.api.types import Metrics, OutputStatus, ProgressStatus, Stage
from sft_operator.core.status.pods import finished_at, terminated_state
from sft_operator.core.status.vocabulary import SUCCEEDED_C, clip


def _dump(model: Any) -> dict[str, Any]:
    return model.model_dump(mode="json", by_alias=True, exclude_none=True)


STAGES = {"fetching": Stage.fetching, "training": Stage.training, "exporting": Stage.exporting}


def with_progress(status: dict[str, Any], report: ProgressReport) -> dict[str, Any]:
    """``status`` with a progress report applied: progress replaced, the report's metrics and output
    over the earlier ones (an eval loss from an earlier report is kept). The ETA is cleared rather
    than left stale, and 0 once the run is complete."""
    eta = report.eta_seconds
    if eta is None and report.total_steps > 0 and report.step >= report.total_steps:
        eta = 0
    progress = ProgressStatus(percent=report.percent, step=report.step, total_steps=report.total_steps,
                        epoch=report.epoch, eta_seconds=eta, stage=STAGES[report.stage or "training"],
                        bytes_done=report.bytes_done, bytes_total=report.bytes_total)
    metrics = Metrics.model_validate(report.run_metrics())
    output = OutputStatus(model=report.output_model or None, best_checkpoint=report.best_checkpoint or None)
    out = {**status, "progress": _dump(progress)}
    if _dump(metrics):
        out["metrics"] = {**(status.get("metrics") or {}), **_dump(metrics)}
    if _dump(output):
        out["output"] = {**(status.get("output") or {}), **_dump(output)}
    if report.evaluation is not None:
        out = with_evaluation(out, report.evaluation)
    if report.effective_batch_size is not None:
        out["effectiveBatchSize"] = report.effective_batch_size
    return with_data(out, report)


def with_data(status: dict[str, Any], report: ProgressReport) -> dict[str, Any]:
    """``status`` with the fetch stage's data check (``status.data``), if the report carries one. Applied even
    once the job has failed: a check that failed the job says why in numbers too."""
    return {**status, "data": _dump(report.data)} if report.data is not None else status


def with_result(status: dict[str, Any], result: TrainerResult) -> dict[str, Any]:
    """``status`` with a finished run's result (its termination message): output, final metrics, 100 %."""
    output = OutputStatus(model=result.output_model, uri=result.output_uri, best_checkpoint=result.best_checkpoint,
                          mlflow_run_id=result.mlflow_run_id)
    metrics = Metrics.model_validate(result.run_metrics())
    progress = {**(status.get("progress") or {}), "percent": 100, "etaSeconds": 0}  # what the result says wins
    for done in ("stage", "bytesDone", "bytesTotal"):  # the run is over: no stage any more
        progress.pop(done, None)
    said = {"step": result.steps, "totalSteps": result.total_steps or result.steps, "epoch": result.epochs}
    progress.update({k: v for k, v in said.items() if v is not None})
    out = {
        **status,
        "progress": _dump(ProgressStatus.model_validate(progress)),
        "metrics": {**(status.get("metrics") or {}), **_dump(metrics)},
        "output": {**(status.get("output") or {}), **_dump(output)},
    }
    if result.evaluation is not None:
        out = with_evaluation(out, result.evaluation)
    if result.warning:  # e.g. the tracking server was down: the run succeeded, a person should know
        said = f"; warning: {result.warning}"  # once: applying the same result again changes nothing
        out["conditions"] = [{**c, "message": clip(f"{c.get('message') or 'training finished'}{said}")}
                             if c.get("type") == SUCCEEDED_C and c.get("status") == "True"
                             and said not in (c.get("message") or "") else c
                             for c in status.get("conditions") or []]
    return out


def with_evaluation(status: dict[str, Any], evaluation: EvaluationResult) -> dict[str, Any]:
    """``status`` with the gates the trainer reported; a judged evaluation is never replaced by a baseline."""
    known = status.get("evaluation") or {}
    if known.get("passed") is not None and evaluation.passed is None:
        return status
    return {**status, "evaluation": _dump(evaluation)}


def completion_index(pod: dict[str, Any]) -> str | None:
    meta = pod.get("metadata") or {}
    key = "batch.kubernetes.io/job-completion-index"
    return (meta.get("labels") or {}).get(key) or (meta.get("annotations") or {}).get(key)


def result_pods(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rank 0's pods that succeeded: the last update of one of them carries the result (or never will)."""
    return [p for p in pods if (p.get("status") or {}).get("phase") == "Succeeded" and completion_index(p) in ("0", None)]


def result_from_pods(pods: list[dict[str, Any]]) -> TrainerResult | None:
    """The result rank 0 left in its termination message when it succeeded (the newest such pod)."""
    for pod in sorted(result_pods(pods), key=finished_at, reverse=True):
        state = terminated_state(pod) or {}
        message = (state.get("message") or "").strip()
        if state.get("exitCode") != 0 or not message.startswith("{"):
            continue
        try:
            return TrainerResult.model_validate(json.loads(message))
        except (ValueError, ValidationError):
            continue
    return None
