"""The wire messages between the trainer and the operator: progress reports, the final result, the gates' outcome
and the data check's summary. Both sides import them; nothing here imports more than pydantic."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from .spec import ApiModel


class TokenLengths(ApiModel):
    """Row lengths in tokens (prompt and response, EOS included), before maxSeqLength applies."""

    min: int = Field(ge=0, le=10**9)
    p50: int = Field(ge=0, le=10**9)
    p95: int = Field(ge=0, le=10**9)
    max: int = Field(ge=0, le=10**9)
    mean: float = Field(ge=0.0, le=1e9)


class DataSummary(ApiModel):
    """What the data check (sft_trainer.datacheck) found before any model weight was loaded: the fetch stage
    reports it and the operator keeps it as ``status.data``."""

    format: Annotated[str, Field(max_length=32)] = Field(description="The row format: instruction, messages, ...")
    rows: int = Field(ge=0, le=10**12, description="Rows read from the train and validation sources.")
    invalid_rows: int = Field(ge=0, le=10**12, description="Rows the trainer would refuse.")
    first_invalid: Annotated[list[Annotated[str, Field(max_length=512)]], Field(max_length=5)] | None = Field(
        default=None, description="The first invalid rows, each as `file row N: why` (for JSONL, N is the line)."
    )
    duplicate_rows: int = Field(ge=0, le=10**12, description="Rows identical to an earlier row.")
    train_rows: int = Field(ge=0, le=10**12, description="Training rows after the validation split and drops.")
    validation_rows: int = Field(ge=0, le=10**12)
    general_rows: int = Field(default=0, ge=0, le=10**12, description="General rows mixed into training.")
    max_seq_length: int = Field(ge=1, le=10**9)
    truncated_rows: int = Field(ge=0, le=10**12, description="Rows longer than maxSeqLength, cut (overlong: truncate).")
    dropped_rows: int = Field(
        ge=0, le=10**12, description="Rows left out: too long (overlong: drop), or no response left after the cut."
    )
    token_lengths: TokenLengths | None = Field(default=None, description="Training row lengths in tokens.")
    estimated_steps: int = Field(ge=0, le=10**12, description="Optimizer steps the run will take.")
    estimated_tokens: int = Field(ge=0, le=10**15, description="Tokens the run will process (all epochs).")
    estimated_trained_tokens: int = Field(ge=0, le=10**15, description="Of those, response tokens that carry a loss.")


class GateOutcome(ApiModel):
    """One gate's result: the base model's and the tuned model's value and whether the gate passed."""

    model_config = ApiModel.model_config | {"extra": "ignore"}

    metric: Annotated[str, Field(max_length=32)]
    direction: Literal["lower", "higher"]
    base: float | None = Field(default=None, allow_inf_nan=False, ge=-1e9, le=1e9)
    tuned: float | None = Field(default=None, allow_inf_nan=False, ge=-1e9, le=1e9)
    threshold: float | None = Field(default=None, allow_inf_nan=False, ge=-1e9, le=1e9)
    min_change: float | None = Field(default=None, allow_inf_nan=False, ge=-1e9, le=1e9)
    on_fail: Literal["Fail", "Mark"] = "Fail"
    passed: bool | None = Field(default=None, description="None while the tuned model is not measured yet.")
    message: Annotated[str, Field(max_length=256)] | None = Field(default=None, description="Why it failed.")


class EvaluationResult(ApiModel):
    """The gates of a run: base values from the start, tuned values and the verdict from the end."""

    model_config = ApiModel.model_config | {"extra": "ignore"}

    passed: bool | None = Field(default=None, description="Every gate passed; None until the tuned model is measured.")
    gates: Annotated[list[GateOutcome], Field(max_length=8)] = Field(default_factory=list)


# Where a trainer POSTs its ProgressReport, below the operator's progress URL (the one copy of it).
PROGRESS_PATH = "/v1/namespaces/{namespace}/sftjobs/{name}/progress"


class RunMetrics(ApiModel):
    """The run's numbers as ``status.metrics`` shows them: the one list of them. ProgressReport and
    TrainerResult inherit these fields, so on the wire they stay flat (``trainLoss`` beside ``step``).
    The trainer's result leaves out ``learningRate`` (a run that ended has no current rate)."""

    train_loss: float | None = Field(default=None, allow_inf_nan=False, ge=0.0, le=1e6)
    eval_loss: float | None = Field(default=None, allow_inf_nan=False, ge=0.0, le=1e6)
    best_eval_loss: float | None = Field(default=None, allow_inf_nan=False, ge=0.0, le=1e6)
    learning_rate: float | None = Field(default=None, allow_inf_nan=False, ge=0.0, le=10.0)
    tokens_per_second: float | None = Field(default=None, allow_inf_nan=False, ge=0.0, le=1e12)
    general_loss_before: float | None = Field(
        default=None, allow_inf_nan=False, ge=0.0, le=1e6, description="Loss on held-out general data before."
    )
    general_loss_after: float | None = Field(
        default=None, allow_inf_nan=False, ge=0.0, le=1e6, description="Loss on held-out general data after."
    )

    def run_metrics(self) -> dict[str, float]:
        """Just the run's metrics that are set, by field name (a subclass's other fields left out)."""
        return {name: value for name in RunMetrics.model_fields if (value := getattr(self, name)) is not None}


class RunPosition(ApiModel):
    """Where a run is. A base of its own so that a report's JSON (and its log line) starts with it."""

    step: int = Field(ge=0, le=10**9)
    total_steps: int = Field(ge=0, le=10**9)
    epoch: float = Field(ge=0.0, le=1e6)


class ProgressReport(RunMetrics, RunPosition):  # pydantic orders fields from the last base: position first
    """What the trainer pushes to the operator's progress endpoint (size-bounded): where the run is
    (RunPosition) and its metrics (RunMetrics)."""

    eta_seconds: int | None = Field(default=None, ge=0, le=10**8)
    effective_batch_size: int | None = Field(default=None, ge=1, le=10**8)
    output_model: Annotated[str, Field(max_length=1024)] | None = None
    best_checkpoint: Annotated[str, Field(max_length=1024)] | None = None
    message: Annotated[str, Field(max_length=1024)] | None = None
    # Fetch stage, export and tracking (docs/storage.md). A report with stage "fetching" has step 0.
    stage: Literal["fetching", "training", "exporting"] | None = None
    bytes_done: int | None = Field(default=None, ge=0, le=10**15)
    bytes_total: int | None = Field(default=None, ge=0, le=10**15)
    data: DataSummary | None = None  # the fetch stage's data check
    output_uri: Annotated[str, Field(max_length=1024)] | None = None
    mlflow_run_id: Annotated[str, Field(max_length=64, pattern=r"^[0-9a-zA-Z_-]+$")] | None = None
    warning: Annotated[str, Field(max_length=1024)] | None = None
    evaluation: EvaluationResult | None = None

    @property
    def percent(self) -> int:
        if self.total_steps <= 0:
            return 0
        return min(100, int(100 * self.step / self.total_steps))


class TrainerResult(RunMetrics):
    """What a finished run leaves behind for the operator: rank 0 writes it as JSON to its termination
    message (``$SFT_TERMINATION_LOG``), the kubelet keeps it in the pod's terminated state, and the
    operator derives ``status.output``, the final ``status.metrics`` and 100 % progress from it. So an
    operator restart, or a lost final progress report, loses nothing.

    The kubelet keeps at most 4096 bytes; ``sft_trainer.result.termination_message`` enforces it.
    Unknown fields are ignored when reading, so an older operator reads a newer trainer's result.
    """

    model_config = ApiModel.model_config | {"extra": "ignore"}

    # Every field is optional when read, so that any version's result is read; the trainer always
    # writes outputModel.
    output_model: Annotated[str, Field(min_length=1, max_length=1024)] | None = Field(
        default=None, description="Where the model was written, in the spec's terms (e.g. pvc://models/run-1/model)."
    )
    output_uri: Annotated[str, Field(max_length=1024)] | None = Field(
        default=None, description="Where the output is durable (s3://... once uploaded, else the destination)."
    )
    best_checkpoint: Annotated[str, Field(max_length=1024)] | None = None
    mlflow_run_id: Annotated[str, Field(max_length=64, pattern=r"^[A-Za-z0-9_-]+$")] | None = None
    warning: Annotated[str, Field(max_length=1024)] | None = Field(
        default=None, description="Something a person should know about a run that succeeded (e.g. tracking lost)."
    )
    steps: int | None = Field(default=None, ge=0, le=10**9)
    total_steps: int | None = Field(default=None, ge=0, le=10**9)
    epochs: float | None = Field(default=None, ge=0.0, le=1e6)
    stopped_early: bool | None = None
    evaluation: EvaluationResult | None = Field(default=None, description="The evaluation gates, when the spec has any.")
