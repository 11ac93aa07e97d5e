"""What the evaluation gates measure, on the base model at the start and on the tuned model at the end.

- ``tokenAccuracy``: the fraction of response tokens the model predicts exactly (argmax), on the validation set;
- ``exactMatch`` / ``contains``: greedy generation on a held-out prompt set (``evaluation.prompts``: JSONL rows
  ``{"prompt", "expected"}``), the prompt rendered with the tokenizer's chat template (the dataset's instruction
  template when the tokenizer has none). ``exactMatch``: the answer equals ``expected`` (whitespace collapsed);
  ``contains``: the answer contains it.

Written here rather than with lm-evaluation-harness: it loads its own model from a path or the hub and runs
its own loop, while the gate must measure the model in memory, as trained (DDP shards or FSDP's), at the
start and at the end of the run; and it would add datasets, evaluate and sacrebleu to the image for two
string comparisons.

Under DDP every rank takes a shard of the rows and the counts are summed over ranks; under FSDP every rank
runs every row (each forward needs all ranks), with ``synced_gpus`` so that no rank stops generating early.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sft_contract.spec import DatasetSpec, PromptSet

from . import collate, data
from .distributed import Dist, all_sum
from .errors import DataError
from .gates import score

GENERATION_BATCH = 8


@dataclass(frozen=True)
class Prompt:
    where: str  # file and row, for error messages
    prompt: str
    expected: str


def load_prompts(spec: PromptSet) -> list[Prompt]:
    """The prompt set's rows; a row without a non-empty ``prompt`` and ``expected`` string is a DataError naming it."""
    out = []
    for row in data.read_rows(spec)[: spec.max_prompts]:
        where = row.where()
        values = row.data if isinstance(row.data, dict) else None
        if values is None:
            raise DataError(f"{where}: expected an object with prompt and expected")
        for key in ("prompt", "expected"):
            if not isinstance(values.get(key), str) or not values[key].strip():
                raise DataError(f"{where}: {key!r} missing or empty (evaluation.prompts rows are "
                                "{{\"prompt\": ..., \"expected\": ...}})")
        out.append(Prompt(where, values["prompt"], values["expected"]))
    return out


def render_prompt(tokenizer, prompt: str, ds: DatasetSpec) -> tuple[str, bool]:
    """The text the model continues, and whether it already holds the special tokens (a chat template's)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return text, True
    return data.fill_template(ds.prompt_template, instruction=prompt), False


@torch.no_grad()
def generation_scores(model, tokenizer, prompts: list[Prompt], ds: DatasetSpec, d: Dist, amp, *,
                      max_new_tokens: int, shard: bool, synced: bool) -> dict[str, float | None]:
    """``exactMatch`` and ``contains`` over ``prompts`` (greedy)."""
    if not prompts:
        return {"exactMatch": None, "contains": None}
    was_training = model.training
    model.eval()
    mine = prompts[d.rank :: d.world] if shard else prompts
    exact = contains = 0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for start in range(0, len(mine), GENERATION_BATCH):
        batch = mine[start : start + GENERATION_BATCH]
        ids = []
        for p in batch:
            text, templated = render_prompt(tokenizer, p.prompt, ds)
            ids.append(tokenizer(text, add_special_tokens=not templated)["input_ids"])
        longest = max(len(x) for x in ids)
        # Left padding: every row's answer starts at the same position.
        input_ids = torch.tensor([[pad] * (longest - len(x)) + x for x in ids], device=d.device)
        mask = torch.tensor([[0] * (longest - len(x)) + [1] * len(x) for x in ids], device=d.device)
        with amp.autocast(d.device):
            out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                                 synced_gpus=synced)
        for p, row in zip(batch, out[:, longest:].tolist()):
            answer = tokenizer.decode(row, skip_special_tokens=True)
            e, c = score(answer, p.expected)
            exact, contains = exact + e, contains + c
    model.train(was_training)
    total = len(prompts)
    if shard:
        exact, contains = all_sum(float(exact), d), all_sum(float(contains), d)
    return {"exactMatch": exact / total, "contains": contains / total}


@torch.no_grad()
def token_accuracy(model, examples: list[data.Example], d: Dist, amp, pad_id: int, batch_size: int,
                   shard: bool) -> float | None:
    """The fraction of response tokens whose argmax prediction is the label (summed over ranks when sharded)."""
    if not examples:
        return None
    was_training = model.training
    model.eval()
    right = total = 0
    for rows in collate.eval_batches(examples, batch_size, *((d.rank, d.world) if shard else (0, 1))):
        batch = collate.pad_batch(rows, pad_id)
        batch = {k: v.to(d.device) for k, v in batch.items()}
        labels = batch.pop("labels")
        keep = torch.zeros_like(labels, dtype=torch.bool)
        keep[:, :-1] = labels[:, 1:] != data.IGNORE
        if not keep.any():
            continue
        with amp.autocast(d.device):
            logits = model(**batch, logits_to_keep=keep, use_cache=False).logits
        if logits.dim() == 3:  # an architecture that ignores a boolean logits_to_keep
            logits = logits[keep]
        targets = labels[:, 1:][keep[:, :-1]]
        right += int((logits.argmax(-1) == targets).sum())
        total += int(targets.numel())
    model.train(was_training)
    if shard:
        right, total = all_sum(float(right), d), all_sum(float(total), d)
    return right / total if total else None
