"""Cross-entropy fused with the LM head, chunked over tokens: the summed loss at response positions without
ever holding a ``[tokens x vocab]`` tensor (the idea of Liger's fused linear cross-entropy and Apple's Cut
Cross-Entropy, in plain torch).

How it plugs in: for the one forward of ``fused_head``, the model's LM head (``get_output_embeddings()``)
computes the loss instead of logits. The model runs exactly as it always does (through DDP, FSDP2, peft,
gradient checkpointing, packing) and hands the head its final hidden states at the kept positions; inside
the model's forward FSDP2 has the head's weight unsharded, and tied embeddings are the same parameter, so
the gradient lands where autograd and FSDP expect it. The head returns an empty tensor as "logits".

``_FusedLinearCrossEntropy`` walks the rows in chunks of ``CHUNK_BYTES`` of fp32 logits: each chunk's
logits, log-sum-exp and target logit, and, in the same pass, its gradient (softmax - onehot, through the
architecture's soft-capping or scaling) with respect to the hidden states, the weight and the bias. The
chunk is then freed. Computing the gradient in the forward (as Liger does) costs one matmul less than
recomputing each chunk in the backward (what ``torch.utils.checkpoint`` per chunk would do): three LM-head
matmuls instead of four; what it keeps for the backward is the hidden states' gradient ``[rows x width]``
and the weight's ``[vocab x width]``, which the parameter's ``.grad`` would hold anyway.

Exact only for heads this module knows: ``HEADS`` lists the architectures (by ``model_type``) whose logits
are ``lm_head(hidden)`` followed by nothing, a soft-cap or a scale (read from transformers' modeling code and
tested against the unfused loss). Any other architecture, or a head that is not a plain ``nn.Linear`` (LoRA
on the head), keeps the unfused path, and the reason is logged once. ``SFT_FUSED_LOSS=0`` turns it off.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from sft_contract.memory import FUSED_LOSS_TYPES, LOSS_CHUNK_BYTES

log = logging.getLogger("sft_trainer")

# fp32 logits of one chunk: ~220 rows at Qwen's 151,936 tokens. About two buffers of it live at once (the
# logits and log-sum-exp's temporary; soft-capping a third). The memory estimate counts it.
CHUNK_BYTES = LOSS_CHUNK_BYTES


@dataclass(frozen=True)
class Head:
    """What the architecture does to ``lm_head(hidden)``: multiply by ``scale``, then ``softcap * tanh(x / softcap)``."""

    scale: float = 1.0
    softcap: float | None = None


# model_type -> what follows ``lm_head(hidden)`` in transformers 5's modeling_<type>.py (``...ForCausalLM.forward``);
# the others in memory.FUSED_LOSS_TYPES (which the memory estimate reads too) have nothing after it.
_AFTER_HEAD: dict[str, Callable[[Any], Head]] = {
    "gemma2": lambda c: Head(softcap=c.final_logit_softcapping),
    "gemma3_text": lambda c: Head(softcap=c.final_logit_softcapping),
    "cohere": lambda c: Head(scale=float(c.logit_scale)),
    "granite": lambda c: Head(scale=1.0 / float(c.logits_scaling)),
}
HEADS: dict[str, Callable[[Any], Head]] = {t: _AFTER_HEAD.get(t, lambda c: Head()) for t in FUSED_LOSS_TYPES}


def enabled() -> bool:
    return os.environ.get("SFT_FUSED_LOSS", "1").strip().lower() not in ("0", "false", "no", "off")


def _unwrap(model):
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def head_of(model) -> tuple[torch.nn.Linear | None, Head | None, str]:
    """(the LM head module, what follows it, "") when the fused loss is exact for ``model``; else (None, None, why)."""
    base = _unwrap(model)
    model_type = getattr(base.config, "model_type", "?")
    if model_type not in HEADS:
        return None, None, f"architecture {model_type!r} is not one whose LM head the fused loss reproduces"
    head = base.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return None, None, f"the LM head is a {type(head).__name__}, not a plain Linear (e.g. LoRA on the head)"
    return head, HEADS[model_type](base.config), ""


_told: set[str] = set()


@dataclass
class Fused:
    """Filled in by the head during ``fused_head``: the summed loss (None: the unfused path runs)."""

    loss: torch.Tensor | None = None


@contextlib.contextmanager
def fused_head(model, keep: torch.Tensor, targets: torch.Tensor) -> Iterator[Fused]:
    """For one forward of ``model(..., logits_to_keep=keep)``: its LM head puts the summed cross-entropy
    against ``targets`` (one per kept position) into the yielded ``Fused`` instead of computing logits."""
    out = Fused()
    head, post, why = head_of(model) if enabled() else (None, None, "SFT_FUSED_LOSS=0")
    if head is None:
        if why not in _told:
            _told.add(why)
            log.info("loss: unfused cross-entropy (full logits at response positions): %s", why)
        yield out
        return

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        if out.loss is not None:
            raise RuntimeError("the LM head ran twice in one forward: the fused loss cannot tell which is the output")
        rows = hidden if hidden.dim() == 2 else hidden[keep]  # an architecture that ignores a boolean logits_to_keep
        out.loss = fused_linear_cross_entropy(rows, head.weight, head.bias, targets, post)
        return rows[:, :0]  # empty "logits": nothing downstream needs them

    own = head.__dict__.get("forward")  # an instance-level forward (accelerate hooks) to put back
    head.forward = forward
    try:
        yield out
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own


def chunk_rows(vocab: int, rows: int) -> int:
    return max(1, min(rows, CHUNK_BYTES // (4 * vocab)))


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                               targets: torch.Tensor, head: Head = Head()) -> torch.Tensor:
    """``F.cross_entropy(post(hidden @ weight.T + bias).float(), targets, reduction="sum")`` in chunks of rows."""
    grad = torch.is_grad_enabled()
    needs = (grad and hidden.requires_grad, grad and weight.requires_grad,
             grad and bias is not None and bias.requires_grad)
    return _FusedLinearCrossEntropy.apply(hidden, weight, bias, targets, head, needs)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, head: Head, needs: tuple[bool, bool, bool]):
        device = hidden.device
        # The matmuls run in the dtype the unfused head would use: autocast's, else the operands'.
        dtype = (torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type)
                 else torch.promote_types(hidden.dtype, weight.dtype))
        need_h, need_w, need_b = needs
        with torch.autocast(device.type, enabled=False):
            h_all, w = hidden.to(dtype), weight.to(dtype)
            b = bias.to(dtype) if bias is not None else None
            n, vocab = h_all.shape[0], w.shape[0]
            loss = torch.zeros((), dtype=torch.float32, device=device)
            grad_h = torch.empty(h_all.shape, dtype=torch.float32, device=device) if need_h else None
            grad_w = torch.zeros(w.shape, dtype=torch.float32, device=device) if need_w else None
            grad_b = torch.zeros(vocab, dtype=torch.float32, device=device) if need_b else None
            step = chunk_rows(vocab, n)
            for s in range(0, n, step):
                h, t = h_all[s : s + step], targets[s : s + step]
                logits = F.linear(h, w, b).float()
                if head.scale != 1.0:
                    logits.mul_(head.scale)
                tanh = None
                if head.softcap is not None:
                    tanh = logits.div_(head.softcap).tanh_()
                    logits = tanh * head.softcap
                lse = torch.logsumexp(logits, dim=-1)
                loss += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
                if not (need_h or need_w or need_b):
                    continue
                g = logits.sub_(lse[:, None]).exp_()  # softmax, in place
                g[torch.arange(len(t), device=device), t] -= 1.0
                if tanh is not None:  # d/dx softcap*tanh(x/softcap) = 1 - tanh^2
                    g.mul_(tanh.mul_(tanh).neg_().add_(1.0))
                if head.scale != 1.0:
                    g.mul_(head.scale)
                if need_b:
                    grad_b += g.sum(0)
                g = g.to(dtype)
                if need_h:
                    grad_h[s : s + step] = g @ w
                if need_w:
                    if dtype == torch.float32:
                        grad_w.addmm_(g.t(), h)
                    else:
                        grad_w += g.t() @ h
                del logits, g, tanh
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        dh, dw, db = ctx.dtypes

        def scaled(g, dtype):  # in place: a [vocab x width] copy less (autograd frees them after one backward)
            return None if g is None else g.mul_(grad_loss).to(dtype)

        return scaled(grad_h, dh), scaled(grad_w, dw), scaled(grad_b, db), None, None, None
