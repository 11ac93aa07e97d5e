"""The SFTJob API (sft.dev/v1alpha1): the trainer's TrainingSpec plus the Kubernetes side.

These models are the single source of truth for the CRD schema (``sft_operator.api.crd``),
``sftctl validate`` and the renderer.
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, create_model, field_validator, model_validator

from sft_contract.cel import own_rules
from sft_contract.messages import DataSummary, EvaluationResult, RunMetrics
from sft_contract.references import IMAGE_RULES
from sft_contract.spec import (
    DNS_SUBDOMAIN, STORAGE_SIZE, TRAINING_SPEC_CEL, ApiModel, TrainingSpec, cel, cel_rules, reference,
)
from sft_operator.api import API_VERSION, KIND

# RFC 1123 label; object names are RFC 1123 subdomains (DNS_SUBDOMAIN).
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# SFTJob names: the Service is named after the job and needs an RFC 1035 label (starts with a letter).
DNS_1035_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
# Long enough for real names, short enough that "<name>-config", "<name>-<index>" pod hostnames and
# the Job's label values (63) always fit.
MAX_NAME_LENGTH = 48
# A resource.Quantity as the API server parses it (e.g. 500m, 4, 16Gi, 1e3), never negative:
# the pattern Kubernetes' own OpenAPI uses for quantities, so "64Gii" fails at apply, not at Job creation.
QUANTITY = (
    r"^\+?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
QUALIFIED_NAME = r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"

Quantity = Annotated[str, Field(max_length=64, pattern=QUANTITY)]
LabelValue = Annotated[str, Field(max_length=63, pattern=r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")]
LabelKey = Annotated[str, Field(max_length=317, pattern=QUALIFIED_NAME)]


def _nonzero_quantity(value: str | None) -> str | None:
    if value is not None and re.fullmatch(r"[+]?0*\.?0*[a-zA-Z]*", value):
        raise ValueError("must be greater than zero")
    return value


class Resources(ApiModel):
    """Compute for the trainer pods: nodes × GPUs per node."""

    nodes: int = Field(default=1, ge=1, le=256, description="Pods (one per node); >1 runs multi-node torchrun.")
    gpus_per_node: int = Field(
        default=1, ge=0, le=16, description="GPUs requested per pod; 0 runs on CPU (one process per pod)."
    )
    gpu_resource_name: Annotated[str, Field(max_length=253, pattern=QUALIFIED_NAME)] = Field(
        default="nvidia.com/gpu", description="Extended resource name of the GPU."
    )
    cpu: Annotated[Quantity | None, AfterValidator(_nonzero_quantity)] = Field(
        default=None, description="CPU request and limit per pod, e.g. `8`."
    )
    memory: Annotated[Quantity | None, AfterValidator(_nonzero_quantity)] = Field(
        default=None, description="Memory request and limit per pod, e.g. `64Gi`."
    )
    shared_memory: Annotated[Quantity | None, AfterValidator(_nonzero_quantity)] = Field(
        default="8Gi", description="Size of the in-memory /dev/shm volume (data loader workers, NCCL)."
    )
    gpu_memory: Annotated[Quantity, AfterValidator(_nonzero_quantity)] = Field(
        default="80Gi",
        description="Memory of one GPU, for the memory estimate that `sftctl validate` and the operator's advice "
        "print. The trainer measures the real GPU at start, checks again and resolves `distributed.strategy: auto`.",
    )
    scratch_size: Annotated[Quantity, AfterValidator(_nonzero_quantity)] = Field(
        default="64Gi",
        description="Size limit of the /tmp scratch volume (Hugging Face downloads, temporary files); "
        "the kubelet evicts a pod that writes more.",
    )


class Toleration(ApiModel):
    """A pod toleration, with the rules the API server applies to pods (checked at apply)."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": cel_rules(
            cel("(has(self.key) && self.key != '') || (has(self.operator) && self.operator == 'Exists')",
                "a toleration without a key must use operator Exists", ".operator"),
            cel("!has(self.operator) || self.operator != 'Exists' || !has(self.value) || self.value == ''",
                "operator Exists takes no value", ".value"),
            cel("!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
                "tolerationSeconds needs effect NoExecute", ".tolerationSeconds"),
        )
    }

    key: Annotated[str, Field(max_length=317, pattern=QUALIFIED_NAME)] | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: LabelValue | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = Field(default=None, ge=0, le=10**9)

    @model_validator(mode="after")
    def _as_the_api_server_checks(self) -> Toleration:
        # Tolerations also come from the operator's --trainer-defaults, outside any manifest.
        return own_rules(self)


class Scheduling(ApiModel):
    queue_name: Annotated[str, Field(max_length=63, pattern=DNS_LABEL)] | None = Field(
        default=None, description="Kueue LocalQueue; sets the kueue.x-k8s.io/queue-name label on the Job."
    )
    priority_class_name: Annotated[str, Field(max_length=253, pattern=DNS_SUBDOMAIN)] | None = Field(
        default=None, description="PriorityClass of the trainer pods."
    )
    node_selector: Annotated[dict[LabelKey, LabelValue], Field(max_length=32)] | None = Field(
        default=None, description="Node labels the trainer pods require."
    )
    tolerations: Annotated[list[Toleration], Field(max_length=32)] | None = Field(
        default=None, description="Tolerations of the trainer pods."
    )


class CacheDefaults(ApiModel):
    storage_class_name: Annotated[str, Field(max_length=253, pattern=DNS_SUBDOMAIN)] | None = Field(
        default=None, description="StorageClass of the cache claim the operator creates."
    )
    size: Annotated[str, Field(max_length=64, pattern=STORAGE_SIZE)] | None = Field(
        default=None, description="Size of the cache claim the operator creates."
    )


class PlatformDefaults(ApiModel):
    """What the platform team gives an SFTJob that leaves these out (the chart's ``trainer.defaults``); in
    ``status.appliedDefaults``, what one job got from them."""

    image: reference(IMAGE_RULES, 512) | None = Field(default=None, description="Trainer image.")
    node_selector: Annotated[dict[LabelKey, LabelValue], Field(max_length=32)] | None = Field(
        default=None, description="Node selector of the trainer pods."
    )
    tolerations: Annotated[list[Toleration], Field(max_length=32)] | None = Field(
        default=None, description="Tolerations of the trainer pods."
    )
    priority_class_name: Annotated[str, Field(max_length=253, pattern=DNS_SUBDOMAIN)] | None = Field(
        default=None, description="PriorityClass of the trainer pods."
    )
    cache: CacheDefaults | None = Field(default=None, description="The cache claim the operator creates.")


class RunPolicy(ApiModel):
    """Editable after creation (the rest of the spec is immutable)."""

    suspend: bool = Field(default=False, description="Suspend the job (pods are removed) or resume it.")
    backoff_limit: int = Field(
        default=3, ge=0, le=100, description="Retries after retriable failures (disruptions never count)."
    )
    active_deadline_seconds: int | None = Field(
        default=None, ge=1, le=10**8, description="Fail the job after this many seconds of running."
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None, ge=0, le=10**8, description="Delete the SFTJob this many seconds after it finished."
    )
    termination_grace_period_seconds: int | None = Field(
        default=None,
        ge=30,
        le=86_400,
        description="Time a trainer pod gets between SIGTERM and SIGKILL to save its checkpoint. Default: sized "
        "from the estimated checkpoint size (see the trainer docs). Read when the Job is created.",
    )


IMMUTABLE_SPEC_FIELDS = ("model", "dataset", "output")  # required: always present
# Not required (defaults apply in pydantic): a rule must not fail when they are absent.
OPTIONAL_IMMUTABLE_SPEC_FIELDS = (
    "hyperparameters",
    "resources",
    "freezeLayers",
    "freezeEmbeddings",
    "peft",
    "evaluation",
    "checkpointing",
    "distributed",
    "image",
    "scheduling",
    "serviceAccountName",
    "storage",
    "tracking",
)


def _immutability_rules() -> list[dict[str, str]]:
    rules = [cel(f"self.{f} == oldSelf.{f}", f"{f} is immutable", f".{f}") for f in IMMUTABLE_SPEC_FIELDS]
    for f in OPTIONAL_IMMUTABLE_SPEC_FIELDS:
        rules.append(
            cel(
                f"has(self.{f}) == has(oldSelf.{f}) && (!has(self.{f}) || self.{f} == oldSelf.{f})",
                f"{f} is immutable",
                f".{f}",
            )
        )
    return rules


class SFTJobSpec(TrainingSpec):
    """An SFTJob's desired state: what to train (immutable) and how to run it."""

    model_config = TrainingSpec.model_config | {
        "json_schema_extra": cel_rules(*TRAINING_SPEC_CEL),
    }

    resources: Resources = Field(default_factory=Resources)
    image: reference(IMAGE_RULES, 512) | None = Field(
        default=None, description="Trainer image override; the operator's default otherwise."
    )
    service_account_name: Annotated[str, Field(max_length=253, pattern=DNS_SUBDOMAIN)] | None = Field(
        default=None, description="ServiceAccount of the trainer pods (default: the namespace's default)."
    )
    scheduling: Scheduling | None = None
    run_policy: RunPolicy = Field(default_factory=RunPolicy)

    @property
    def world_size(self) -> int:
        return self.resources.nodes * max(1, self.resources.gpus_per_node)

    @property
    def effective_batch_size(self) -> int:
        hp = self.hyperparameters
        return hp.per_device_batch_size * hp.gradient_accumulation_steps * self.world_size

    def training_part(self) -> TrainingSpec:
        return TrainingSpec.model_validate(self.model_dump(include=set(TrainingSpec.model_fields)))


# The API server evaluates transition rules only on update: they make the spec immutable.
SPEC_TRANSITION_CEL = _immutability_rules()


class ObjectMeta(ApiModel):
    """The parts of metadata `sftctl validate` checks; the API server checks the rest."""

    model_config = ApiModel.model_config | {"extra": "allow"}

    name: Annotated[str, Field(min_length=1, max_length=MAX_NAME_LENGTH, pattern=DNS_1035_LABEL)] = Field(
        description="An RFC 1035 label of at most 48 characters, so every child name fits its limit."
    )
    namespace: Annotated[str, Field(max_length=63, pattern=DNS_LABEL)] | None = None


# ---- status ----------------------------------------------------------------------------------


class ConditionStatus(str, Enum):
    true = "True"
    false = "False"
    unknown = "Unknown"


class Condition(ApiModel):
    type: Annotated[str, Field(max_length=316)]
    status: ConditionStatus
    reason: Annotated[str, Field(max_length=1024)] = ""
    message: Annotated[str, Field(max_length=32768)] = ""
    last_transition_time: datetime | None = None
    observed_generation: int | None = Field(default=None, ge=0)


class Phase(str, Enum):
    """status.phase: a summary for people. The one list of phase names (status, metrics, sftctl)."""

    pending = "Pending"
    queued = "Queued"
    running = "Running"
    restarting = "Restarting"
    suspended = "Suspended"
    succeeded = "Succeeded"
    failed = "Failed"


TERMINAL_PHASES = frozenset({Phase.succeeded.value, Phase.failed.value})


class ConditionType(str, Enum):
    """status.conditions[].type, in the order they appear (adjectives or past tense)."""

    created = "Created"
    queued = "Queued"
    suspended = "Suspended"
    running = "Running"
    restarting = "Restarting"
    succeeded = "Succeeded"
    failed = "Failed"


# Only on jobs with evaluation gates (spec.evaluation.gates): True when every gate passed, False when one failed
# (reason EvaluationFailed: a Fail gate failed the job; GatesFailed: only Mark gates failed), Unknown while the
# tuned model is not judged yet. A GitOps pipeline waits on it: `kubectl wait --for=condition=EvaluationPassed`.
EVALUATION_PASSED = "EvaluationPassed"


class Stage(str, Enum):
    """status.progress.stage: what the pods are doing (from the trainer's reports)."""

    fetching = "Fetching"  # the fetch stage downloads the model and data into the cache
    training = "Training"
    exporting = "Exporting"  # rank 0 uploads the output to s3://


class ProgressStatus(ApiModel):
    percent: int = Field(default=0, ge=0, le=100, description="Training steps done, in percent.")
    step: int = Field(default=0, ge=0)
    total_steps: int = Field(default=0, ge=0)
    epoch: float = Field(default=0.0, ge=0)
    eta_seconds: int | None = Field(default=None, ge=0)
    stage: Stage | None = Field(default=None, description="Fetching, Training or Exporting; absent once the job ended.")
    bytes_done: int | None = Field(default=None, ge=0, description="Fetching or Exporting: bytes transferred so far.")
    bytes_total: int | None = Field(default=None, ge=0, description="Fetching or Exporting: bytes to transfer in all.")


# status.metrics: the run's metrics (RunMetrics' fields, in its order and with its descriptions) without the wire's
# bounds: the operator fills it from messages already checked, and the CRD's schema has never bounded it.
Metrics = create_model(
    "Metrics",
    __base__=ApiModel,
    __module__=__name__,
    **{name: (info.annotation, Field(default=None, description=info.description))
       for name, info in RunMetrics.model_fields.items()},
)


class OutputStatus(ApiModel):
    model: Annotated[str, Field(max_length=1024)] | None = Field(default=None, description="Where the model was written.")
    uri: Annotated[str, Field(max_length=1024)] | None = Field(
        default=None, description="The model's location in object storage, when it was uploaded."
    )
    best_checkpoint: Annotated[str, Field(max_length=1024)] | None = None
    mlflow_run_id: Annotated[str, Field(max_length=64)] | None = Field(default=None, description="The tracked MLflow run.")


class SFTJobStatus(ApiModel):
    observed_generation: int | None = Field(default=None, ge=0)
    phase: Phase | None = Field(default=None, description="A summary for people; automation reads conditions.")
    reason: Annotated[str, Field(max_length=128)] | None = Field(
        default=None, description="Why the job is in its phase, one CamelCase word (e.g. Unschedulable, OOMKilled)."
    )
    conditions: Annotated[list[Condition], Field(max_length=16)] | None = None
    start_time: datetime | None = None
    completion_time: datetime | None = None
    restarts: int | None = Field(default=None, ge=0)
    effective_batch_size: int | None = Field(
        default=None, ge=1, description="perDeviceBatchSize × gradientAccumulationSteps × world size."
    )
    job_name: Annotated[str, Field(max_length=253)] | None = None
    data: DataSummary | None = Field(
        default=None, description="The data check of the fetch stage: rows, invalid rows, lengths, estimated steps."
    )
    progress: ProgressStatus | None = None
    metrics: Metrics | None = None
    output: OutputStatus | None = None
    applied_defaults: PlatformDefaults | None = Field(
        default=None, description="What the platform's defaults filled in because the spec left it out."
    )
    evaluation: EvaluationResult | None = Field(
        default=None,
        description="The evaluation gates: per gate the base and tuned model's value, the bounds and whether it passed.",
    )


class SFTJob(ApiModel):
    api_version: Literal["sft.dev/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["SFTJob"]
    metadata: ObjectMeta
    spec: SFTJobSpec
    status: SFTJobStatus | None = None

    @field_validator("api_version", mode="before")
    @classmethod
    def _api_version(cls, v: Any) -> Any:
        if v != API_VERSION:
            raise ValueError(f"must be {API_VERSION}")
        return v

    @field_validator("kind", mode="before")
    @classmethod
    def _kind(cls, v: Any) -> Any:
        if v != KIND:
            raise ValueError(f"must be {KIND}")
        return v

