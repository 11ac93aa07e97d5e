"""One supervised fine-tuning run, top to bottom: ``run(spec)``.

A plain PyTorch loop rather than transformers' ``Trainer``: the practices this product promises sit
inside the step itself and are simpler to get exactly right here than through callbacks — the stability
guard must veto a step *before* ``optimizer.step()``; checkpoints must be atomic and resumable mid-epoch;
SIGTERM must save and exit 75; the loss is a token-level mean over the whole optimizer step (correct
under gradient accumulation, DDP and packing alike), computed only at response positions
(``logits_to_keep`` with a boolean mask: no logits are computed for prompt or padding tokens).
transformers supplies the model, tokenizer, schedulers and packed-sequence attention; peft the LoRA
adapters; torch DDP/FSDP2 the distribution.

Reading order: ``run`` claims the output destination and calls ``train``, which sets up (tokenizer →
data → config and memory check → model → wrapping → optimizer and schedule → start or resume) and then
loops: ``train_step``, ``RunState.advance``, ``report_step``, ``evaluate_and_keep_best``,
``save_checkpoint``; ``finish`` writes the outputs. The fixed parts of a run live in ``Run``, everything
that changes in ``RunState`` (run_state.py); the numbers go to the sinks (sinks.py).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

import torch
import torch.nn.functional as F

from sft_contract import memory
from sft_contract.messages import ProgressReport, RunMetrics
from sft_contract.spec import (
    GENERATION_METRICS, CheckpointStrategy, DistributedStrategy, EvalStrategy, GateMetric, LrScheduler,
    TrainingSpec, is_s3,
)

from . import checkpoint, collate, data, evaluation, gates, modeling, outputs, ownership, paths
from .distributed import (
    Dist,
    StopFlag,
    all_sum,
    barrier,
    full_state_dict,
    gather_trainable,
    load_trainable,
    no_sync,
    setup_distributed,
    shutdown,
    wrap,
)
from .errors import ConfigError, Interrupted, TrainerError
from .loss import fused_head
from .modeling import Amp
from .reporter import ProgressReporter
from .run_state import RunState, restore_rng, rng_state
from .sinks import EvalRecord, ProgressSink, Sink, StepRecord, TrainerLogSink
from .stability import StabilityGuard

log = logging.getLogger("sft_trainer")

__all__ = ["run", "evaluate", "loss_sum", "Amp", "Dist"]



def lr_factor(step: int, *, schedule: str, warmup: int, total: int) -> float:
    """The learning-rate multiplier at ``step``: transformers' four schedules (linear warmup from 0, then cosine
    or linear decay to 0, or constant; ``constant`` has no warmup). Written here because importing
    ``transformers.optimization`` costs ~3.4 s (it pulls in peft and model code), a third of a small run."""
    if schedule == LrScheduler.constant.value:
        return 1.0
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == LrScheduler.cosine.value:
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    if schedule == LrScheduler.linear.value:
        return max(0.0, 1.0 - progress)
    return 1.0  # constant-with-warmup


def make_scheduler(optimizer, schedule: str, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    factor = functools.partial(lr_factor, schedule=schedule, warmup=warmup, total=total)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---------------------------------------------------------------- loss and evaluation


def loss_sum(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed cross-entropy over response tokens; logits are computed only where a label exists, and by default
    never all at once (loss.py: fused with the LM head, in chunks)."""
    labels = batch["labels"]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != data.IGNORE
    targets = labels[:, 1:][keep[:, :-1]]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with fused_head(model, keep, targets) as fused:  # the LM head computes the loss in chunks (loss.py)
        out = model(**inputs, logits_to_keep=keep, use_cache=False)
    if fused.loss is not None:
        return fused.loss
    logits = out.logits
    if logits.dim() == 3:  # an architecture that ignores a boolean logits_to_keep
        logits = logits[keep]
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate(model, examples: list[data.Example], d: Dist, amp: Amp, collate_fn, batch_size: int, shard: bool = True) -> float | None:
    """Mean response-token loss over ``examples`` (sharded over ranks, summed, then divided)."""
    if not examples:
        return None
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for rows in collate.eval_batches(examples, batch_size, *((d.rank, d.world) if shard else (0, 1))):
        batch = collate_fn(rows)
        n = collate.trained_tokens(batch)
        if n == 0:
            continue
        with amp.autocast(d.device):
            total += float(loss_sum(model, to_device(batch, d.device)))
        tokens += n
    model.train(was_training)
    if shard:
        total, tokens = all_sum(total, d), all_sum(tokens, d)
    return total / tokens if tokens else None


def split_call_cost(device: torch.device) -> int:
    """The fixed cost of one more forward and backward, in padded positions, for ``collate.length_splits``.

    CPU: 64 per thread. 64 was measured best with one thread on the benchmark's tiny model (BENCHMARKS.md);
    with T threads a padded position costs about 1/T as much wall time while the fixed cost of a forward
    (Python, dispatch, small ops that do not parallelise) stays, so the break-even grows with T. CUDA: a
    guess (no GPU was available to measure); a GPU pays more per launch and less per position.
    ``SFT_SPLIT_COST`` overrides.
    """
    if os.environ.get("SFT_SPLIT_COST"):
        return int(os.environ["SFT_SPLIT_COST"])
    return 512 if device.type == "cuda" else 64 * torch.get_num_threads()


# ---------------------------------------------------------------- the parts of a run


@dataclass
class Run:
    """What a run is made of: fixed once set up. Everything that changes is in ``RunState``."""

    spec: TrainingSpec
    d: Dist
    amp: Amp
    tokenizer: Any
    datasets: data.Datasets
    model: Any  # as trained: DDP- or FSDP-wrapped when there are several processes
    base: Any  # unwrapped (saving)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    trainable: list[torch.nn.Parameter]
    batcher: collate.Batcher
    strategy: str
    model_config: Any  # the transformers config the model was built from (dropout overrides applied)
    pad_added: bool
    out_dir: Path
    sinks: list[Sink]
    stop: StopFlag
    lock: ownership.DestinationLock | None = None  # rank 0: the destination's lock, a fence before each commit
    prompts: list[evaluation.Prompt] = field(default_factory=list)  # evaluation.prompts: the generation gates' rows

    def fence(self) -> None:
        """Before a commit: stop (Superseded, exit 79) if another pod took the destination over."""
        if self.lock is not None:
            self.lock.check()

    @property
    def fsdp(self) -> bool:
        return self.strategy == DistributedStrategy.fsdp.value and self.d.world > 1

    @property
    def ckpt_dir(self) -> Path:
        return self.out_dir / outputs.CHECKPOINT_DIR

    @property
    def accumulation(self) -> int:
        return self.spec.hyperparameters.gradient_accumulation_steps

    @property
    def effective_batch(self) -> int:
        return self.spec.hyperparameters.per_device_batch_size * self.accumulation * self.d.world

    def evaluate(self, examples: list[data.Example]) -> float | None:
        """Response-token loss. Under FSDP every rank runs the same forwards (each evaluates everything);
        otherwise the unwrapped model evaluates a shard per rank (no DDP collectives in forward)."""
        model, shard = (self.model, False) if self.fsdp else (self.base, True)
        pad = self.tokenizer.pad_token_id
        return evaluate(model, examples, self.d, self.amp, lambda ex: collate.pad_batch(ex, pad),
                        2 * self.spec.hyperparameters.per_device_batch_size, shard)

    def measure(self, names: set[str]) -> dict[str, float | None]:
        """The gate metrics ``names`` of the model as it is now (every rank joins; all get the same numbers).
        forgettingDelta is not measured here: it is the general loss after minus before (``finish``)."""
        model, shard = (self.model, False) if self.fsdp else (self.base, True)
        out: dict[str, float | None] = {}
        if GateMetric.eval_loss.value in names:
            out[GateMetric.eval_loss.value] = self.evaluate(self.datasets.validation)
        if GateMetric.token_accuracy.value in names:
            out[GateMetric.token_accuracy.value] = evaluation.token_accuracy(
                model, self.datasets.validation, self.d, self.amp, self.tokenizer.pad_token_id,
                2 * self.spec.hyperparameters.per_device_batch_size, shard)
        if GENERATION_METRICS & names:
            scores = evaluation.generation_scores(
                model, self.tokenizer, self.prompts, self.spec.dataset, self.d, self.amp,
                max_new_tokens=self.spec.evaluation.prompts.max_new_tokens, shard=shard, synced=self.fsdp)
            out.update({k: v for k, v in scores.items() if k in names})
        return out

    @property
    def gate_metrics(self) -> set[str]:
        return {g.metric for g in self.spec.evaluation.gates}

    def display(self, *parts: str) -> str:
        """A location in the user's terms (pvc://claim/... stays pvc://)."""
        return "/".join([self.spec.output.destination.rstrip("/"), *parts])


def sinks_for(d: Dist, out_dir: Path, stdout: TextIO | None, listener, extra: Sequence[Sink] = ()) -> list[Sink]:
    """Where the run's numbers go (rank 0 only). A new destination is one more Sink in this list; ``extra``
    are the caller's (the MLflow run, which outlives the loop: see run_hooks)."""
    if not d.main:
        return []
    return [
        TrainerLogSink(out_dir),
        ProgressSink(ProgressReporter.from_env(stdout=stdout, listener=listener)),
        *extra,
    ]


# ---------------------------------------------------------------- entry point


def run(
    spec: TrainingSpec,
    *,
    stdout: TextIO | None = sys.stdout,
    listener: Callable[[ProgressReport], None] | None = None,
    sinks: Sequence[Sink] = (),
    lock: ownership.DestinationLock | None = None,
) -> dict[str, Any]:
    """Train ``spec`` to completion and write its outputs. Returns the final metrics (also in metrics.json).
    ``sinks`` are told about every step and evaluation too (rank 0), after the log and the progress reports.
    ``lock`` (rank 0): the destination's lock when the caller holds it past the run (through the export); it
    is taken here and left held. Without one the run takes and releases its own.

    Raises ``TrainerError`` subclasses (each carries its exit code) for invalid config, data errors,
    divergence, model-load errors, an unreachable hub and interruption.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    d = setup_distributed()
    torch.manual_seed(spec.hyperparameters.seed)
    out_dir = paths.resolve(spec.output.destination)
    rid = ownership.run_id(spec)
    own_lock = lock is None
    if d.main and lock is None:
        lock = ownership.DestinationLock(out_dir, rid, spec.output.destination.rstrip("/"))
    stop = StopFlag()
    stop.install()
    run_sinks: list[Sink] = []
    try:
        claim_destination(spec, d, out_dir, rid, lock)
        trained = awaiting_export(spec, d, rid)
        if trained is not None:
            return trained
        run_sinks = sinks_for(d, out_dir, stdout, listener, sinks)
        return train(spec, d, rid, out_dir, run_sinks, stop, lock if d.main else None)
    finally:
        stop.restore()
        for sink in run_sinks:
            sink.close()
        if lock is not None and d.main and own_lock:
            lock.release()
        shutdown(d)


def claim_destination(spec: TrainingSpec, d: Dist, out_dir: Path, rid: str, lock) -> None:
    """Rank 0 takes the destination's lock and checks its checkpoints are this run's; all ranks learn the outcome."""
    error: TrainerError | None = None
    if d.main:
        ckpt_dir = out_dir / outputs.CHECKPOINT_DIR
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            lock.acquire()
            ownership.check_checkpoints(ckpt_dir, rid, spec.output.destination.rstrip("/") + "/" + outputs.CHECKPOINT_DIR)
            checkpoint.clean_partial(ckpt_dir, fence=lock.check)
        except TrainerError as e:
            error = e
    if all_sum(0.0 if error is None else 1.0, d) > 0:
        raise error or ConfigError(f"{spec.output.destination}: rank 0 could not claim the output destination (its log says why)")


def awaiting_export(spec: TrainingSpec, d: Dist, rid: str) -> dict[str, Any] | None:
    """The final metrics of this run's model when it finished training but was never exported (its marker on
    the cache volume): the rerun goes straight to the export. Rank 0 decides, every rank learns it."""
    metrics = outputs.export_pending(rid, spec.output.destination) if d.main else None
    if all_sum(0.0 if metrics is None else 1.0, d) == 0:
        return None
    if d.main:
        log.info("run %s finished training before; its model awaits the export to %s: exporting, not training",
                 rid, spec.output.destination)
    return metrics or {}


# ---------------------------------------------------------------- set up, loop, finish


def train(spec: TrainingSpec, d: Dist, rid: str, out_dir: Path, sinks: list[Sink], stop: StopFlag,
          lock: ownership.DestinationLock | None = None) -> dict[str, Any]:
    hp, ds = spec.hyperparameters, spec.dataset
    t_start = time.time()
    amp = modeling.resolve_precision(hp.precision, d.device)

    tokenizer = modeling.load_tokenizer(spec)
    pad_added = data.ensure_pad_token(tokenizer)
    datasets = data.build(ds, tokenizer, hp.seed)
    if d.main:
        log_data(datasets, ds.max_seq_length)

    config = modeling.load_config(spec)
    strategy = choose_strategy(spec, config, d, amp)  # the memory check, before any weight is allocated
    base = modeling.prepare_model(spec, config, tokenizer, amp, d.device, pad_added)
    fsdp = strategy == DistributedStrategy.fsdp.value and d.world > 1
    model = wrap(base, d, strategy, modeling.decoder_layers(base) if fsdp else [], param_dtype=amp.autocast_dtype,
                 cpu_offload=spec.distributed.cpu_offload)
    if fsdp:
        amp = Amp(amp.name, None, amp.scaler)  # FSDP's mixed-precision policy replaces autocast
    model.train()

    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ConfigError("nothing to train: every parameter is frozen (freezeLayers / freezeEmbeddings)")
    # No weight decay on biases and norm scales (the usual AdamW practice).
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": hp.weight_decay},
         {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}],
        lr=hp.learning_rate,
        fused=True,  # one kernel per step on CPU and GPU (as HF Trainer's default adamw_torch_fused)
    )
    # Random batches whose order is a pure function of (seed, epoch), so resume can skip into an epoch;
    # each cut into similar-length sub-batches (same gradient, less padding), except with packing or FSDP.
    batcher = collate.Batcher(
        datasets.train, batch_size=hp.per_device_batch_size, seed=hp.seed, world=d.world, rank=d.rank,
        pad_id=tokenizer.pad_token_id, packing=ds.packing,
        split_cost=None if ds.packing or fsdp else split_call_cost(d.device),
    )
    steps_per_epoch = max(1, math.ceil(len(batcher.epoch(0)) / hp.gradient_accumulation_steps))
    total_steps = hp.max_steps or steps_per_epoch * hp.num_epochs
    scheduler = make_scheduler(optimizer, hp.lr_scheduler, math.ceil(hp.warmup_ratio * total_steps), total_steps)
    r = Run(spec, d, amp, tokenizer, datasets, model, base, optimizer, scheduler, trainable, batcher, strategy,
            config, pad_added, out_dir, sinks, stop, lock)
    if spec.evaluation.prompts is not None:
        r.prompts = evaluation.load_prompts(spec.evaluation.prompts)
    state = start(r, rid, total_steps, steps_per_epoch, StabilityGuard(loss_scaling=amp.scaler is not None))
    if d.main:
        log.info(
            "training: %d steps (%d epochs x %d steps), effective batch %d = %d per device x %d accumulation x %d "
            "processes (%s), precision %s, packing %s, %d trainable of %d parameters, run %s",
            total_steps, math.ceil(total_steps / steps_per_epoch), steps_per_epoch, r.effective_batch,
            hp.per_device_batch_size, r.accumulation, d.world, strategy if d.world > 1 else "one process", amp.name,
            ds.packing, sum(p.numel() for p in trainable), sum(p.numel() for p in model.parameters()), rid,
        )

    while not state.finished:
        order = batcher.epoch(state.epoch)
        while state.batch_in_epoch < len(order) and state.step < total_steps:
            group = order[state.batch_in_epoch : state.batch_in_epoch + r.accumulation]
            step = train_step(r, state, group)
            state.advance(len(group), len(order), loss=step.loss, tokens=step.tokens, seconds=step.seconds,
                          cpu_seconds=step.cpu_seconds)
            report_step(r, state, step)
            if evaluation_due(spec, state) and evaluate_and_keep_best(r, state):
                state.stopped_early = True
                break
            if checkpoint_due(spec, state):
                save_checkpoint(r, state)
            if stop.requested(d):
                interrupt(r, state)
    return finish(r, state, t_start)


def log_data(datasets: data.Datasets, max_seq_length: int) -> None:
    s = datasets.stats
    log.info(
        "data: %d training rows (%d general, %.1f%%), %d validation rows; lengths min/p50/p95/max %d/%d/%d/%d; "
        "%d truncated, %d dropped at maxSeqLength %d",
        s["trainRows"], s["generalRows"], 100 * s["generalFraction"], s["validationRows"], s["train"]["min"],
        s["train"]["p50"], s["train"]["p95"], s["train"]["max"], s["train"]["truncated"], s["train"]["dropped"],
        max_seq_length,
    )


def choose_strategy(spec: TrainingSpec, config, d: Dist, amp: Amp) -> str:
    """ddp or fsdp. On GPUs the memory estimate decides ``auto`` and stops a run that cannot fit (exit 64)
    before any weight is loaded; ``SFT_MEMORY_CHECK=warn`` only logs it. CPU: ``auto`` is ddp."""
    strategy = spec.distributed.strategy
    if d.device.type != "cuda":
        return DistributedStrategy.ddp.value if strategy == DistributedStrategy.auto.value else strategy
    shapes = memory.Shapes.from_config(config.to_dict(), f"{spec.model.source} config.json")
    gpu_bytes = torch.cuda.get_device_properties(d.device).total_memory
    plan = memory.plan(spec, shapes, d.world, gpu_bytes, precision=amp.name)
    if d.main:
        log.info("%s", plan.report())
    if not plan.fits and os.environ.get("SFT_MEMORY_CHECK", "fail") != "warn":
        raise ConfigError(plan.report() + " (SFT_MEMORY_CHECK=warn runs it anyway)")
    return plan.strategy


def start(r: Run, rid: str, total_steps: int, steps_per_epoch: int, guard: StabilityGuard) -> RunState:
    """Resume from this run's newest complete checkpoint, or start fresh (with the forgetting baseline)."""
    latest = checkpoint.latest(r.ckpt_dir) if r.spec.checkpointing.resume else None
    if latest is None:
        state = RunState(run_id=rid, total_steps=total_steps, steps_per_epoch=steps_per_epoch, guard=guard)
        for sink in r.sinks:
            sink.on_start(None)
        if r.datasets.general_held_out:
            state.general_loss_before = r.evaluate(r.datasets.general_held_out)
        if r.spec.evaluation.gates:  # the gates' baseline: the base model on the same data
            state.base_metrics = r.measure(r.gate_metrics)
            if GateMetric.forgetting_delta.value in r.gate_metrics:
                state.base_metrics[GateMetric.forgetting_delta.value] = 0.0  # the base model forgets nothing
            if r.d.main:
                log.info("evaluation gates, base model: %s", state.base_metrics)
        return state
    tensors, states, saved = checkpoint.load(latest)
    load_trainable(r.model, tensors, optimizer=r.optimizer, optim_state=states["optimizer"])
    r.scheduler.load_state_dict(states["scheduler"])
    if r.amp.scaler and states.get("scaler"):
        r.amp.scaler.load_state_dict(states["scaler"])
    restore_rng(states.get("rng") or {})
    state = RunState.from_checkpoint(saved, total_steps=total_steps, steps_per_epoch=steps_per_epoch, guard=guard)
    for sink in r.sinks:
        sink.on_start(state.step)
    if r.d.main:
        log.info("resumed from %s (step %d, epoch %d)", latest, state.step, state.epoch)
    return state


@dataclass(frozen=True)
class StepResult:
    loss: float
    learning_rate: float
    grad_norm: float
    tokens: int  # non-padding tokens, all ranks
    seconds: float
    cpu_seconds: float


def train_step(r: Run, state: RunState, micro_batches: list[list[int]]) -> StepResult:
    """One optimizer step over ``micro_batches`` (each possibly cut into sub-batches); ``state`` is not changed
    (the caller advances it), except on a stop signal, which saves at the last completed step and raises."""
    d, amp = r.d, r.amp
    t0, c0 = time.perf_counter(), time.process_time()
    batches = r.batcher.step(micro_batches)
    n_tokens = all_sum(sum(collate.trained_tokens(b) for b, _ in batches), d)
    real_tokens = all_sum(sum(collate.real_tokens(b) for b, _ in batches), d)
    loss_total = 0.0
    for j, (batch, micro_end) in enumerate(batches):
        last = j == len(batches) - 1
        with (contextlib.nullcontext() if last else no_sync(r.model, d)), amp.autocast(d.device):
            s = loss_sum(r.model, to_device(batch, d.device))
            # The step's token mean over all its (sub-)batches and ranks: DDP/FSDP average gradients over
            # ranks, so x world.
            loss = s * (d.world / max(n_tokens, 1.0))
        (amp.scaler.scale(loss) if amp.scaler else loss).backward()
        loss_total += float(s.detach())
        # A collective: only at micro-batch ends, which every rank reaches the same number of times.
        if micro_end and r.stop.requested(d):
            r.optimizer.zero_grad(set_to_none=True)
            interrupt(r, state)
    step_loss = all_sum(loss_total, d) / max(n_tokens, 1.0)
    if amp.scaler:
        amp.scaler.unscale_(r.optimizer)
    hp = r.spec.hyperparameters
    norm = torch.nn.utils.clip_grad_norm_(r.trainable, hp.max_grad_norm if hp.max_grad_norm > 0 else float("inf"))
    grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a DTensor
    lr = r.scheduler.get_last_lr()[0]
    apply = state.guard.check(state.step + 1, step_loss, grad_norm, lr)  # raises before a bad update
    if amp.scaler:
        amp.scaler.step(r.optimizer)
        amp.scaler.update()
    elif apply:
        r.optimizer.step()
    r.scheduler.step()
    r.optimizer.zero_grad(set_to_none=True)
    return StepResult(step_loss, lr, grad_norm, int(real_tokens), time.perf_counter() - t0, time.process_time() - c0)


def progress(r: Run, state: RunState, message: str | None = None, final: bool = False, **extra) -> ProgressReport:
    """The run so far, as the operator and the sinks see it."""
    loss = state.last_loss
    return ProgressReport(
        step=state.step,
        total_steps=state.total_steps,
        epoch=state.epochs_done,
        train_loss=loss if loss is not None and math.isfinite(loss) else None,
        eval_loss=state.last_eval_loss,
        best_eval_loss=state.best_eval_loss,
        learning_rate=r.scheduler.get_last_lr()[0],
        tokens_per_second=state.tokens_per_second(),
        eta_seconds=0 if final else state.eta_seconds(),
        effective_batch_size=r.effective_batch,
        general_loss_before=state.general_loss_before,
        message=message,
        evaluation=state.evaluation or (gates.baseline(r.spec.evaluation.gates, state.base_metrics or {})
                                        if r.spec.evaluation.gates else None),
        **extra,
    )


def report_step(r: Run, state: RunState, step: StepResult) -> None:
    if not r.sinks:
        return
    record = StepRecord(state.step, state.epochs_done, step.loss, step.learning_rate, step.grad_norm, step.tokens,
                        step.tokens / step.seconds if step.seconds else 0.0)
    report = progress(r, state)
    for sink in r.sinks:
        sink.on_step(record, report)


def report_eval(r: Run, state: RunState, loss: float) -> None:
    if not r.sinks:
        return
    record = EvalRecord(state.step, state.epochs_done, loss, state.best_eval_loss)
    report = progress(r, state, f"eval loss {loss:.4f} (best {state.best_eval_loss:.4f})")
    for sink in r.sinks:
        sink.on_eval(record, report)


def evaluation_due(spec: TrainingSpec, state: RunState) -> bool:
    ev = spec.evaluation
    if ev.strategy == EvalStrategy.no.value:
        return False
    return state.step % ev.steps == 0 if ev.strategy == EvalStrategy.steps.value else state.at_epoch_end


def checkpoint_due(spec: TrainingSpec, state: RunState) -> bool:
    ck = spec.checkpointing
    return state.step % ck.steps == 0 if ck.strategy == CheckpointStrategy.steps.value else state.at_epoch_end


def evaluate_and_keep_best(r: Run, state: RunState) -> bool:
    """Evaluate; a new best (by more than minDelta) is saved as a checkpoint. True when early stopping says stop."""
    loss = r.evaluate(r.datasets.validation)
    state.last_eval_loss, state.evaluated_at = loss, state.step
    if loss is None:
        return False
    es = r.spec.evaluation.early_stopping
    min_delta = es.min_delta if es else 0.0
    if state.best_eval_loss is None or state.best_eval_loss - loss > min_delta:
        state.best_eval_loss, state.bad_evals = loss, 0
        state.best_checkpoint = str(r.ckpt_dir / checkpoint.name(state.step))  # first: it records itself as best
        save_checkpoint(r, state)
    else:
        state.bad_evals += 1
    report_eval(r, state, loss)
    return es is not None and state.bad_evals >= es.patience


def save_checkpoint(r: Run, state: RunState) -> Path:
    """Every rank joins (FSDP gathers); rank 0 writes, then keeps the newest ``keep`` plus the best."""
    tensors, optim_state = gather_trainable(r.model, r.optimizer)
    if r.d.main:
        states = {
            "optimizer": optim_state,
            "scheduler": r.scheduler.state_dict(),
            "scaler": r.amp.scaler.state_dict() if r.amp.scaler else None,
            "rng": rng_state(),
        }
        try:
            checkpoint.save(r.ckpt_dir, state.step, tensors, states, state.to_checkpoint(), fence=r.fence)
        except OSError:
            r.fence()  # a newer writer's clean-up removed the folder being written: say that, not ENOENT
            raise
        best = Path(state.best_checkpoint) if state.best_checkpoint else None
        checkpoint.rotate(r.ckpt_dir, r.spec.checkpointing.keep, protect=best, fence=r.fence)
    barrier(r.d)
    return r.ckpt_dir / checkpoint.name(state.step)


def interrupt(r: Run, state: RunState) -> None:
    """SIGTERM/SIGINT: save at the last completed step (a partial accumulation is redone) and exit 75."""
    t0 = time.monotonic()
    path = save_checkpoint(r, state)
    raise Interrupted(f"{r.stop.name} received at step {state.step}: saved {r.display(outputs.CHECKPOINT_DIR, path.name)} "
                      f"in {time.monotonic() - t0:.1f} s, exit to resume")


def finish(r: Run, state: RunState, t_start: float) -> dict[str, Any]:
    """Final evaluation, the best weights, forgetting, the model and metrics.json."""
    spec, d = r.spec, r.d
    do_eval = spec.evaluation.strategy != EvalStrategy.no.value and bool(r.datasets.validation)
    if do_eval and state.evaluated_at != state.step:
        final = r.evaluate(r.datasets.validation)
        if final is not None:
            state.last_eval_loss = final
            if state.best_eval_loss is None or final < state.best_eval_loss:
                state.best_eval_loss = final
                state.best_checkpoint = str(r.ckpt_dir / checkpoint.name(state.step))
                save_checkpoint(r, state)
            report_eval(r, state, final)
    best, last = state.best_eval_loss, state.last_eval_loss
    used_best = state.best_checkpoint is not None and best is not None and last is not None and best < last
    if used_best:
        load_trainable(r.model, checkpoint.load_tensors(Path(state.best_checkpoint)))
    general_after = r.evaluate(r.datasets.general_held_out) if r.datasets.general_held_out else None
    before = state.general_loss_before
    rejected = judge_gates(r, state, general_after)
    model_parts = (outputs.REJECTED_DIR, outputs.MODEL_DIR) if rejected else (outputs.MODEL_DIR,)

    full_sd = full_state_dict(r.model) if r.fsdp else None  # every rank joins the gather
    if d.main:
        merge = bool(spec.peft and spec.peft.merge)
        r.fence()
        model_dir = r.out_dir.joinpath(*model_parts)
        model_dir.parent.mkdir(parents=True, exist_ok=True)
        outputs.save_model(unsharded(r, full_sd) if r.fsdp else r.base, r.tokenizer, model_dir, merge_lora=merge)
    barrier(d)
    best_display = r.display(outputs.CHECKPOINT_DIR, Path(state.best_checkpoint).name) if state.best_checkpoint else None
    metrics = {
        "steps": state.step,
        "totalSteps": state.total_steps,
        "epochs": state.epochs_done,
        # The run's metrics under their contract names, unchecked (metrics.json keeps even a loss out of bounds).
        **RunMetrics.model_construct(
            train_loss=state.last_loss, eval_loss=state.last_eval_loss, best_eval_loss=state.best_eval_loss,
            tokens_per_second=state.tokens_per_second(), general_loss_before=before, general_loss_after=general_after,
        ).model_dump(by_alias=True, exclude_unset=True),
        "bestCheckpoint": best_display,
        "outputUsesBestCheckpoint": used_best,
        "stoppedEarly": state.stopped_early,
        "forgetting": (general_after - before) if before is not None and general_after is not None else None,
        "effectiveBatchSize": r.effective_batch,
        "worldSize": d.world,
        "distributed": r.strategy if d.world > 1 else None,
        "precision": r.amp.name,
        "packing": spec.dataset.packing,
        "trainedTokens": state.trained_tokens,
        "trainSeconds": round(state.train_seconds, 2),
        "trainCpuSeconds": round(state.train_cpu_seconds, 2),
        "wallSeconds": round(time.time() - t_start, 2),
        "trainableParameters": sum(p.numel() for p in r.trainable),
        "runId": state.run_id,
        "outputModel": r.display(*model_parts),
        "data": r.datasets.stats,
    }
    if state.evaluation is not None:
        metrics["evaluation"] = state.evaluation.model_dump(mode="json", by_alias=True, exclude_none=True)
    if d.main:
        r.fence()
        outputs.write_metrics(r.out_dir / outputs.METRICS, metrics)
        if is_s3(spec.output.destination):  # until the export is done, a rerun exports instead of training
            outputs.mark_export_pending(state.run_id, spec.output.destination, r.out_dir, metrics)
        msg = "stopped early: eval loss stopped improving" if state.stopped_early else "done"
        report = progress(r, state, msg, final=True, general_loss_after=general_after,
                          output_model=metrics["outputModel"], best_checkpoint=best_display)
        for sink in r.sinks:
            sink.on_end(metrics, report)
    return metrics


def judge_gates(r: Run, state: RunState, general_after: float | None) -> bool:
    """The tuned model measured and judged against the base model's numbers; True when it is rejected
    (a gate with onFail Fail failed). Every rank measures; all reach the same verdict."""
    if not r.spec.evaluation.gates:
        return False
    tuned = r.measure(r.gate_metrics)
    before = state.general_loss_before
    if GateMetric.forgetting_delta.value in r.gate_metrics:
        tuned[GateMetric.forgetting_delta.value] = (general_after - before) if before is not None and general_after is not None else None
    state.evaluation = gates.judge(r.spec.evaluation.gates, state.base_metrics or {}, tuned)
    if r.d.main:
        for g in state.evaluation.gates:
            log.info("evaluation gate %s (%s is better): base %s, tuned %s, threshold %s, minChange %s: %s",
                     g.metric, g.direction, g.base, g.tuned, g.threshold, g.min_change,
                     "passed" if g.passed else f"FAILED ({g.message}; onFail {g.on_fail})")
    return gates.rejects(state.evaluation)


def unsharded(r: Run, full_sd: dict[str, torch.Tensor]):
    """Rank 0 under FSDP: a plain CPU copy of the trained model (the wrapped one holds shards, and touching
    them alone would wait for the other ranks): built again from the source, then given the gathered weights."""
    cpu = modeling.resolve_precision("fp32", torch.device("cpu"))
    copy = modeling.prepare_model(r.spec, r.model_config, r.tokenizer, cpu, torch.device("cpu"), r.pad_added)
    missing, unexpected = copy.load_state_dict(full_sd, strict=False)
    if unexpected or [k for k in missing if k in dict(copy.named_parameters())]:
        raise RuntimeError(f"gathered FSDP weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return copy
