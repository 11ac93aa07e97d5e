"""The training part of an SFTJob: what the trainer accepts.

The trainer owns this schema; the operator's ``SFTJobSpec`` embeds it and the CRD's OpenAPI schema
is generated from it, so the API server, ``sftctl validate`` and the trainer reject the same input.
Imports nothing heavier than pydantic (the operator imports this module).

Cross-field rules are written once, as CEL in ``x-kubernetes-validations`` on the model they belong to:
the API server evaluates them from the CRD, ``sftctl validate`` and the trainer through ``sft_contract.cel``.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from . import references
from .references import Rule

DEFAULT_PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
DEFAULT_PROMPT_TEMPLATE_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


def cel(rule: str, message: str, field_path: str | None = None) -> dict[str, str]:
    """One CEL rule for the CRD's x-kubernetes-validations."""
    out = {"rule": rule, "message": message}
    if field_path:
        out["fieldPath"] = field_path
    return out


def cel_rules(*rules: dict[str, str]) -> dict[str, Any]:
    return {"x-kubernetes-validations": list(rules)}


class ApiModel(BaseModel):
    """camelCase on the wire, snake_case in Python, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_enum_values=True,
        validate_default=True,
        # Error texts reach logs, conditions and Events: never echo a value (a URL may hold a credential).
        hide_input_in_errors=True,
    )


def reference(rules: tuple[Rule, ...], max_length: int, description: str | None = None) -> Any:
    """A string field checked by its grammar: CEL rules in the CRD, the same regexes offline."""
    return Annotated[
        str,
        Field(min_length=1, max_length=max_length, description=description,
              json_schema_extra=references.cel_rules(rules)),
        AfterValidator(lambda value: references.check(rules, value)),
    ]


Source = reference(
    references.SOURCE_RULES,
    1024,
    "A hub id (`org/name`), `s3://bucket/prefix`, `pvc://claim/path` (mounted from a PersistentVolumeClaim), or a "
    "local path. No empty, `.` or `..` segments.",
)
Revision = reference(references.REVISION_RULES, 256)


class SecretKeyRef(ApiModel):
    """A key in a Secret in the SFTJob's namespace. Secret values are never written inline."""

    name: Annotated[str, Field(min_length=1, max_length=253, description="Secret name.")]
    key: Annotated[str, Field(min_length=1, max_length=253, description="Key within the Secret.")]


class ModelSpec(ApiModel):
    """The base model to fine-tune."""

    source: Source = Field(
        description="Hub id (e.g. `meta-llama/Llama-2-7b-hf`), `s3://bucket/prefix` (a folder as save_pretrained "
        "writes it), `pvc://claim/path`, or a local path. Hub and s3:// models are fetched once into the cache."
    )
    revision: Revision | None = Field(
        default=None, description="Hub revision (branch, tag or commit). Pin it for reproducible runs."
    )
    token_secret_ref: SecretKeyRef | None = Field(
        default=None, description="Secret key holding a hub token, exposed to the trainer as HF_TOKEN."
    )


class DataSource(ApiModel):
    """Where rows come from: a JSONL/JSON/Parquet/CSV file or folder, or a hub dataset id."""

    source: Source = Field(
        description="`s3://bucket/key` (a file or a prefix of files), `pvc://claim/path`, a local file or folder, "
        "or a hub dataset id."
    )
    split: Annotated[str, Field(max_length=64)] = Field(default="train", description="Hub split to read.")


class GeneralData(DataSource):
    """General-domain data mixed into training against catastrophic forgetting."""

    mix_ratio: float = Field(
        default=0.2, ge=0.0, lt=1.0, description="Fraction of training rows drawn from general data (about 0.2)."
    )
    held_out_rows: int = Field(
        default=200,
        ge=0,
        le=100_000,
        description="General rows held out to measure forgetting: their loss before vs. after training.",
    )


class DataFormat(str, Enum):
    auto = "auto"
    instruction = "instruction"
    prompt_completion = "prompt-completion"
    messages = "messages"
    text = "text"


class Overlong(str, Enum):
    truncate = "truncate"
    drop = "drop"


class DatasetSpec(ApiModel):
    """Training data, validation data and general data."""

    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            cel(
                "!(has(self.validation) && has(self.validationSplit) && self.validationSplit > 0.0)",
                "set either validation or validationSplit, not both",
                ".validationSplit",
            )
        )
    )

    train: DataSource = Field(description="Training rows.")
    validation: DataSource | None = Field(default=None, description="Validation rows (or use validationSplit).")
    validation_split: float | None = Field(
        default=None,
        ge=0.0,
        lt=0.5,
        description="Fraction of the training rows held out for validation when `validation` is not set. "
        "Default 0.1; 0 disables validation.",
    )
    general: GeneralData | None = Field(default=None, description="General data mixed in against forgetting.")
    format: DataFormat = Field(
        default=DataFormat.auto,
        description="Row format: instruction (instruction/input/output), prompt-completion, messages (chat), "
        "text; auto detects it from the first row.",
    )
    prompt_template: Annotated[
        str,
        Field(
            max_length=4096,
            json_schema_extra=cel_rules(cel("self.contains('{instruction}')", "must contain {instruction}")),
        ),
    ] = Field(
        default=DEFAULT_PROMPT_TEMPLATE,
        description="Prompt for instruction rows; `{instruction}` is replaced. The response follows it.",
    )
    prompt_template_with_input: Annotated[
        str,
        Field(
            max_length=4096,
            json_schema_extra=cel_rules(
                cel("self.contains('{instruction}') && self.contains('{input}')", "must contain {instruction} and {input}")
            ),
        ),
    ] = Field(
        default=DEFAULT_PROMPT_TEMPLATE_WITH_INPUT,
        description="Prompt for instruction rows that have a non-empty `input`; `{instruction}` and `{input}` are replaced.",
    )
    max_seq_length: int = Field(default=2048, ge=16, le=262_144, description="Longest tokenized row, in tokens.")
    overlong: Overlong = Field(
        default=Overlong.truncate,
        description="What to do with rows longer than maxSeqLength: truncate or drop. Both are counted and reported.",
    )
    packing: bool = Field(
        default=False,
        description="Pack rows into full sequences with per-row attention isolation (position ids reset).",
    )

    @property
    def effective_validation_split(self) -> float:
        if self.validation is not None:
            return 0.0
        return 0.1 if self.validation_split is None else self.validation_split

    @property
    def has_validation(self) -> bool:
        return self.validation is not None or self.effective_validation_split > 0


class LrScheduler(str, Enum):
    cosine = "cosine"
    linear = "linear"
    constant = "constant"
    constant_with_warmup = "constant-with-warmup"


class Precision(str, Enum):
    auto = "auto"
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


class Hyperparameters(ApiModel):
    """Optimisation settings. Defaults follow the fine-tuning guide (7B-class, 1k-10k rows)."""

    learning_rate: float = Field(
        default=2e-5, gt=0.0, le=1.0, description="Peak learning rate; 1e-5..2e-5 for 7B-class full fine-tuning."
    )
    num_epochs: int = Field(default=3, ge=1, le=100, description="Passes over the training data (3-5 typical).")
    max_steps: int | None = Field(
        default=None, ge=1, le=10_000_000, description="Stop after this many optimizer steps (overrides epochs)."
    )
    per_device_batch_size: int = Field(default=4, ge=1, le=4096, description="Rows per device per micro-batch.")
    gradient_accumulation_steps: int = Field(
        default=4, ge=1, le=4096, description="Micro-batches per optimizer step."
    )
    warmup_ratio: float = Field(default=0.1, ge=0.0, lt=1.0, description="Fraction of steps spent warming up.")
    lr_scheduler: LrScheduler = Field(default=LrScheduler.cosine, description="Decay after warmup.")
    weight_decay: float = Field(default=0.01, ge=0.0, lt=1.0, description="AdamW weight decay (0.01-0.1).")
    max_grad_norm: float = Field(
        default=1.0, ge=0.0, le=1000.0, description="Gradient clipping norm; 0 disables clipping."
    )
    precision: Precision = Field(
        default=Precision.auto,
        description="auto picks bf16 where the hardware has it, else fp32. fp16 always keeps fp32 master weights.",
    )
    seed: int = Field(default=42, ge=0, le=2**31 - 1, description="Seed for data order and initialisation.")
    dropout: float | None = Field(
        default=None, ge=0.0, lt=1.0, description="Override the model's dropout probabilities (against over-fitting)."
    )
    gradient_checkpointing: bool = Field(
        default=False, description="Recompute activations in the backward pass to save memory."
    )


class LoraSpec(ApiModel):
    """LoRA adapters through peft."""

    rank: int = Field(default=16, ge=1, le=1024, description="Adapter rank r.")
    alpha: float = Field(default=32.0, gt=0.0, le=100_000.0, description="Scaling alpha.")
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0, description="Dropout on adapter inputs.")
    target_modules: Annotated[list[Annotated[str, Field(min_length=1, max_length=128)]], Field(min_length=1, max_length=64)] = Field(
        default_factory=lambda: ["all-linear"],
        description="Module names to adapt, or `all-linear`.",
    )
    merge: bool = Field(default=False, description="Merge the adapters into the base weights when saving.")


class EvalStrategy(str, Enum):
    epoch = "epoch"
    steps = "steps"
    no = "no"


class EarlyStopping(ApiModel):
    patience: int = Field(default=3, ge=1, le=1000, description="Evaluations without improvement before stopping.")
    min_delta: float = Field(default=0.0, ge=0.0, le=100.0, description="Smallest eval-loss drop that counts.")


class GateMetric(str, Enum):
    """What a gate compares. Losses on the validation set, forgetting on the held-out general rows, the
    generation metrics on ``evaluation.prompts``."""

    eval_loss = "evalLoss"
    token_accuracy = "tokenAccuracy"
    forgetting_delta = "forgettingDelta"
    exact_match = "exactMatch"
    contains = "contains"


GENERATION_METRICS = frozenset({GateMetric.exact_match.value, GateMetric.contains.value})
VALIDATION_METRICS = frozenset({GateMetric.eval_loss.value, GateMetric.token_accuracy.value})
LOWER_IS_BETTER = frozenset({GateMetric.eval_loss.value, GateMetric.forgetting_delta.value})


class GateDirection(str, Enum):
    lower = "lower"
    higher = "higher"


class OnFail(str, Enum):
    fail = "Fail"
    mark = "Mark"


class Gate(ApiModel):
    """One condition the tuned model must meet, as MLflow's MetricThreshold: an absolute threshold and/or a
    minimum change against the base model measured on the same data at the start of the run."""

    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            cel("has(self.threshold) || has(self.minChange)", "a gate needs threshold or minChange (or both)",
                ".threshold")
        )
    )

    metric: GateMetric = Field(
        description="evalLoss or tokenAccuracy (validation data), forgettingDelta (general loss after minus before; "
        "the base model's is 0), exactMatch or contains (the fraction of evaluation.prompts answered)."
    )
    direction: GateDirection | None = Field(
        default=None, description="Which way is better. Default: lower for evalLoss and forgettingDelta, else higher."
    )
    threshold: float | None = Field(
        default=None, ge=-1e6, le=1e6, allow_inf_nan=False,
        description="The tuned value must be at most (lower) or at least (higher) this.",
    )
    min_change: float | None = Field(
        default=None, ge=-1e6, le=1e6, allow_inf_nan=False,
        description="The tuned value must beat the base model's by at least this much, in the metric's units and "
        "direction (negative: a regression up to that size is tolerated).",
    )
    on_fail: OnFail = Field(
        default=OnFail.fail,
        description="Fail: the job ends Failed/EvaluationFailed and the model goes to rejected/ in the output. "
        "Mark: the job succeeds with the EvaluationPassed condition False.",
    )

    @property
    def better(self) -> str:
        if self.direction is not None:
            return self.direction
        return GateDirection.lower.value if self.metric in LOWER_IS_BETTER else GateDirection.higher.value


class PromptSet(DataSource):
    """Held-out prompts for the generation metrics: rows ``{"prompt": ..., "expected": ...}``."""

    max_new_tokens: int = Field(default=64, ge=1, le=4096, description="Tokens generated per prompt (greedy).")
    max_prompts: int = Field(default=500, ge=1, le=100_000, description="Use at most this many rows (the first).")


class EvaluationSpec(ApiModel):
    """Validation during training (the best checkpoint by eval loss is kept and reported) and the gates the
    tuned model must pass against its base model."""

    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            cel("self.strategy != 'steps' || has(self.steps)", "steps is required when strategy is steps", ".steps"),
            cel(
                "self.strategy != 'no' || !has(self.earlyStopping)",
                "earlyStopping needs an evaluation strategy other than no",
                ".earlyStopping",
            ),
            cel(
                "!has(self.gates) || has(self.prompts) || !self.gates.exists(g, g.metric == 'exactMatch' || "
                "g.metric == 'contains')",
                "a generation gate (exactMatch, contains) needs prompts",
                ".prompts",
            ),
        )
    )

    strategy: EvalStrategy = Field(default=EvalStrategy.epoch, description="When to evaluate.")
    steps: int | None = Field(default=None, ge=1, le=10_000_000, description="Evaluate every N steps (strategy steps).")
    early_stopping: EarlyStopping | None = Field(default=None, description="Stop when eval loss stops improving.")
    gates: Annotated[list[Gate], Field(max_length=8, json_schema_extra={
        "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["metric"]})] = Field(
        default_factory=list,
        description="Conditions the tuned model must meet (one per metric), measured on the base model at the "
        "start and on the tuned model at the end. The result is status.evaluation and the EvaluationPassed condition.",
    )
    prompts: PromptSet | None = Field(
        default=None, description="Held-out prompts for the exactMatch and contains gates (JSONL of prompt, expected)."
    )



class CheckpointStrategy(str, Enum):
    epoch = "epoch"
    steps = "steps"


class CheckpointingSpec(ApiModel):
    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            cel("self.strategy != 'steps' || has(self.steps)", "steps is required when strategy is steps", ".steps")
        )
    )

    strategy: CheckpointStrategy = Field(default=CheckpointStrategy.epoch, description="When to save.")
    steps: int | None = Field(default=None, ge=1, le=10_000_000, description="Save every N steps (strategy steps).")
    keep: int = Field(default=2, ge=1, le=100, description="Checkpoints kept (plus the best one).")
    resume: bool = Field(default=True, description="Resume from the newest complete checkpoint after a restart.")


class OutputSpec(ApiModel):
    destination: Source = Field(
        description="Where the model, checkpoints, metrics.json and loss.png go: `pvc://claim/path`, "
        "`s3://bucket/prefix` (model/, metrics.json, trainer_log.jsonl and loss.png are uploaded at the end, a "
        "COMPLETE marker last), or a local path (`sftctl run` only: a cluster refuses it)."
    )


class DistributedStrategy(str, Enum):
    auto = "auto"
    ddp = "ddp"
    fsdp = "fsdp"


class DistributedSpec(ApiModel):
    """How the processes of a multi-GPU or multi-node run share the model."""

    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            cel("self.strategy != 'ddp' || !has(self.cpuOffload) || !self.cpuOffload",
                "cpuOffload needs strategy fsdp or auto", ".cpuOffload")
        )
    )

    strategy: DistributedStrategy = Field(
        default=DistributedStrategy.auto,
        description="ddp: every process holds the whole model, its gradients and optimizer states. fsdp: FSDP2 "
        "shards them over all processes (each layer gathered only while it runs). auto: ddp when the memory "
        "estimate fits one GPU, fsdp when it does not. One process always runs unsharded.",
    )
    cpu_offload: bool = Field(
        default=False,
        description="FSDP: keep the sharded parameters, gradients and optimizer states in CPU memory and move "
        "each layer to the GPU only while it runs (slower; for models that do not fit even sharded).",
    )


# ---- where data comes from and where models go: object storage, the fetch cache, tracking (docs/storage.md)

DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
SECRET_KEY = r"^[-._a-zA-Z0-9]+$"
# A storage quantity above zero (the pattern has no zero, so the API server refuses `0Gi` too).
STORAGE_SIZE = r"^([0-9]*[1-9][0-9]*(\.[0-9]+)?|[0-9]*\.[0-9]*[1-9][0-9]*)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$"
# A claim the operator creates when the spec reads from the hub or s3:// and names no cache.
DEFAULT_CACHE_SIZE = "50Gi"

SecretName = Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN)]
SecretKey = Annotated[str, Field(min_length=1, max_length=253, pattern=SECRET_KEY)]


class S3CredentialsSecretRef(ApiModel):
    """A Secret in the SFTJob's namespace with an S3 access key; the pods get its values as AWS_* variables."""

    name: SecretName = Field(description="Secret name.")
    access_key_id_key: SecretKey = Field(default="AWS_ACCESS_KEY_ID", description="Key holding the access key id.")
    secret_access_key_key: SecretKey = Field(
        default="AWS_SECRET_ACCESS_KEY", description="Key holding the secret access key."
    )
    session_token_key: SecretKey | None = Field(
        default=None, description="Key holding a session token (temporary credentials), if any."
    )


class S3Spec(ApiModel):
    """Connection settings for every s3:// location in the spec."""

    endpoint: reference(references.url_rules("credentialsSecretRef"), 512) | None = Field(
        default=None,
        description="An S3-compatible endpoint (MinIO, Ceph RGW, Cloudflare R2), e.g. `http://minio.minio:9000`. "
        "Default: AWS S3.",
    )
    region: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-z0-9-]+$")] | None = Field(
        default=None, description="Region, e.g. `eu-west-1` (`auto` for R2). Default: the SDK's (AWS_REGION)."
    )
    credentials_secret_ref: S3CredentialsSecretRef | None = Field(
        default=None,
        description="Secret with the access key. Without it the SDK's default chain applies (workload identity: "
        "IRSA, EKS Pod Identity, instance roles).",
    )
    path_style: bool | None = Field(
        default=None,
        description="Path-style addressing (`endpoint/bucket/key`). Default: on with an endpoint, off for AWS.",
    )


class CacheSpec(ApiModel):
    """The volume the fetch stage downloads into once; every rank and every restart reads it."""

    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            cel("!(has(self.claimName) && has(self.size))", "set claimName or size, not both", ".size"),
            cel("!has(self.storageClassName) || has(self.size)", "storageClassName needs size", ".storageClassName"),
        )
    )

    claim_name: Annotated[str, Field(max_length=253, pattern=DNS_SUBDOMAIN)] | None = Field(
        default=None,
        description="An existing PersistentVolumeClaim (ReadWriteMany when nodes > 1). It outlives the job, so "
        "later jobs with the same sources start without downloading.",
    )
    size: Annotated[str, Field(max_length=64, pattern=STORAGE_SIZE)] | None = Field(
        default=None,
        description=f"Size of a claim the operator creates for this job (deleted with it). Neither set: "
        f"{DEFAULT_CACHE_SIZE} when a source is a hub id or s3://.",
    )
    storage_class_name: Annotated[str, Field(max_length=253, pattern=DNS_SUBDOMAIN)] | None = Field(
        default=None, description="StorageClass of the created claim (default: the cluster's default)."
    )


class StorageSpec(ApiModel):
    """Object storage and the fetch cache."""

    s3: S3Spec | None = Field(default=None, description="Connection settings for s3:// locations.")
    cache: CacheSpec | None = Field(default=None, description="Where hub and s3:// sources are fetched to.")


class MlflowSpec(ApiModel):
    """An MLflow tracking server that rank 0 logs the run to. Its failures never fail training."""

    tracking_uri: reference(references.url_rules("tokenSecretRef"), 1024) = Field(
        description="The tracking server, e.g. `http://mlflow.mlflow:5000`."
    )
    experiment: Annotated[str, Field(min_length=1, max_length=256)] = Field(
        default="sft", description="Experiment name (created if missing)."
    )
    run_name: Annotated[str, Field(min_length=1, max_length=250)] | None = Field(
        default=None, description="Run name. Default: the SFTJob's name."
    )
    token_secret_ref: SecretKeyRef | None = Field(
        default=None, description="Secret key with a bearer token, exposed to the trainer as MLFLOW_TRACKING_TOKEN."
    )
    registered_model: Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[^/:%]+$")] | None = Field(
        default=None,
        description="Register the exported model as a new version of this MLflow registered model, tagged with the "
        "SFTJob's uid and the gate results.",
    )
    alias: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$")] = Field(
        default="candidate",
        description="The alias the new version gets when every evaluation gate passed (none when one failed).",
    )


class TrackingSpec(ApiModel):
    mlflow: MlflowSpec | None = Field(default=None, description="Log parameters, losses and the output to MLflow.")


def is_s3(location: str) -> bool:
    return location.startswith("s3://")


def cluster_problems(spec: TrainingSpec) -> list[tuple[str, str]]:
    """What a cluster refuses although `sftctl run` accepts it, as (field path, message) pairs."""
    dest = spec.output.destination
    if dest.startswith(("pvc://", "s3://")):
        return []
    return [(
        "spec.output.destination",
        f"{dest!r} is a local path: in a cluster it would land in the pod's scratch space and be lost when the pod "
        "ends, so the operator refuses it; use pvc://<claim>/<path> or s3://<bucket>/<prefix>",
    )]


# Rules across TrainingSpec's parts, on the spec itself (the CRD's spec object).
TRAINING_SPEC_CEL = [
    cel(
        "!has(self.evaluation) || !has(self.evaluation.earlyStopping) || has(self.dataset.validation) || "
        "!has(self.dataset.validationSplit) || self.dataset.validationSplit > 0.0",
        "evaluation.earlyStopping needs validation data (dataset.validation or validationSplit > 0)",
        ".evaluation.earlyStopping",
    ),
    cel(
        "(has(self.evaluation) && self.evaluation.strategy == 'no') || has(self.dataset.validation) || "
        "!has(self.dataset.validationSplit) || self.dataset.validationSplit > 0.0",
        "evaluation.strategy needs validation data; set it to no or add validation data",
        ".evaluation.strategy",
    ),
    cel(
        "!has(self.evaluation) || !has(self.evaluation.gates) || !self.evaluation.gates.exists(g, g.metric == "
        "'evalLoss' || g.metric == 'tokenAccuracy') || has(self.dataset.validation) || "
        "!has(self.dataset.validationSplit) || self.dataset.validationSplit > 0.0",
        "evaluation.gates: evalLoss and tokenAccuracy need validation data (dataset.validation or validationSplit > 0)",
        ".evaluation.gates",
    ),
    cel(
        "!has(self.evaluation) || !has(self.evaluation.gates) || !self.evaluation.gates.exists(g, g.metric == "
        "'forgettingDelta') || (has(self.dataset.general) && (!has(self.dataset.general.heldOutRows) || "
        "self.dataset.general.heldOutRows > 0))",
        "evaluation.gates: forgettingDelta needs dataset.general with heldOutRows > 0",
        ".evaluation.gates",
    ),
]


class TrainingSpec(ApiModel):
    """Everything the trainer needs: immutable once an SFTJob is created."""

    model_config = ConfigDict(json_schema_extra=cel_rules(*TRAINING_SPEC_CEL))

    model: ModelSpec
    dataset: DatasetSpec
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    freeze_layers: int = Field(
        default=0, ge=0, le=1000, description="Freeze the first N transformer layers (against forgetting)."
    )
    freeze_embeddings: bool = Field(default=False, description="Also freeze the token embeddings.")
    peft: LoraSpec | None = Field(default=None, description="Train LoRA adapters instead of all weights.")
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    checkpointing: CheckpointingSpec = Field(default_factory=CheckpointingSpec)
    output: OutputSpec
    storage: StorageSpec | None = Field(default=None, description="Object storage settings and the fetch cache.")
    tracking: TrackingSpec | None = Field(default=None, description="Experiment tracking (MLflow).")
    distributed: DistributedSpec = Field(default_factory=DistributedSpec)


# The spec's training fields (snake_case); everything else in an SFTJob spec is the cluster's business.
TRAINING_FIELDS = tuple(TrainingSpec.model_fields)
