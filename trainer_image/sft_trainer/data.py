"""Rows in, tokenized examples out: reading, format detection, row validation, prompt rendering,
tokenization with response-only labels, length handling, the validation split and the general-data mix.

Label rules (the practice, enforced here rather than left to a collator):
- only response tokens carry labels; prompt tokens are ``IGNORE`` (-100), and so is padding (collate.py);
- every row ends with EOS, and that EOS is labelled, so the model learns to stop;
- the first token of every row is never labelled, so packed rows never learn across a row boundary;
- the tokenizer gets a pad token distinct from EOS (``ensure_pad_token``), so "pad = eos, labels = input_ids"
  cannot happen: padding is added by the collator with label -100, never by reusing EOS.

Local files are read here (not through ``datasets``) so that a malformed row is reported with its file and
1-based row number; hub ids go through ``datasets.load_dataset``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import random
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from sft_contract.spec import DataFormat, DatasetSpec, DataSource, GeneralData, Overlong

from . import hub, paths
from .errors import DataError, TrainerError

log = logging.getLogger(__name__)

IGNORE = -100
PAD_TOKEN = "<|pad|>"
SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
ROLES = ("system", "user", "assistant")
CSV_FIELD_LIMIT = 16 * 1024 * 1024  # characters in one CSV field


@dataclass
class RawRow:
    file: str
    row: int  # 1-based (for JSONL: the line number)
    data: dict[str, Any]

    def where(self) -> str:
        return f"{self.file} row {self.row}"


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    source: str = "task"  # "task" or "general"

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def trained_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


@dataclass
class LengthStats:
    rows: int = 0
    truncated: int = 0
    dropped: int = 0
    min: int = 0
    mean: float = 0.0
    p50: int = 0
    p95: int = 0
    max: int = 0
    response_tokens: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Datasets:
    train: list[Example]
    validation: list[Example]
    general_held_out: list[Example]
    stats: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- reading


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
        if not found:
            raise DataError(f"{path}: no {', '.join(SUFFIXES)} files in this folder")
        return found
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.suffix.lower() not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type (use {', '.join(SUFFIXES)})")
    return [path]


def _read_file(path: Path, bad: list[tuple[str, int, str]] | None = None) -> Iterable[RawRow]:
    """The file's rows. A JSONL line that is not JSON raises, or with ``bad`` (the data check) is added to it
    as (file, row, reason)."""
    name = str(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            with path.open(encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        data = json.loads(line)
                    except (json.JSONDecodeError, RecursionError) as e:
                        why = (f"invalid JSON ({e.msg})" if isinstance(e, json.JSONDecodeError)
                               else "JSON nested too deeply to be a training row")
                        if bad is None:
                            raise DataError(f"{name} row {lineno}: {why}") from None
                        bad.append((name, lineno, f"{name} row {lineno}: {why}"))
                        continue
                    yield RawRow(name, lineno, data)
        elif suffix == ".json":
            with path.open(encoding="utf-8") as f:
                try:
                    data = json.load(f)
                except json.JSONDecodeError as e:
                    raise DataError(f"{name}: invalid JSON at line {e.lineno} ({e.msg})") from None
                except RecursionError:
                    raise DataError(f"{name}: JSON nested too deeply to hold training rows") from None
            if isinstance(data, dict) and isinstance(data.get("data"), list):
                data = data["data"]
            if not isinstance(data, list):
                raise DataError(f"{name}: expected a JSON list of rows (or {{\"data\": [...]}})")
            for i, row in enumerate(data, 1):
                yield RawRow(name, i, row)
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            for i, row in enumerate(pq.read_table(path).to_pylist(), 1):
                yield RawRow(name, i, row)
        elif suffix == ".csv":
            yield from _read_csv(path, name)
    except DataError:
        raise
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{name}: cannot read ({e})") from None


def _read_csv(path: Path, name: str) -> Iterable[RawRow]:
    """CSV rows; row numbers count data rows (the header is not a row), matching the other formats.

    Fields up to ``CSV_FIELD_LIMIT`` characters are read (Python's csv stops at 131,072 by default, and a
    long document is a fair training row); a larger field, or broken quoting, names its row.
    """
    csv.field_size_limit(CSV_FIELD_LIMIT)
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        row = 0
        while True:
            try:
                values = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                raise DataError(f"{name} row {row + 1}: {e}") from None
            row += 1
            yield RawRow(name, row, values)


def read_rows(source: DataSource | str, split: str = "train", bad: list[tuple[str, int, str]] | None = None) -> list[RawRow]:
    """All rows of a data source: local file/folder, pvc:// path, or a hub dataset id. ``bad``: as ``_read_file``."""
    src = source.source if isinstance(source, DataSource) else source
    split = source.split if isinstance(source, DataSource) else split
    if paths.is_local(src) or src.lower().endswith(SUFFIXES):  # "data/x.jsonl" is a missing file, not a hub id
        reason = paths.missing_reason(src)
        if reason is not None:
            raise DataError(reason)
        rows = [r for p in _files(paths.resolve(src)) for r in _read_file(p, bad)]
    else:
        rows = _read_hub(src, split)
    if not rows:
        raise DataError(f"{src}: no rows" + (f" that parse; {bad[0][2]}" if bad else ""))
    return rows


def _read_hub(src: str, split: str) -> list[RawRow]:
    """A hub dataset split; transient network failures are retried (hub.py), then exit 69."""
    try:
        import datasets

        ds = hub.with_retries(
            lambda: datasets.load_dataset(paths.hub_location(src, "dataset"), split=split),  # the fetched snapshot
            f"hub dataset {src}",
        )
    except TrainerError:
        raise
    except Exception as e:  # noqa: BLE001 - any other failure to fetch is a data error with its reason
        raise DataError(f"{src}: cannot load hub dataset split {split!r} ({type(e).__name__}: {e})") from None
    return [RawRow(f"{src}[{split}]", i, dict(row)) for i, row in enumerate(ds, 1)]


# ---------------------------------------------------------------- formats


def detect_format(row: RawRow) -> DataFormat:
    d = row.data
    if not isinstance(d, dict):
        raise DataError(f"{row.where()}: a row must be an object, got {type(d).__name__}")
    if "messages" in d:
        return DataFormat.messages
    if "instruction" in d:
        return DataFormat.instruction
    if "prompt" in d and "completion" in d:
        return DataFormat.prompt_completion
    if "text" in d:
        return DataFormat.text
    raise DataError(
        f"{row.where()}: cannot tell the row format from its fields {sorted(d)[:8]}; expected instruction/output, "
        "prompt/completion, messages or text (or set dataset.format)"
    )


def _text(row: RawRow, key: str, *, required: bool = True, allow_empty: bool = False) -> str:
    if not isinstance(row.data, dict):
        raise DataError(f"{row.where()}: a row must be an object, got {type(row.data).__name__}")
    value = row.data.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        if required:
            raise DataError(f"{row.where()}: missing field {key!r}")
        return ""
    if not isinstance(value, str):
        raise DataError(f"{row.where()}: field {key!r} must be a string, got {type(value).__name__}")
    if required and not allow_empty and not value.strip():
        raise DataError(f"{row.where()}: field {key!r} is empty")
    return value


# A segment is (text, trained). Prompt text is not trained, response text is.
Segments = list[tuple[str, bool]]

FALLBACK_CHAT_DOC = (
    "Without a tokenizer chat template, messages are rendered as '<|role|>\\ncontent\\n' per message; "
    "assistant contents (plus EOS) are trained."
)


PLACEHOLDER = re.compile(r"\{(instruction|input)\}")


def fill_template(template: str, **values: str) -> str:
    """The template's ``{instruction}`` and ``{input}`` replaced in one pass: braces in a row's own text (a
    literal ``{input}``, ``{}``) are never rewritten, as chained ``replace`` or ``str.format`` would."""
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def row_segments(row: RawRow, fmt: DataFormat, spec: DatasetSpec, tokenizer) -> Segments:
    """The row as prompt/response text segments, validated."""
    if fmt == DataFormat.instruction:
        instruction = _text(row, "instruction")
        inp = _text(row, "input", required=False)
        output = _text(row, "output")
        template = spec.prompt_template_with_input if inp.strip() else spec.prompt_template
        return [(fill_template(template, instruction=instruction, input=inp), False), (output, True)]
    if fmt == DataFormat.prompt_completion:
        return [(_text(row, "prompt", allow_empty=True), False), (_text(row, "completion"), True)]
    if fmt == DataFormat.text:
        return [("", False), (_text(row, "text"), True)]
    if fmt == DataFormat.messages:
        return _chat_segments(row, tokenizer)
    raise DataError(f"{row.where()}: unknown format {fmt}")


def _check_messages(row: RawRow) -> list[dict[str, str]]:
    msgs = row.data.get("messages") if isinstance(row.data, dict) else None
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{row.where()}: 'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(msgs, 1):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(
                f"{row.where()}: message {i} must be {{'role': one of {list(ROLES)}, 'content': string}}"
            )
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in out):
        raise DataError(f"{row.where()}: no non-empty assistant message to train on")
    return out


def _chat_segments(row: RawRow, tokenizer) -> Segments:
    msgs = _check_messages(row)
    if getattr(tokenizer, "chat_template", None):
        from jinja2.exceptions import TemplateError

        try:
            segs = _templated_segments(msgs, tokenizer)
        except TemplateError as e:  # e.g. raise_exception('Conversation roles must alternate ...')
            raise DataError(f"{row.where()}: the tokenizer's chat template rejects these messages: {e}") from None
        if segs is not None:
            return segs
    segs: Segments = []
    for m in msgs:
        if m["role"] == "assistant":
            segs += [(f"<|assistant|>\n", False), (m["content"], True), ("\n", False)]
        else:
            segs.append((f"<|{m['role']}|>\n{m['content']}\n", False))
    return segs


def _templated_segments(msgs: list[dict[str, str]], tokenizer) -> Segments | None:
    """Split the template's rendering of the whole conversation into prompt and response spans.

    For assistant message i, the prompt before it is the rendering of ``msgs[:i]`` with the generation
    prompt, which must be a prefix of the whole rendering; its response runs as far as the rendering of
    ``msgs[:i + 1]`` agrees with the whole (so a template that closes the conversation with EOS only at
    the very end, as Phi-3's does, still splits). Returns None when the template does not render
    conversations this way; the caller then uses the documented fallback.
    """
    full = tokenizer.apply_chat_template(msgs, tokenize=False)
    segs: Segments = []
    done = 0
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True) if i else ""
        upto = tokenizer.apply_chat_template(msgs[: i + 1], tokenize=False)
        end = _outside_special_tokens(full, _common_prefix(upto, full), tokenizer)
        if not full.startswith(before) or len(before) < done or end <= len(before):
            return None
        segs += [(full[done : len(before)], False), (full[len(before) : end], True)]
        done = end
    if full[done:]:
        segs.append((full[done:], False))
    return segs


def _outside_special_tokens(text: str, end: int, tokenizer) -> int:
    """Move ``end`` back to the start of a special token it would cut in two (``<|end|>`` vs ``<|user|>``)."""
    for token in tokenizer.get_added_vocab():
        start = text.rfind(token, 0, end + len(token) - 1)
        if start != -1 and start < end < start + len(token):
            end = start
    return end


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


# ---------------------------------------------------------------- tokenization


def ensure_pad_token(tokenizer) -> bool:
    """Give the tokenizer a pad token distinct from EOS. True if one was added (resize the embeddings)."""
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token; set one in its tokenizer_config.json")
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return False
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    return True


def _adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]


def tokenize_rows(
    rows: list[RawRow],
    fmt: DataFormat,
    spec: DatasetSpec,
    tokenizer,
    source: str,
    stats: LengthStats,
) -> list[Example]:
    """Tokenize rows segment by segment so the prompt/response boundary is exact, then apply maxSeqLength."""
    eos = tokenizer.eos_token_id
    bos = [tokenizer.bos_token_id] if _adds_bos(tokenizer) else []
    rendered = []
    for row in rows:
        row_fmt = detect_format(row) if fmt == DataFormat.auto else fmt
        rendered.append(row_segments(row, row_fmt, spec, tokenizer))
    # One batched tokenizer call over every segment (fast tokenizers are much quicker batched).
    flat = [text for segs in rendered for text, _ in segs]
    ids = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
    out: list[Example] = []
    lengths: list[int] = []
    k = 0
    for row, segs in zip(rows, rendered):
        input_ids: list[int] = []
        labels: list[int] = []
        chat_rendered = segs and segs[0][0].startswith(tokenizer.bos_token or "\0")
        if bos and not chat_rendered:
            input_ids += bos
            labels.append(IGNORE)
        for text, trained in segs:
            piece = ids[k]
            k += 1
            input_ids += piece
            labels += piece if trained else [IGNORE] * len(piece)
        # EOS closes the row and is trained: the model must learn to stop. A template that ends the row with
        # EOS plus a newline (ChatML) keeps its EOS as the end: the whitespace after it is dropped.
        _drop_whitespace_after_eos(input_ids, labels, eos, tokenizer)
        if not input_ids or input_ids[-1] != eos:
            input_ids.append(eos)
            labels.append(eos)
        else:
            labels[-1] = eos
        labels[0] = IGNORE  # nothing predicts the first token (keeps packed rows isolated)
        lengths.append(len(input_ids))
        if len(input_ids) > spec.max_seq_length:
            if spec.overlong == Overlong.drop:
                stats.dropped += 1
                continue
            input_ids, labels = input_ids[: spec.max_seq_length], labels[: spec.max_seq_length]
            stats.truncated += 1
        ex = Example(input_ids, labels, source)
        if ex.trained_tokens == 0:
            stats.dropped += 1  # the prompt alone fills maxSeqLength: nothing left to learn from
            continue
        stats.response_tokens += ex.trained_tokens
        out.append(ex)
    if lengths:
        s = sorted(lengths)
        stats.rows += len(rows)
        stats.min, stats.max = s[0], s[-1]
        stats.mean = round(statistics.fmean(s), 1)
        stats.p50 = s[len(s) // 2]
        stats.p95 = s[min(len(s) - 1, int(0.95 * len(s)))]
    return out


def _drop_whitespace_after_eos(input_ids: list[int], labels: list[int], eos: int, tokenizer, tail: int = 3) -> None:
    """Cut up to ``tail`` whitespace-only tokens that follow a final EOS (in place)."""
    if not input_ids or input_ids[-1] == eos:
        return
    for k in range(1, min(tail, len(input_ids) - 1) + 1):
        if input_ids[-k - 1] == eos:
            if not tokenizer.decode(input_ids[-k:]).strip():
                del input_ids[-k:], labels[-k:]
            return


def _format_for(rows: list[RawRow], requested: DataFormat) -> DataFormat:
    return detect_format(rows[0]) if requested == DataFormat.auto else requested


# ---------------------------------------------------------------- building the run's datasets


def general_rows_needed(task_rows: int, mix_ratio: float) -> int:
    """General rows so that they make up ``mix_ratio`` of the mixed training set."""
    if mix_ratio <= 0:
        return 0
    return round(task_rows * mix_ratio / (1.0 - mix_ratio))


def split_validation(rows: list[RawRow], split: float, rng: random.Random) -> tuple[list[RawRow], list[RawRow]]:
    """(train, validation): a ``split`` share of the rows, at least one, drawn with ``rng``; order kept."""
    order = list(range(len(rows)))
    rng.shuffle(order)
    n_val = 0 if split <= 0 else max(1, round(len(rows) * split)) if len(rows) > 1 else 0
    return [rows[i] for i in sorted(order[n_val:])], [rows[i] for i in sorted(order[:n_val])]


def build(spec: DatasetSpec, tokenizer, seed: int) -> Datasets:
    """Training, validation and held-out general examples, plus the statistics the run reports."""
    rng = random.Random(seed)
    train_rows = read_rows(spec.train)
    fmt = _format_for(train_rows, spec.format)
    if spec.validation is not None:
        val_rows = read_rows(spec.validation)
    else:
        train_rows, val_rows = split_validation(train_rows, spec.effective_validation_split, rng)

    train_stats, val_stats = LengthStats(), LengthStats()
    train = tokenize_rows(train_rows, fmt, spec, tokenizer, "task", train_stats)
    validation = tokenize_rows(val_rows, fmt, spec, tokenizer, "task", val_stats) if val_rows else []
    if not train:
        raise DataError(f"{spec.train.source}: every row was dropped (longer than maxSeqLength {spec.max_seq_length})")

    held_out: list[Example] = []
    stats: dict[str, Any] = {"format": fmt.value if hasattr(fmt, "value") else str(fmt)}
    if spec.general is not None:
        held_out, mixed, gstats = _general(spec.general, spec, tokenizer, len(train), seed)
        train += mixed
        stats["general"] = gstats
    n_general = sum(1 for e in train if e.source == "general")
    stats.update(
        train=train_stats.as_dict(),
        validation=val_stats.as_dict(),
        trainRows=len(train),
        validationRows=len(validation),
        generalRows=n_general,
        generalFraction=round(n_general / len(train), 4),
    )
    return Datasets(train, validation, held_out, stats)


def _general(
    g: GeneralData, spec: DatasetSpec, tokenizer, task_rows: int, seed: int
) -> tuple[list[Example], list[Example], dict[str, Any]]:
    rows = read_rows(g)
    fmt = detect_format(rows[0])
    rng = random.Random(seed + 1)
    rng.shuffle(rows)
    n_held = min(g.held_out_rows, len(rows) // 2)
    held_rows, pool_rows = rows[:n_held], rows[n_held:]
    gstats, hstats = LengthStats(), LengthStats()
    pool = tokenize_rows(pool_rows, fmt, spec, tokenizer, "general", gstats)
    held = tokenize_rows(held_rows, fmt, spec, tokenizer, "general", hstats)
    need = general_rows_needed(task_rows, g.mix_ratio)
    if need and not pool:
        raise DataError(f"{g.source}: no usable general rows left after holding out {n_held}")
    mixed: list[Example] = []
    while len(mixed) < need:  # repeat the pool (reshuffled) when it is smaller than the share asked for
        take = pool[:]
        rng.shuffle(take)
        mixed += take[: need - len(mixed)]
    return held, mixed, {"rows": len(rows), "heldOut": len(held), "mixedIn": len(mixed), "lengths": gstats.as_dict()}
