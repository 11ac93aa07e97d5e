"""Batches without wasted compute: the epoch's batch order (random, rank-sharded), the split of each batch
into similar-length sub-batches, and two collators.

- ``epoch_batches``: random batches, as TRL and HF Trainer draw them. Length-*grouped* batches (transformers'
  ``group_by_length``) pad less but train worse: a batch of only long rows makes the long-row gradient
  arrive in rare bursts, which Adam damps (measured: +0.107 eval loss after 3 epochs, 5 seeds, BENCHMARKS.md).
- ``length_splits``: one random batch cut into sub-batches of similar length, run one after another and
  summed into the same optimizer step. The gradient is the random batch's; only the padding goes.
- ``pad_batch``: dynamic padding to the longest row of a (sub-)batch (pad token distinct from EOS, label -100,
  attention mask 0).
- ``pack_batch``: the batch's rows concatenated into one padding-free sequence, ``position_ids`` restarting at
  0 for every row and no 2D attention mask. transformers turns restarting position ids into per-row
  isolation: flash-attention varlen on GPU, a block-diagonal causal mask with sdpa/eager (also on CPU).
  The batch keeps its rows, so the hyperparameters (batch size, accumulation) mean the same with packing.

The batch order is our own rather than a torch sampler because resume needs a deterministic per-epoch
order that can be skipped into, and DDP needs every rank to get the same number of batches.
"""

from __future__ import annotations

import random
from typing import Iterator, Sequence

import torch

from .data import IGNORE, Example


def eval_batches(examples: Sequence[Example], batch_size: int, rank: int = 0, world: int = 1) -> Iterator[list[Example]]:
    """Evaluation batches: the rows by length (the least padding), and of those every ``world``-th from ``rank``."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))[rank::world]
    for start in range(0, len(order), batch_size):
        yield [examples[i] for i in order[start : start + batch_size]]


def epoch_batches(
    lengths: Sequence[int],
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    world_size: int = 1,
    rank: int = 0,
) -> list[list[int]]:
    """This rank's random micro-batches (lists of example indices) for one epoch; the same for a given seed and epoch."""
    rng = random.Random(seed * 100_003 + epoch)
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    global_batch = batch_size * world_size
    if world_size > 1 and len(idx) % global_batch:
        # Every rank must run the same number of steps: repeat a few rows, as DistributedSampler does.
        idx += idx[: global_batch - len(idx) % global_batch]
    batches = [idx[j : j + global_batch] for j in range(0, len(idx), global_batch)]
    # The batch holding the longest row first: a row too long for memory fails at step 1, not hours in.
    longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
    batches.insert(0, batches.pop(longest))
    return [b[rank * batch_size : (rank + 1) * batch_size] for b in batches]


def length_splits(lengths: Sequence[int], call_cost: int) -> list[list[int]]:
    """Cut one batch into sub-batches of similar length (positions into ``lengths``, shortest rows first).

    Minimises padded positions plus ``call_cost`` positions per sub-batch (the fixed cost of one more
    forward and backward). Over rows sorted by length, the best cut is a set of contiguous runs, found by
    dynamic programming: O(n^2) for a batch of n rows.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    best = [0] + [float("inf")] * n  # best[j]: cost of the j shortest rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        longest = lengths[order[j - 1]]
        for i in range(j):
            cost = best[i] + (j - i) * longest + call_cost
            if cost < best[j]:
                best[j], cut[j] = cost, i
    runs: list[list[int]] = []
    j = n
    while j > 0:
        runs.append(order[cut[j] : j])
        j = cut[j]
    return runs[::-1]


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


class Batcher:
    """One rank's batches for a run: the epoch's micro-batches, and each micro-batch as the tensors to run.

    ``split_cost`` None runs each micro-batch whole (packing pads nothing; under FSDP every rank must run
    the same number of forwards); otherwise each is cut by ``length_splits``.
    """

    def __init__(self, examples: Sequence[Example], *, batch_size: int, seed: int, world: int, rank: int,
                 pad_id: int, packing: bool, split_cost: int | None):
        self.examples = examples
        self.lengths = [len(e) for e in examples]
        self.batch_size, self.seed, self.world, self.rank = batch_size, seed, world, rank
        self.pad_id, self.packing, self.split_cost = pad_id, packing, split_cost

    def epoch(self, epoch: int) -> list[list[int]]:
        return epoch_batches(self.lengths, self.batch_size, seed=self.seed, epoch=epoch, world_size=self.world,
                             rank=self.rank)

    def step(self, micro_batches: Sequence[Sequence[int]]) -> list[tuple[dict[str, torch.Tensor], bool]]:
        """A step's (sub-)batches, each with whether it ends a micro-batch. Ranks may get different numbers
        of sub-batches, but every rank has the same number of micro-batch ends."""
        out = []
        for idx in micro_batches:
            runs = ([list(range(len(idx)))] if self.split_cost is None
                    else length_splits([self.lengths[i] for i in idx], self.split_cost))
            for n, run in enumerate(runs):
                rows = [self.examples[idx[k]] for k in run]
                out.append((pack_batch(rows) if self.packing else pad_batch(rows, self.pad_id), n == len(runs) - 1))
        return out
