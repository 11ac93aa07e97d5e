"""Batches without wasted compute: the epoch's batch order (length-grouped, rank-sharded) and two collators.

- ``pad_batch``: dynamic padding to the longest row of the batch (pad token distinct from EOS, label -100,
  attention mask 0). With length-grouped batches, rows of similar length share a batch, so little is padded.
- ``pack_batch``: the batch's rows concatenated into one padding-free sequence, ``position_ids`` restarting at
  0 for every row and no 2D attention mask. transformers turns restarting position ids into per-row
  isolation: flash-attention varlen on GPU, a block-diagonal causal mask with sdpa/eager (also on CPU).
  The batch keeps its rows, so the hyperparameters (batch size, accumulation) mean the same with packing.

The batch order is our own rather than transformers' ``LengthGroupedSampler`` because resume needs a
deterministic per-epoch order that can be skipped into, and DDP needs every rank to get the same number
of similar-length batches.
"""

from __future__ import annotations

import random
from typing import Sequence

import torch

from .data import IGNORE, Example

MEGABATCH = 50  # batches sorted together by length (as transformers' LengthGroupedSampler does)


def epoch_batches(
    lengths: Sequence[int],
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    world_size: int = 1,
    rank: int = 0,
    group_by_length: bool = True,
) -> list[list[int]]:
    """This rank's micro-batches (lists of example indices) for one epoch; the same for a given seed and epoch."""
    rng = random.Random(seed * 100_003 + epoch)
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    global_batch = batch_size * world_size
    if world_size > 1 and len(idx) % global_batch:
        # Every rank must run the same number of steps: repeat a few rows, as DistributedSampler does.
        idx += idx[: global_batch - len(idx) % global_batch]
    batches: list[list[int]] = []
    if group_by_length:
        mega = global_batch * MEGABATCH
        for start in range(0, len(idx), mega):
            chunk = sorted(idx[start : start + mega], key=lambda i: -lengths[i])
            batches += [chunk[j : j + global_batch] for j in range(0, len(chunk), global_batch)]
        rng.shuffle(batches)
        # Longest batch first: an out-of-memory error shows up at step 1, not hours in.
        longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
        batches.insert(0, batches.pop(longest))
    else:
        batches = [idx[j : j + global_batch] for j in range(0, len(idx), global_batch)]
    return [b[rank * batch_size : (rank + 1) * batch_size] for b in batches]


def pad_batch(examples: Sequence[Example], pad_id: int, pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row: pad id for inputs, -100 for labels, 0 in the attention mask."""
    longest = max(len(e) for e in examples)
    if pad_to_multiple_of:
        longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    n = len(examples)
    input_ids = torch.full((n, longest), pad_id, dtype=torch.long)
    labels = torch.full((n, longest), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((n, longest), dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e)
        input_ids[i, :k] = torch.tensor(e.input_ids)
        labels[i, :k] = torch.tensor(e.labels)
        attention_mask[i, :k] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pack_batch(examples: Sequence[Example]) -> dict[str, torch.Tensor]:
    """One padding-free row: inputs concatenated, position ids reset per example, no attention mask."""
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    for e in examples:
        input_ids += e.input_ids
        labels += e.labels  # the first label of every example is -100: no learning across a boundary
        position_ids += range(len(e))
    return {
        "input_ids": torch.tensor([input_ids]),
        "labels": torch.tensor([labels]),
        "position_ids": torch.tensor([position_ids]),
    }


def trained_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that carry a loss: labels that are not -100, excluding the first position (nothing predicts it)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Non-padding tokens in the batch (what 'tokens per second' counts)."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())
