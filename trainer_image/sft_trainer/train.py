"""One supervised fine-tuning run, top to bottom: ``run(spec)``.

A plain PyTorch loop rather than transformers' ``Trainer``: the practices this product promises sit
inside the step itself and are simpler to get exactly right here than through callbacks — the stability
guard must veto a step *before* ``optimizer.step()``; checkpoints must be atomic and resumable mid-epoch;
SIGTERM must save and exit 75; the loss is a token-level mean over the whole optimizer step (correct
under gradient accumulation, DDP and packing alike), computed only at response positions
(``logits_to_keep`` with a boolean mask: no logits are computed for prompt or padding tokens).
transformers supplies the model, tokenizer, schedulers and packed-sequence attention; peft the LoRA
adapters; torch DDP/FSDP the distribution.

Order of a run: distributed setup → tokenizer → data → model (precision, dropout, pad token, freezing,
LoRA, gradient checkpointing) → optimizer and schedule → resume → forgetting baseline → steps
(evaluate, early stop, checkpoint) → final evaluation → outputs.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TextIO

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import checkpoint, collate, data, outputs, paths
from .config import (
    CheckpointStrategy,
    EvalStrategy,
    LrScheduler,
    Precision,
    ProgressReport,
    TrainingSpec,
)
from .errors import ConfigError, DataError, Interrupted, ModelLoadError
from .progress import ProgressReporter
from .stability import StabilityGuard

log = logging.getLogger("sft_trainer")

SCHEDULERS = {
    LrScheduler.cosine.value: "cosine",
    LrScheduler.linear.value: "linear",
    LrScheduler.constant.value: "constant",
    LrScheduler.constant_with_warmup.value: "constant_with_warmup",
}


# ---------------------------------------------------------------- distributed and device


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Dist:
    """Read torchrun's environment; one process without it. gloo on CPU, nccl on GPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        if "OMP_NUM_THREADS" not in os.environ:
            # Share the cores between local ranks instead of oversubscribing them.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank, device)


def all_sum(value: float, d: Dist) -> float:
    if d.world == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=d.device if d.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return float(t.item())


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


# ---------------------------------------------------------------- precision


@dataclass
class Amp:
    name: str  # "bf16", "fp16" or "fp32"
    autocast_dtype: torch.dtype | None
    scaler: Any = None

    def autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)


def resolve_precision(p: str, device: torch.device) -> Amp:
    """auto: bf16 where the GPU has it, else fp32 (always fp32 on CPU). Weights stay fp32 (master weights)."""
    if p == Precision.auto.value:
        p = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if p == "fp16":
        if device.type != "cuda":
            raise ConfigError("hyperparameters.precision: fp16 needs a CUDA GPU; use fp32 or bf16 (or auto)")
        return Amp("fp16", torch.float16, torch.amp.GradScaler("cuda"))
    if p == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("hyperparameters.precision: this GPU has no bf16; use fp16 (fp32 master weights) or fp32")
        return Amp("bf16", torch.bfloat16)
    return Amp("fp32", None)


def check_no_fp16_training(model, amp: Amp) -> None:
    """fp16 weights under fp16 mixed precision cannot be unscaled and lose updates: refuse them."""
    if amp.name == "fp16" and any(p.requires_grad and p.dtype == torch.float16 for p in model.parameters()):
        raise ConfigError("fp16 trainable weights with fp16 mixed precision are refused: keep fp32 master weights")


# ---------------------------------------------------------------- model


def load_tokenizer(spec: TrainingSpec):
    from transformers import AutoTokenizer

    src = spec.model.source
    where = str(paths.resolve(src)) if paths.is_local(src) else paths.hub_location(src, "model", spec.model.revision)
    try:
        tok = AutoTokenizer.from_pretrained(where, revision=spec.model.revision, token=os.environ.get("HF_TOKEN"))
    except Exception as e:  # noqa: BLE001 - any loader failure is a model-load error with its reason
        raise ModelLoadError(f"cannot load the tokenizer from {src}: {type(e).__name__}: {e}") from None
    tok.padding_side = "right"
    return tok


def split_call_cost(device: torch.device) -> int:
    """The fixed cost of one more forward and backward, in padded positions, for ``collate.length_splits``.

    CPU: measured on the benchmark's tiny model (BENCHMARKS.md). CUDA: a guess (no GPU was available to
    measure); a GPU pays more per launch and less per position. ``SFT_SPLIT_COST`` overrides.
    """
    if os.environ.get("SFT_SPLIT_COST"):
        return int(os.environ["SFT_SPLIT_COST"])
    return 512 if device.type == "cuda" else 64


def attention_implementation(device: torch.device) -> str:
    """flash-attention 2 (varlen: exact packing isolation) on GPUs that have it, else sdpa."""
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def load_model(spec: TrainingSpec, amp: Amp, device: torch.device):
    from transformers import AutoConfig, AutoModelForCausalLM

    src = spec.model.source
    where = str(paths.resolve(src)) if paths.is_local(src) else paths.hub_location(src, "model", spec.model.revision)
    kw = {"revision": spec.model.revision, "token": os.environ.get("HF_TOKEN")}
    try:
        config = AutoConfig.from_pretrained(where, **kw)
        if spec.hyperparameters.dropout is not None:
            override_dropout(config, spec.hyperparameters.dropout)
        # Full fine-tuning keeps fp32 weights (master weights; autocast does bf16/fp16 compute).
        # LoRA trains fp32 adapters, so the frozen base may sit in the compute dtype and save memory.
        dtype = amp.autocast_dtype if (spec.peft is not None and amp.autocast_dtype is not None) else torch.float32
        model = AutoModelForCausalLM.from_pretrained(
            where, config=config, dtype=dtype, attn_implementation=attention_implementation(device), **kw
        )
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"cannot load the model from {src}: {type(e).__name__}: {e}") from None
    return model


def override_dropout(config, p: float) -> list[str]:
    """Set every dropout probability the model config declares (attention_dropout, hidden_dropout, *_pdrop...)."""
    changed = []
    for key, value in config.to_dict().items():
        if isinstance(value, float) and ("dropout" in key or key.endswith("_pdrop")) and not key.startswith("classifier"):
            setattr(config, key, p)
            changed.append(key)
    return changed


def decoder_layers(model) -> torch.nn.ModuleList:
    """The transformer blocks, whatever the architecture calls them."""
    n = getattr(model.config, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise ConfigError("freezeLayers: cannot find this model's transformer layers")


def freeze(model, n_layers: int, embeddings: bool) -> None:
    layers = decoder_layers(model) if n_layers else []
    if n_layers > len(layers):
        raise ConfigError(f"freezeLayers: {n_layers} is more than the model's {len(layers)} layers")
    for layer in list(layers)[:n_layers]:
        layer.requires_grad_(False)
    if embeddings:
        model.get_input_embeddings().requires_grad_(False)


def add_lora(model, spec: TrainingSpec):
    from peft import LoraConfig, get_peft_model

    lora = spec.peft
    targets = "all-linear" if lora.target_modules == ["all-linear"] else lora.target_modules
    n_layers = len(decoder_layers(model)) if spec.freeze_layers else 0
    cfg = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
        # freezeLayers with LoRA: no adapters on the frozen layers.
        layers_to_transform=list(range(spec.freeze_layers, n_layers)) if spec.freeze_layers else None,
    )
    model = get_peft_model(model, cfg)
    if spec.freeze_embeddings is False and spec.peft is not None:
        pass  # embeddings stay frozen under LoRA (peft freezes the base); the pad row is never trained anyway
    return model


# ---------------------------------------------------------------- loss


def loss_sum(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed cross-entropy over response tokens; logits are computed only where a label exists."""
    labels = batch["labels"]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != data.IGNORE
    targets = labels[:, 1:][keep[:, :-1]]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = model(**inputs, logits_to_keep=keep, use_cache=False)
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
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    if shard:
        order = order[d.rank :: d.world]
    total, tokens = 0.0, 0
    for start in range(0, len(order), batch_size):
        batch = collate_fn([examples[i] for i in order[start : start + batch_size]])
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


# ---------------------------------------------------------------- signals


class StopFlag:
    """SIGTERM (pod eviction, preemption, kill) and a first Ctrl-C ask for a checkpoint and a clean exit."""

    def __init__(self):
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. embedded use): rely on the caller
                pass

    def _handle(self, signum, frame) -> None:
        self.signal = signum
        signal.signal(signum, self._old.get(signum, signal.SIG_DFL))  # a second signal acts normally

    def restore(self) -> None:
        for sig, old in self._old.items():
            with contextlib.suppress(ValueError):
                signal.signal(sig, old)


# ---------------------------------------------------------------- the run


def display_source(spec: TrainingSpec, *parts: str) -> str:
    """A location in the user's terms (pvc://claim/... stays pvc://)."""
    return "/".join([spec.output.destination.rstrip("/"), *parts])


def run(
    spec: TrainingSpec,
    *,
    stdout: TextIO | None = sys.stdout,
    listener: Callable[[ProgressReport], None] | None = None,
) -> dict[str, Any]:
    """Train ``spec`` to completion and write its outputs. Returns the final metrics (also in metrics.json).

    Raises ``TrainerError`` subclasses (each carries its exit code) for invalid config, data errors,
    divergence, model-load errors and interruption.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import get_scheduler
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    d = setup_distributed()
    hp = spec.hyperparameters
    torch.manual_seed(hp.seed)
    out_dir = paths.resolve(spec.output.destination)
    ckpt_dir = out_dir / outputs.CHECKPOINT_DIR
    if d.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.clean_partial(ckpt_dir)
    barrier(d)
    # Only rank 0 reports; the others get a sink that does nothing.
    reporter = ProgressReporter.from_env(stdout=stdout, listener=listener) if d.main else ProgressReporter(None, stdout=None)
    trainer_log = outputs.TrainerLog(out_dir / outputs.LOG, enabled=d.main)
    stop = StopFlag()
    stop.install()
    try:
        return _run(spec, d, out_dir, ckpt_dir, reporter, trainer_log, stop, get_scheduler)
    finally:
        stop.restore()
        reporter.close()


def _run(spec, d: Dist, out_dir: Path, ckpt_dir: Path, reporter: ProgressReporter, trainer_log, stop, get_scheduler):
    hp = spec.hyperparameters
    ds = spec.dataset
    amp = resolve_precision(hp.precision, d.device)
    t_start = time.time()

    tokenizer = load_tokenizer(spec)
    pad_added = data.ensure_pad_token(tokenizer)
    datasets = data.build(ds, tokenizer, hp.seed)
    if d.main:
        s = datasets.stats
        log.info(
            "data: %d training rows (%d general, %.1f%%), %d validation rows; lengths min/p50/p95/max %d/%d/%d/%d; "
            "%d truncated, %d dropped at maxSeqLength %d",
            s["trainRows"], s["generalRows"], 100 * s["generalFraction"], s["validationRows"], s["train"]["min"],
            s["train"]["p50"], s["train"]["p95"], s["train"]["max"], s["train"]["truncated"], s["train"]["dropped"],
            ds.max_seq_length,
        )

    model = load_model(spec, amp, d.device)
    if pad_added or model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.config.pad_token_id = tokenizer.pad_token_id
    freeze(model, spec.freeze_layers, spec.freeze_embeddings)
    if spec.peft is not None:
        model = add_lora(model, spec)
    if hp.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(d.device)
    check_no_fp16_training(model, amp)
    if d.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ and model.num_parameters() < 20_000_000:
        # Small matrices gain little from threads and lose a lot when the cores are shared (measured: 2 threads
        # on 2 busy cores ran a tiny model 50x slower than 1 thread). OMP_NUM_THREADS overrides.
        torch.set_num_threads(1)
    base = model  # unwrapped: saving, state dicts
    use_fsdp = os.environ.get("SFT_FSDP", "") not in ("", "0") and d.world > 1 and d.device.type == "cuda"
    if use_fsdp:
        model = wrap_fsdp(model, amp)
        amp = Amp(amp.name, None, amp.scaler)  # FSDP's mixed-precision policy replaces autocast
    elif d.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[d.local_rank] if d.device.type == "cuda" else None, broadcast_buffers=False
        )
    model.train()
    # Evaluation runs on the unwrapped model, sharded over ranks (no DDP collectives in forward); under FSDP
    # every rank must run the same forwards, so each evaluates everything.
    eval_model, shard = (model, False) if use_fsdp else (base, True)
    eval_batch = 2 * hp.per_device_batch_size
    evaluated_at = -1

    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ConfigError("nothing to train: every parameter is frozen (freezeLayers / freezeEmbeddings)")
    # No weight decay on biases and norm scales (the usual AdamW practice).
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=hp.learning_rate,
        fused=True,  # one kernel per step on CPU and GPU (as HF Trainer's default adamw_torch_fused)
    )

    # Batches: random, and the order is a pure function of (seed, epoch), so resume can skip into an epoch.
    packing = ds.packing
    lengths = [len(e) for e in datasets.train]
    batch_fn = collate.pack_batch if packing else (lambda ex: collate.pad_batch(ex, tokenizer.pad_token_id))
    eval_fn = lambda ex: collate.pad_batch(ex, tokenizer.pad_token_id)  # noqa: E731
    # Each random batch runs as similar-length sub-batches (same gradient, less padding); not with packing
    # (nothing padded) nor FSDP (every rank must run the same number of forwards).
    split_cost = None if packing or use_fsdp else split_call_cost(d.device)

    def batches_for(epoch: int) -> list[list[int]]:
        return collate.epoch_batches(
            lengths, hp.per_device_batch_size, seed=hp.seed, epoch=epoch, world_size=d.world, rank=d.rank
        )

    def collated(group: list[list[int]]) -> list[tuple[dict[str, torch.Tensor], bool]]:
        """The step's (sub-)batches, each with whether it ends a micro-batch. Ranks may get different
        numbers of sub-batches, but every rank has the same number of micro-batch ends."""
        out = []
        for idx in group:
            runs = [list(range(len(idx)))] if split_cost is None else collate.length_splits([lengths[i] for i in idx], split_cost)
            out += [(batch_fn([datasets.train[idx[k]] for k in run]), n == len(runs) - 1) for n, run in enumerate(runs)]
        return out

    micro_per_epoch = len(batches_for(0))
    accum = hp.gradient_accumulation_steps
    steps_per_epoch = max(1, math.ceil(micro_per_epoch / accum))
    total_steps = hp.max_steps or steps_per_epoch * hp.num_epochs
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    warmup = math.ceil(hp.warmup_ratio * total_steps)
    scheduler = get_scheduler(
        SCHEDULERS[hp.lr_scheduler], optimizer, num_warmup_steps=warmup, num_training_steps=total_steps
    )
    effective_batch = hp.per_device_batch_size * accum * d.world
    guard = StabilityGuard(loss_scaling=amp.scaler is not None)
    if d.main:
        log.info(
            "training: %d steps (%d epochs x %d steps), effective batch %d = %d per device x %d accumulation x %d "
            "processes, precision %s, packing %s, %d trainable of %d parameters",
            total_steps, num_epochs, steps_per_epoch, effective_batch, hp.per_device_batch_size, accum, d.world,
            amp.name, packing, sum(p.numel() for p in trainable), sum(p.numel() for p in model.parameters()),
        )

    # ---- state that checkpoints carry
    step, epoch, batch_in_epoch = 0, 0, 0
    best_eval: float | None = None
    best_ckpt: Path | None = None
    bad_evals = 0
    general_before: float | None = None
    train_tokens_done = 0
    last_eval: float | None = None

    resume_from = checkpoint.latest(ckpt_dir) if spec.checkpointing.resume else None
    if resume_from is not None:
        st = restore(resume_from, model, optimizer, scheduler, amp, guard, d)
        step, epoch, batch_in_epoch = st["step"], st["epoch"], st["batchInEpoch"]
        best_eval, bad_evals = st.get("bestEvalLoss"), st.get("badEvals", 0)
        best_ckpt = Path(st["bestCheckpoint"]) if st.get("bestCheckpoint") else None
        general_before, last_eval = st.get("generalLossBefore"), st.get("lastEvalLoss")
        train_tokens_done = st.get("tokens", 0)
        trainer_log.truncate_after(step)
        if d.main:
            log.info("resumed from %s (step %d, epoch %d)", resume_from, step, epoch)
    else:
        trainer_log.reset()
        if datasets.general_held_out:
            general_before = evaluate(eval_model, datasets.general_held_out, d, amp, eval_fn, eval_batch, shard)

    def report(message: str | None = None, final: bool = False, **extra) -> ProgressReport:
        elapsed = max(1e-9, train_time)
        rate = tokens_run / elapsed if tokens_run else None
        steps_run = step - start_step
        eta = int((total_steps - step) * elapsed / steps_run) if steps_run > 0 else None
        r = ProgressReport(
            step=step,
            total_steps=total_steps,
            epoch=round(step / steps_per_epoch, 3),
            train_loss=last_loss if last_loss is not None and math.isfinite(last_loss) else None,
            eval_loss=last_eval,
            best_eval_loss=best_eval,
            learning_rate=scheduler.get_last_lr()[0],
            tokens_per_second=round(rate, 1) if rate else None,
            eta_seconds=0 if final else eta,
            effective_batch_size=effective_batch,
            general_loss_before=general_before,
            message=message,
            **extra,
        )
        if d.main:
            reporter.report(r, final=final)
        return r

    def save_checkpoint(next_batch: int, ep: int) -> Path | None:
        """Every rank joins (FSDP gathers); rank 0 writes."""
        tensors, states = gather_state(model, base, optimizer, scheduler, amp, use_fsdp)
        path = None
        if d.main:
            state = {
                "step": step, "epoch": ep, "batchInEpoch": next_batch, "bestEvalLoss": best_eval,
                "bestCheckpoint": str(best_ckpt) if best_ckpt else None, "badEvals": bad_evals,
                "generalLossBefore": general_before, "lastEvalLoss": last_eval, "tokens": train_tokens_done,
                "guard": guard.state_dict(), "totalSteps": total_steps,
            }
            path = checkpoint.save(ckpt_dir, step, tensors, states, state)
        barrier(d)
        return ckpt_dir / checkpoint.name(step)

    def run_eval() -> bool:
        """Evaluate; keep the best checkpoint; True when early stopping says stop."""
        nonlocal best_eval, best_ckpt, bad_evals, last_eval, evaluated_at
        last_eval = evaluate(eval_model, datasets.validation, d, amp, eval_fn, eval_batch, shard)
        evaluated_at = step
        if last_eval is None:
            return False
        trainer_log.write({"step": step, "epoch": round(step / steps_per_epoch, 3), "evalLoss": last_eval})
        min_delta = spec.evaluation.early_stopping.min_delta if spec.evaluation.early_stopping else 0.0
        if best_eval is None or best_eval - last_eval > min_delta:
            best_eval, bad_evals = last_eval, 0
            best_ckpt = ckpt_dir / checkpoint.name(step)  # set first: the checkpoint records itself as best
            save_checkpoint(*position())
            if d.main:
                checkpoint.rotate(ckpt_dir, spec.checkpointing.keep, protect=best_ckpt)
        else:
            bad_evals += 1
        report(f"eval loss {last_eval:.4f} (best {best_eval:.4f})")
        es = spec.evaluation.early_stopping
        return es is not None and bad_evals >= es.patience

    position = lambda: (batch_in_epoch, epoch)  # noqa: E731  (where the next step starts)

    start_step = step
    train_time = 0.0
    train_cpu = 0.0  # CPU seconds of this process in training steps (robust to other load on shared machines)
    tokens_run = 0
    last_loss: float | None = None
    stopped_early = False
    eval_every = spec.evaluation.steps if spec.evaluation.strategy == EvalStrategy.steps.value else None
    ckpt_every = spec.checkpointing.steps if spec.checkpointing.strategy == CheckpointStrategy.steps.value else None
    do_eval = spec.evaluation.strategy != EvalStrategy.no.value and bool(datasets.validation)
    log_every = max(1, total_steps // 500)
    no_sync = getattr(model, "no_sync", None) if d.world > 1 and not use_fsdp else None

    while step < total_steps and not stopped_early:
        order = batches_for(epoch)
        while batch_in_epoch < len(order) and step < total_steps:
            t0, c0 = time.perf_counter(), time.process_time()
            group = order[batch_in_epoch : batch_in_epoch + accum]
            micro = collated(group)
            n_tokens = all_sum(sum(collate.trained_tokens(b) for b, _ in micro), d)
            step_real_tokens = all_sum(sum(collate.real_tokens(b) for b, _ in micro), d)
            step_loss = 0.0
            for j, (b, micro_end) in enumerate(micro):
                sync = contextlib.nullcontext() if no_sync is None or j == len(micro) - 1 else no_sync()
                with sync, amp.autocast(d.device):
                    s = loss_sum(model, to_device(b, d.device))
                    # The step's token mean over all its (sub-)batches and ranks: DDP/FSDP average gradients
                    # over ranks, so x world.
                    loss = s * (d.world / max(n_tokens, 1.0))
                (amp.scaler.scale(loss) if amp.scaler else loss).backward()
                step_loss += float(s.detach())
                # A collective: only at micro-batch ends, which every rank reaches the same number of times.
                if micro_end and stop_requested(stop, d):
                    optimizer.zero_grad(set_to_none=True)
                    path = save_checkpoint(*position())
                    raise Interrupted(f"{signal_name(stop.signal)} received at step {step}: saved {path}, exit to resume")
            step_loss = all_sum(step_loss, d) / max(n_tokens, 1.0)
            if amp.scaler:
                amp.scaler.unscale_(optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, hp.max_grad_norm if hp.max_grad_norm > 0 else float("inf")))
            lr = scheduler.get_last_lr()[0]
            apply = guard.check(step + 1, step_loss, grad_norm, lr)  # raises before a bad update
            if amp.scaler:
                amp.scaler.step(optimizer)
                amp.scaler.update()
            elif apply:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            batch_in_epoch += len(group)
            if batch_in_epoch >= len(order):
                epoch, batch_in_epoch = epoch + 1, 0
            dt = time.perf_counter() - t0
            train_time += dt
            train_cpu += time.process_time() - c0
            tokens_run += int(step_real_tokens)
            train_tokens_done += int(step_real_tokens)
            last_loss = step_loss
            trainer_log.write({
                "step": step, "epoch": round(step / steps_per_epoch, 3), "loss": round(step_loss, 6),
                "learningRate": lr, "gradNorm": round(grad_norm, 6), "tokens": int(step_real_tokens),
                "tokensPerSecond": round(step_real_tokens / dt, 1),
            })
            if step % log_every == 0 or step == total_steps:
                report()
            epoch_end = batch_in_epoch == 0
            if do_eval and ((eval_every and step % eval_every == 0) or (not eval_every and epoch_end)):
                stopped_early = run_eval()
                if stopped_early:
                    break
            if (ckpt_every and step % ckpt_every == 0) or (not ckpt_every and epoch_end):
                save_checkpoint(*position())
                if d.main:
                    checkpoint.rotate(ckpt_dir, spec.checkpointing.keep, protect=best_ckpt)
            if stop_requested(stop, d):
                path = save_checkpoint(*position())
                raise Interrupted(f"{signal_name(stop.signal)} received at step {step}: saved {path}, exit to resume")

    # ---- the end: final evaluation, best weights, forgetting, outputs
    if do_eval and evaluated_at != step:
        final_eval = evaluate(eval_model, datasets.validation, d, amp, eval_fn, eval_batch, shard)
        if final_eval is not None:
            last_eval = final_eval
            trainer_log.write({"step": step, "epoch": round(step / steps_per_epoch, 3), "evalLoss": final_eval})
            if best_eval is None or final_eval < best_eval:
                best_eval = final_eval
                best_ckpt = ckpt_dir / checkpoint.name(step)
                save_checkpoint(*position())
    used_best = False
    if best_ckpt is not None and best_eval is not None and last_eval is not None and best_eval < last_eval:
        tensors, _, _ = checkpoint.load(best_ckpt)
        load_trainable(model, tensors, use_fsdp)
        used_best = True
    general_after = None
    if datasets.general_held_out:
        general_after = evaluate(eval_model, datasets.general_held_out, d, amp, eval_fn, eval_batch, shard)

    model_dir = out_dir / outputs.MODEL_DIR
    full_sd = full_state_dict(model) if use_fsdp else None
    if d.main:
        outputs.save_model(base, tokenizer, model_dir, merge_lora=bool(spec.peft and spec.peft.merge), state_dict=full_sd)
        checkpoint.rotate(ckpt_dir, spec.checkpointing.keep, protect=best_ckpt)
    barrier(d)
    best_display = display_source(spec, outputs.CHECKPOINT_DIR, best_ckpt.name) if best_ckpt else None
    metrics = {
        "steps": step,
        "totalSteps": total_steps,
        "epochs": round(step / steps_per_epoch, 3),
        "trainLoss": last_loss,
        "evalLoss": last_eval,
        "bestEvalLoss": best_eval,
        "bestCheckpoint": best_display,
        "outputUsesBestCheckpoint": used_best,
        "stoppedEarly": stopped_early,
        "generalLossBefore": general_before,
        "generalLossAfter": general_after,
        "forgetting": (general_after - general_before) if general_before is not None and general_after is not None else None,
        "effectiveBatchSize": effective_batch,
        "worldSize": d.world,
        "precision": amp.name,
        "packing": packing,
        "tokensPerSecond": round(tokens_run / train_time, 1) if train_time else None,
        "trainedTokens": train_tokens_done,
        "trainSeconds": round(train_time, 2),
        "trainCpuSeconds": round(train_cpu, 2),
        "wallSeconds": round(time.time() - t_start, 2),
        "trainableParameters": sum(p.numel() for p in trainable),
        "outputModel": display_source(spec, outputs.MODEL_DIR),
        "data": datasets.stats,
    }
    if d.main:
        outputs.write_metrics(out_dir / outputs.METRICS, metrics)
        outputs.plot_loss(trainer_log.records(), out_dir / outputs.PLOT)
        msg = "stopped early: eval loss stopped improving" if stopped_early else "done"
        report(msg, final=True, general_loss_after=general_after, output_model=metrics["outputModel"], best_checkpoint=best_display)
    if d.world > 1:
        dist.destroy_process_group()
    return metrics


# ---------------------------------------------------------------- helpers around state


def stop_requested(stop: StopFlag, d: Dist) -> bool:
    """All ranks agree, so that every rank joins the checkpoint save."""
    flag = stop.signal is not None
    if d.world > 1:
        flag = all_sum(1.0 if flag else 0.0, d) > 0
        if flag and stop.signal is None:
            stop.signal = signal.SIGTERM
    return flag


def signal_name(sig: int | None) -> str:
    try:
        return signal.Signals(sig).name
    except (ValueError, TypeError):
        return "stop signal"


def _rng_state() -> dict[str, Any]:
    import random

    import numpy as np

    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def gather_state(model, base, optimizer, scheduler, amp: Amp, use_fsdp: bool):
    """Trainable parameters and optimizer state as full, FQN-keyed dicts (the same code for DDP and FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    target = model if use_fsdp else base
    msd, osd = get_state_dict(target, optimizer, options=opts)
    states = {
        "optimizer": osd,
        "scheduler": scheduler.state_dict(),
        "scaler": amp.scaler.state_dict() if amp.scaler else None,
        "rng": _rng_state(),
    }
    return {k: v.detach().cpu() for k, v in msd.items()}, states


def load_trainable(model, tensors: dict[str, torch.Tensor], use_fsdp: bool = False, optimizer=None, optim_state=None) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    target = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    opts = StateDictOptions(full_state_dict=True, strict=False)
    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(target, tensors, options=opts)
    else:
        set_state_dict(target, optimizer, model_state_dict=tensors, optim_state_dict=optim_state, options=opts)


def restore(path: Path, model, optimizer, scheduler, amp: Amp, guard: StabilityGuard, d: Dist) -> dict[str, Any]:
    import random

    import numpy as np

    tensors, states, st = checkpoint.load(path)
    load_trainable(model, tensors, optimizer=optimizer, optim_state=states["optimizer"])
    scheduler.load_state_dict(states["scheduler"])
    if amp.scaler and states.get("scaler"):
        amp.scaler.load_state_dict(states["scaler"])
    rng = states.get("rng") or {}
    if rng:
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if torch.cuda.is_available() and "cuda" in rng:
            torch.cuda.set_rng_state_all(rng["cuda"])
    guard.load_state_dict(st.get("guard", {}))
    return st


def wrap_fsdp(model, amp: Amp):
    """FSDP2: shard every transformer layer and the root; bf16/fp16 compute with fp32 gradient reduction."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=amp.autocast_dtype, reduce_dtype=torch.float32) if amp.autocast_dtype else MixedPrecisionPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def full_state_dict(model) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
