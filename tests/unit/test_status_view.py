"""`sftctl status` rendering: what a user reads for a live SFTJob."""

from __future__ import annotations

from rich.console import Console

from sft_operator.cli.status_view import exit_code, status_panel

RUNNING = {
    "metadata": {"name": "demo", "namespace": "team-a"},
    "status": {
        "phase": "Running",
        "progress": {"percent": 42, "step": 420, "totalSteps": 1000, "epoch": 1.26, "etaSeconds": 3725},
        "metrics": {"trainLoss": 1.2345, "evalLoss": 1.5, "bestEvalLoss": 1.4, "learningRate": 2e-5,
                    "tokensPerSecond": 12345.6},
        "restarts": 1,
        "effectiveBatchSize": 16,
        "conditions": [
            {"type": "Running", "status": "True", "reason": "PodsRunning", "message": "1 trainer pod(s) running",
             "lastTransitionTime": "2026-11-28T12:00:00Z"},
            {"type": "Failed", "status": "False", "reason": "Running", "message": ""},
        ],
    },
}


def text_of(obj) -> str:
    console = Console(width=160, record=True, color_system=None)
    console.print(status_panel(obj))
    return console.export_text()


def test_render_shows_progress_losses_and_conditions():
    text = text_of(RUNNING)
    for fragment in ("team-a/demo", "Running", "42%", "step 420/1000", "epoch 1.26", "1.2345", "1.5000",
                     "best 1.4000", "2.00e-05", "12,346", "1h02m05s", "PodsRunning", "Effective batch"):
        assert fragment in text, fragment
    assert exit_code(RUNNING) == 0


def test_render_a_fresh_job_without_status():
    text = text_of({"metadata": {"name": "new", "namespace": "x"}})
    assert "Pending" in text and "Progress" in text


def test_failed_job_exits_1_and_shows_the_reason():
    failed = {"metadata": {"name": "d", "namespace": "n"}, "status": {"phase": "Failed", "conditions": [
        {"type": "Failed", "status": "True", "reason": "DataError", "message": "row 17: missing field"}]}}
    assert exit_code(failed) == 1
    text = text_of(failed)
    assert "DataError" in text and "row 17" in text


def test_render_shows_the_data_check():
    checked = {**RUNNING, "status": {**RUNNING["status"], "data": {
        "format": "messages", "rows": 500, "invalidRows": 0, "duplicateRows": 3, "trainRows": 450,
        "validationRows": 50, "maxSeqLength": 2048, "truncatedRows": 7, "droppedRows": 1, "estimatedSteps": 170,
        "estimatedTokens": 567000, "estimatedTrainedTokens": 201000}}}
    assert ("500 rows (messages), 0 invalid, 3 duplicate, 7 truncated, 1 dropped; ~170 steps, ~567,000 tokens"
            in text_of(checked))
