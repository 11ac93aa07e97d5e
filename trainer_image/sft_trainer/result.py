"""The result of a successful run, as the operator reads it: rank 0's termination message.

``train.run`` returns its final metrics; ``write_result`` turns them (``result_from_metrics``) into a ``TrainerResult`` and
writes it as one JSON object to ``$SFT_TERMINATION_LOG`` (default /dev/termination-log). The
kubelet keeps at most 4096 bytes of that file in the pod's terminated state, where the operator
finds it even after a restart (CONTRACTS.md, "Result").
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from sft_contract.exit_codes import DEFAULT_TERMINATION_LOG
from sft_contract.messages import TrainerResult

TERMINATION_LIMIT = 4096  # bytes the kubelet reads from the termination message file
# Dropped in this order until the message fits (the evaluation also came in progress reports); outputModel
# always stays.
OPTIONAL_STRINGS = ("warning", "best_checkpoint", "mlflow_run_id", "output_uri", "evaluation")

log = logging.getLogger(__name__)


def result_from_metrics(metrics: dict[str, Any]) -> TrainerResult:
    """The result to write, from ``train.run``'s final metrics (the same keys as metrics.json): the
    contract's fields of them (the run's metrics among them), the rest left out. Needs outputModel."""
    if "outputModel" not in metrics:
        raise KeyError("outputModel")
    return TrainerResult.model_validate(metrics)


def termination_message(result: TrainerResult, limit: int = TERMINATION_LIMIT) -> str:
    """Compact JSON of at most ``limit`` UTF-8 bytes; optional locations are dropped if it would not fit."""
    data = result.model_dump(mode="json", by_alias=True, exclude_none=True)
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    for field in OPTIONAL_STRINGS:
        if len(text.encode()) <= limit:
            break
        data.pop(TrainerResult.model_fields[field].alias or field, None)
        text = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    if len(text.encode()) > limit:
        raise ValueError(f"the result does not fit the {limit}-byte termination message")
    return text


def write_result(metrics: dict[str, Any]) -> None:
    """On rank 0 only: the run's result to the termination message. Never fails the run."""
    if os.environ.get("RANK", "0") != "0":
        return
    path = os.environ.get("SFT_TERMINATION_LOG", DEFAULT_TERMINATION_LOG)
    try:
        text = termination_message(result_from_metrics(metrics))
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    except (OSError, ValueError, KeyError) as exc:  # outside a pod the file may not exist
        log.warning("the run's result was not written to %s: %s", path, exc)
