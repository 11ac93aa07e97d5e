"""Fine-tuning advice: a spec in, warnings from the practice in docs/practice.md out (pure).

`sftctl validate` prints them and the operator records them as Warning Events. They never block
a job: the spec is valid, it is just likely to train badly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sft_contract import memory
from sft_contract.spec import EvalStrategy, Precision, cluster_problems
from sft_operator.api.types import SFTJobSpec

RECOMMENDED_LR = (1e-5, 2e-5)
# Full fine-tuning wants 1-2 orders of magnitude below pre-training; LoRA tolerates ~10x more.
LORA_LR_FACTOR = 10.0
FAR_OUTSIDE = 5.0  # warn when the learning rate is more than 5x outside the recommended band
MAX_EPOCHS_WITHOUT_EARLY_STOPPING = 5
_PARAMS_IN_NAME = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?)\s*[bB](?![a-zA-Z])")


@dataclass(frozen=True)
class Advice:
    reason: str  # one CamelCase word, used as the Event reason
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


def billions_of_parameters(model_source: str) -> float | None:
    """Size read from a model name such as `meta-llama/Llama-2-7b-hf` (None if the name doesn't say)."""
    match = _PARAMS_IN_NAME.search(model_source.rsplit("/", 1)[-1])
    return float(match.group(1)) if match else None


def memory_plan(spec: SFTJobSpec, shapes: memory.Shapes | None = None, why: str = "") -> tuple[memory.Plan | None, str]:
    """The per-GPU memory estimate for the GPUs the spec asks for (gpusPerNode 0: the CPU process's, against
    the pod's memory limit when the spec sets one), or (None, why there is none).

    Shapes: the caller's (``sftctl validate`` finds them with ``cli.model_shapes.find_shapes``: a local config.json, the
    bundled table or the hub, and says ``why`` when it found none), else the bundled table. No I/O here:
    the operator has the table only.
    """
    res = spec.resources
    if shapes is None and not why:
        shapes = memory.table_shapes(spec.model.source)
        why = "" if shapes is not None else f"{spec.model.source} is not in the bundled table"
    if shapes is None:
        return None, f"no memory estimate: {why}"
    if res.gpus_per_node == 0:
        limit = memory.parse_quantity(res.memory) if res.memory else None
        return memory.plan(spec, shapes, spec.world_size, limit, device="cpu"), ""
    return memory.plan(spec, shapes, spec.world_size, memory.parse_quantity(res.gpu_memory)), ""


def grace_period_seconds(spec: SFTJobSpec) -> int:
    """terminationGracePeriodSeconds: the spec's, else sized from the estimated checkpoint (pure: the bundled
    table, else the size in the model's name, else ``memory.GRACE_UNKNOWN_S``)."""
    if spec.run_policy.termination_grace_period_seconds:
        return spec.run_policy.termination_grace_period_seconds
    shapes = memory.table_shapes(spec.model.source)
    if shapes is not None:
        return memory.grace_period_seconds(memory.checkpoint_bytes(memory.estimate(shapes, memory.setup_for(spec, 1))))
    size = billions_of_parameters(spec.model.source)
    if size is None:
        return memory.grace_period_seconds(None)
    trainable = size * 1e9 if spec.peft is None else size * 1e9 * 0.01  # LoRA: adapters are ~1% at most
    return memory.grace_period_seconds(int(12 * trainable))


def advise(spec: SFTJobSpec, bf16_available: bool = True, plan: memory.Plan | None = None) -> list[Advice]:
    """Warnings for a valid spec. ``plan``: a memory estimate already made (``sftctl validate``); else one is
    made from the bundled table when the model is in it."""
    out: list[Advice] = []
    plan = plan or memory_plan(spec)[0]
    if plan is not None and not plan.fits:
        out.append(Advice("MemoryWontFit", "spec.resources", plan.report()))
    hp = spec.hyperparameters
    size = billions_of_parameters(spec.model.source)
    low, high = RECOMMENDED_LR
    if spec.peft is not None:
        low, high = low * LORA_LR_FACTOR, high * LORA_LR_FACTOR
    if size is not None and size >= 3 and not (low / FAR_OUTSIDE <= hp.learning_rate <= high * FAR_OUTSIDE):
        kind = "LoRA" if spec.peft is not None else "full fine-tuning"
        out.append(
            Advice(
                "LearningRateOutOfRange",
                "spec.hyperparameters.learningRate",
                f"{hp.learning_rate:g} is far from {low:g}..{high:g}, the usual range for {kind} of a "
                f"{size:g}B model; too high forgets or diverges, too low under-fits",
            )
        )
    early = spec.evaluation.early_stopping
    if hp.num_epochs > MAX_EPOCHS_WITHOUT_EARLY_STOPPING and early is None and hp.max_steps is None:
        out.append(
            Advice(
                "ManyEpochsNoEarlyStopping",
                "spec.evaluation.earlyStopping",
                f"{hp.num_epochs} epochs with no early stopping risks over-fitting; 3-5 epochs is typical, "
                "or set earlyStopping to keep the best checkpoint",
            )
        )
    if hp.precision == Precision.fp16 and bf16_available:
        out.append(
            Advice(
                "PreferBF16",
                "spec.hyperparameters.precision",
                "fp16 needs loss scaling and overflows more easily; bf16 (or auto) is available on current GPUs",
            )
        )
    if not spec.dataset.has_validation or spec.evaluation.strategy == EvalStrategy.no:
        out.append(
            Advice(
                "NoValidation",
                "spec.dataset.validationSplit",
                "no validation data: over-fitting goes unseen and there is no best checkpoint to keep",
            )
        )
    general_ratio = spec.dataset.general.mix_ratio if spec.dataset.general else 0.0
    if general_ratio == 0 and spec.freeze_layers == 0 and spec.peft is None:
        out.append(
            Advice(
                "ForgettingUnguarded",
                "spec.dataset.general",
                "full fine-tuning with no general-data mix and no frozen layers risks catastrophic forgetting; "
                "mix in ~20% general data or freeze the first layers",
            )
        )
    if hp.warmup_ratio == 0 and hp.lr_scheduler != "constant":
        out.append(
            Advice("NoWarmup", "spec.hyperparameters.warmupRatio", "no warmup makes early steps unstable; 0.03-0.1 is typical")
        )
    if hp.max_grad_norm == 0:
        out.append(
            Advice("NoGradientClipping", "spec.hyperparameters.maxGradNorm", "gradient clipping is off; 1.0 guards against spikes")
        )
    out += [Advice("LocalOutputInCluster", field, message) for field, message in cluster_problems(spec)]
    return out
