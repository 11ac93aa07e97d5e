"""The data check: the dataset read, validated and tokenized by the trainer's own code (data.py) before any
model weight is loaded, every bad row found rather than the first.

It runs in the fetch stage (``python -m sft_trainer.fetch``, after the sources are in the cache), in
``sftctl run`` before training, and offline as ``sftctl validate --data``. It reports the format, the rows,
the invalid ones by file and row (for JSONL the row is the line number), duplicates, token lengths, how many
rows ``maxSeqLength`` truncates or drops, and the steps and tokens the run will take. Invalid rows fail the
check as DataError (exit 65: the job ends Failed/DataError) naming the first of them.
"""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass, field

from sft_contract.messages import DataSummary, TokenLengths
from sft_contract.spec import DataFormat, DatasetSpec, TrainingSpec

from . import data
from .errors import DataError

log = logging.getLogger(__name__)

NAMED = 5  # invalid rows named in the error and in status.data
LISTED = 50  # invalid rows listed in the offline report


@dataclass
class DataCheck:
    format: str
    max_seq_length: int
    rows: int = 0
    found: list[tuple[str, int, str]] = field(default_factory=list)  # invalid rows: (file, row, "file row N: why")
    duplicates: list[str] = field(default_factory=list)  # the first LISTED, "file row N repeats row M"
    duplicate_rows: int = 0
    train: data.LengthStats = field(default_factory=data.LengthStats)
    validation: data.LengthStats = field(default_factory=data.LengthStats)
    train_rows: int = 0
    validation_rows: int = 0
    general_rows: int = 0
    steps_per_epoch: int = 0
    estimated_steps: int = 0
    estimated_tokens: int = 0
    estimated_trained_tokens: int = 0

    @property
    def ok(self) -> bool:
        return not self.found

    @property
    def invalid_rows(self) -> int:
        return len(self.found)

    @property
    def invalid(self) -> list[str]:
        """The first LISTED invalid rows, by file and row."""
        return [reason for _, _, reason in sorted(self.found, key=lambda f: f[:2])[:LISTED]]

    def add_invalid(self, file: str, row: int, reason: str) -> None:
        self.found.append((file, row, reason))

    def summary(self) -> DataSummary:
        t = self.train
        return DataSummary(
            format=self.format, rows=self.rows, invalid_rows=self.invalid_rows,
            first_invalid=[_clip(r) for r in self.invalid[:NAMED]] or None, duplicate_rows=self.duplicate_rows,
            train_rows=self.train_rows, validation_rows=self.validation_rows, general_rows=self.general_rows,
            max_seq_length=self.max_seq_length, truncated_rows=t.truncated + self.validation.truncated,
            dropped_rows=t.dropped + self.validation.dropped,
            token_lengths=TokenLengths(min=t.min, p50=t.p50, p95=t.p95, max=t.max, mean=t.mean) if t.rows else None,
            estimated_steps=self.estimated_steps, estimated_tokens=self.estimated_tokens,
            estimated_trained_tokens=self.estimated_trained_tokens,
        )

    def error(self) -> DataError:
        named = "; ".join(self.invalid[:NAMED])
        more = f" (and {self.invalid_rows - NAMED} more)" if self.invalid_rows > NAMED else ""
        return DataError(f"{self.invalid_rows} invalid row(s) of {self.rows}: {named}{more}")

    def lines(self) -> list[str]:
        """The report for people (``sftctl validate --data``, the fetch stage's log)."""
        t = self.train
        out = [f"format {self.format}; {self.rows} rows, {self.invalid_rows} invalid, {self.duplicate_rows} duplicate"]
        out += [f"  invalid: {r}" for r in self.invalid]
        if self.invalid_rows > len(self.invalid):
            out.append(f"  ... and {self.invalid_rows - len(self.invalid)} more invalid rows")
        out += [f"  duplicate: {r}" for r in self.duplicates[:NAMED]]
        if self.duplicate_rows > NAMED:
            out.append(f"  ... and {self.duplicate_rows - NAMED} more duplicates")
        if t.rows:
            out.append(
                f"tokens per row min/mean/p50/p95/max {t.min}/{t.mean}/{t.p50}/{t.p95}/{t.max}; at maxSeqLength "
                f"{self.max_seq_length}: {t.truncated + self.validation.truncated} truncated, "
                f"{t.dropped + self.validation.dropped} dropped"
            )
            out.append(
                f"training: {self.train_rows} rows ({self.general_rows} general), {self.validation_rows} validation; "
                f"~{self.estimated_steps} steps ({self.steps_per_epoch} per epoch), ~{self.estimated_tokens:,} tokens "
                f"(~{self.estimated_trained_tokens:,} trained)"
            )
        return out


def _clip(reason: str, limit: int = 300) -> str:
    """A reason short enough that five fit a progress report (16 KiB) whatever else it carries."""
    return reason if len(reason) <= limit else reason[: limit - 3] + "..."


def _key(row: data.RawRow) -> str:
    return json.dumps(row.data, sort_keys=True, ensure_ascii=False, default=str)


def _format(rows: list[data.RawRow], requested: DataFormat | str) -> DataFormat:
    """The format the trainer uses: the spec's, or the first row's (``data.build``); the first row that has
    one when the first does not, so that every other row is still checked (the first is then invalid)."""
    if requested != DataFormat.auto and requested != DataFormat.auto.value:
        return DataFormat(requested)
    first: DataError | None = None
    for row in rows:
        try:
            return data.detect_format(row)
        except DataError as e:
            first = first or e
    raise first  # type: ignore[misc] - rows is never empty (read_rows)


def _valid(rows: list[data.RawRow], fmt: DataFormat, spec: DatasetSpec, tokenizer, check: DataCheck) -> list[data.RawRow]:
    good = []
    for row in rows:
        try:
            data.row_segments(row, fmt, spec, tokenizer)
        except DataError as e:
            check.add_invalid(row.file, row.row, e.reason)
            continue
        good.append(row)
    return good


def _duplicates(rows: list[data.RawRow], check: DataCheck) -> None:
    seen: dict[str, data.RawRow] = {}
    for row in rows:
        first = seen.setdefault(_key(row), row)
        if first is not row:
            check.duplicate_rows += 1
            if len(check.duplicates) < LISTED:
                same = f"row {first.row}" if first.file == row.file else first.where()
                check.duplicates.append(f"{row.where()} repeats {same}")


def steps_per_epoch(rows: int, batch: int, world: int, accumulation: int) -> int:
    """The trainer's steps per epoch (``collate.epoch_batches``: rows padded to whole global batches)."""
    return max(1, math.ceil(math.ceil(rows / (batch * world)) / accumulation))


def check(spec: TrainingSpec, tokenizer, world: int = 1) -> DataCheck:
    """Check ``spec``'s data with ``tokenizer`` (the model's) for a run of ``world`` processes. Raises DataError
    only for what stops the reading itself (a missing file, a broken CSV); bad rows are collected."""
    ds, hp = spec.dataset, spec.hyperparameters
    data.ensure_pad_token(tokenizer)
    bad: list[tuple[str, int, str]] = []
    train_rows = data.read_rows(ds.train, bad=bad)
    val_rows = data.read_rows(ds.validation, bad=bad) if ds.validation is not None else None
    fmt = _format(train_rows, ds.format)
    out = DataCheck(format=fmt.value, max_seq_length=ds.max_seq_length)
    for found in bad:
        out.add_invalid(*found)
    out.rows = len(train_rows) + len(val_rows or []) + len(bad)
    _duplicates(train_rows + (val_rows or []), out)
    train_ok = _valid(train_rows, fmt, ds, tokenizer, out)
    val_ok = _valid(val_rows, fmt, ds, tokenizer, out) if val_rows is not None else None
    if val_ok is None:  # the same split the trainer draws, from the same seed (of the rows it would keep)
        train_ok, val_ok = data.split_validation(train_ok, ds.effective_validation_split, random.Random(hp.seed))
    train = data.tokenize_rows(train_ok, fmt, ds, tokenizer, "task", out.train)
    validation = data.tokenize_rows(val_ok, fmt, ds, tokenizer, "task", out.validation) if val_ok else []
    if train_ok and not train:
        out.add_invalid(ds.train.source, 0,
                        f"{ds.train.source}: every row was dropped (longer than maxSeqLength {ds.max_seq_length})")
    out.train_rows, out.validation_rows = len(train), len(validation)

    tokens, trained = sum(len(e) for e in train), sum(e.trained_tokens for e in train)
    if ds.general is not None:
        general = _general(ds, tokenizer, len(train), out)
        tokens += round(general.mean * out.general_rows)
        trained += round(general.response_tokens / max(1, general.rows - general.dropped) * out.general_rows)
    total_rows = out.train_rows + out.general_rows
    out.steps_per_epoch = steps_per_epoch(total_rows, hp.per_device_batch_size, world, hp.gradient_accumulation_steps)
    out.estimated_steps = hp.max_steps or out.steps_per_epoch * hp.num_epochs
    epochs = out.estimated_steps / out.steps_per_epoch
    out.estimated_tokens, out.estimated_trained_tokens = round(tokens * epochs), round(trained * epochs)
    return out


def _general(ds: DatasetSpec, tokenizer, task_rows: int, out: DataCheck) -> data.LengthStats:
    """The general rows checked as the trainer reads them; their mean length stands for the rows mixed in."""
    g = ds.general
    bad: list[tuple[str, int, str]] = []
    rows = data.read_rows(g, bad=bad)
    for found in bad:
        out.add_invalid(*found)
    ok = _valid(rows, _format(rows, DataFormat.auto), ds, tokenizer, out)
    stats = data.LengthStats()
    data.tokenize_rows(ok, _format(rows, DataFormat.auto), ds, tokenizer, "general", stats)
    held = min(g.held_out_rows, len(rows) // 2)
    out.general_rows = data.general_rows_needed(task_rows, g.mix_ratio) if len(ok) > held else 0
    return stats


def run(spec: TrainingSpec, world: int = 1, reporter=None, fetched: tuple[int, int] | None = None) -> DataCheck:
    """The check as a stage: the model's tokenizer loaded (no weights), the report logged and sent to the
    operator (``reporter``; with the fetch's ``(bytes done, total)``, so status keeps showing them), DataError
    raised when a row is invalid."""
    from sft_contract.messages import ProgressReport
    from .loading import load_tokenizer

    result = check(spec, load_tokenizer(spec), world)
    for line in result.lines():
        log.info("data check: %s", line)
    if reporter is not None:
        done, total = fetched if fetched and fetched[1] else (None, None)
        reporter.report(ProgressReport(step=0, total_steps=0, epoch=0.0, stage="fetching", data=result.summary(),
                                       bytes_done=done, bytes_total=total,
                                       message=f"data checked: {result.invalid_rows} invalid row(s)"))
    if not result.ok:
        raise result.error()
    return result
