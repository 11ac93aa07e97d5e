"""The stability guard: NaN/Inf loss or gradient norm, or a loss spike far above its recent average,
stops the run before the optimizer applies the bad step (so no checkpoint can hold the bad state)."""

from __future__ import annotations

import math
import os
from collections import deque

from .errors import DivergenceError

HINT = "lower the learning rate or use more warmup (hyperparameters.learningRate / warmupRatio)"


class StabilityGuard:
    """``check`` once per optimizer step, after backward and before ``optimizer.step()``.

    A spike is a loss above both ``factor`` x and ``margin`` nats over the mean of the last ``window``
    steps (after ``min_history`` steps). Both bounds keep normal small-batch noise from tripping it.
    With fp16 loss scaling, an Inf gradient norm is the scaler's business (it skips the step and lowers
    the scale); only ``max_skips`` skips in a row count as divergence.
    """

    def __init__(self, *, window: int = 50, min_history: int = 10, factor: float | None = None,
                 margin: float | None = None, loss_scaling: bool = False, max_skips: int = 20):
        self.history: deque[float] = deque(maxlen=window)
        self.min_history = min_history
        self.factor = factor if factor is not None else float(os.environ.get("SFT_SPIKE_FACTOR", 4.0))
        self.margin = margin if margin is not None else float(os.environ.get("SFT_SPIKE_MARGIN", 3.0))
        self.loss_scaling = loss_scaling
        self.max_skips = max_skips
        self.skips = 0

    def check(self, step: int, loss: float, grad_norm: float, lr: float) -> bool:
        """Raise DivergenceError on a bad step. Returns False when fp16 loss scaling will skip this step."""
        if not math.isfinite(loss):
            raise DivergenceError(f"loss is {loss} at step {step} (learning rate {lr:.3g}); {HINT}")
        if not math.isfinite(grad_norm):
            if self.loss_scaling and self.skips < self.max_skips:
                self.skips += 1
                return False
            raise DivergenceError(
                f"gradient norm is {grad_norm} at step {step} (loss {loss:.4g}, learning rate {lr:.3g}); {HINT}"
            )
        self.skips = 0
        if len(self.history) >= self.min_history:
            mean = sum(self.history) / len(self.history)
            if loss > self.factor * mean and loss > mean + self.margin:
                raise DivergenceError(
                    f"loss diverged at step {step}: {loss:.4g} against a recent average of {mean:.4g} "
                    f"(learning rate {lr:.3g}); {HINT}"
                )
        self.history.append(loss)
        return True

    def state_dict(self) -> dict:
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.history.extend(state.get("history", []))
