"""Everything a run carries from step to step, in one dataclass, and what of it a checkpoint keeps.

``to_checkpoint`` / ``from_checkpoint`` are the trainer_state.json of a checkpoint (camelCase keys); the
fields after ``guard`` belong to this process only (timings, the last loss) and start afresh on resume.
The random-number generators are saved beside it (``rng_state``/``restore_rng``) in types that
``torch.load(weights_only=True)`` accepts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .stability import StabilityGuard

# Field -> trainer_state.json key. Nothing else goes into a checkpoint's state.
PERSISTED = {
    "run_id": "runId",
    "step": "step",
    "epoch": "epoch",
    "batch_in_epoch": "batchInEpoch",
    "best_eval_loss": "bestEvalLoss",
    "best_checkpoint": "bestCheckpoint",
    "bad_evals": "badEvals",
    "general_loss_before": "generalLossBefore",
    "last_eval_loss": "lastEvalLoss",
    "trained_tokens": "tokens",
    "base_metrics": "baseMetrics",
}


@dataclass
class RunState:
    run_id: str
    total_steps: int
    steps_per_epoch: int
    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch the next step is in
    batch_in_epoch: int = 0  # the micro-batch of that epoch the next step starts at
    best_eval_loss: float | None = None
    best_checkpoint: str | None = None  # path of the checkpoint holding the best weights
    bad_evals: int = 0  # evaluations since the last improvement (early stopping)
    general_loss_before: float | None = None  # forgetting baseline
    last_eval_loss: float | None = None
    trained_tokens: int = 0  # non-padding tokens trained on, over the whole run
    base_metrics: dict[str, float | None] | None = None  # the evaluation gates' baseline: the base model's values
    guard: StabilityGuard = field(default_factory=StabilityGuard)
    # ---- this process only
    first_step: int = 0  # where this process started (> 0 after a resume)
    evaluated_at: int = -1
    last_loss: float | None = None
    stopped_early: bool = False
    train_seconds: float = 0.0
    train_cpu_seconds: float = 0.0
    tokens_this_process: int = 0
    evaluation: Any = None  # config.EvaluationResult once the tuned model is judged

    @property
    def epochs_done(self) -> float:
        return round(self.step / self.steps_per_epoch, 3)

    @property
    def finished(self) -> bool:
        return self.step >= self.total_steps or self.stopped_early

    def to_checkpoint(self) -> dict[str, Any]:
        out = {key: getattr(self, name) for name, key in PERSISTED.items()}
        out["guard"] = self.guard.state_dict()
        out["totalSteps"] = self.total_steps  # for people reading the file; a resume recomputes it
        return out

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any], *, total_steps: int, steps_per_epoch: int,
                        guard: StabilityGuard) -> RunState:
        values = {name: saved[key] for name, key in PERSISTED.items() if key in saved}
        guard.load_state_dict(saved.get("guard", {}))
        state = cls(**values, total_steps=total_steps, steps_per_epoch=steps_per_epoch, guard=guard)
        state.first_step = state.step
        return state

    def advance(self, micro_batches: int, epoch_length: int, *, loss: float, tokens: int, seconds: float,
                cpu_seconds: float) -> None:
        """One optimizer step done: move the position, count tokens and time."""
        self.step += 1
        self.batch_in_epoch += micro_batches
        if self.batch_in_epoch >= epoch_length:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        self.last_loss = loss
        self.trained_tokens += tokens
        self.tokens_this_process += tokens
        self.train_seconds += seconds
        self.train_cpu_seconds += cpu_seconds

    @property
    def at_epoch_end(self) -> bool:
        return self.batch_in_epoch == 0 and self.step > 0

    def eta_seconds(self) -> int | None:
        done = self.step - self.first_step
        return int((self.total_steps - self.step) * self.train_seconds / done) if done > 0 else None

    def tokens_per_second(self) -> float | None:
        return round(self.tokens_this_process / self.train_seconds, 1) if self.train_seconds and self.tokens_this_process else None


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) generator states as tensors, ints and tuples (weights_only-safe)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    st: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "hasGauss": int(has_gauss), "cachedGaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def restore_rng(st: dict[str, Any]) -> None:
    if not st:
        return
    random.setstate(st["python"])
    n = st["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["hasGauss"], n["cachedGaussian"]))
    torch.set_rng_state(st["torch"])
    if torch.cuda.is_available() and "cuda" in st:
        torch.cuda.set_rng_state_all(st["cuda"])
