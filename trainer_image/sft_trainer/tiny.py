"""Tiny example assets, generated offline and deterministically: ``python -m sft_trainer.tiny [OUT_DIR]``.

Writes (default ``~/.cache/sft-operator/tiny``):

- ``model/``: a 4-layer Llama-style model (hidden 128, ~1M parameters) with random weights and a byte-level
  BPE tokenizer trained with ``tokenizers`` on the generated text (1024 tokens; ``<s>`` BOS, ``</s>`` EOS,
  a distinct ``<|pad|>``, role tokens and a small chat template);
- ``data/train.jsonl``: 800 instruction rows (arithmetic, word reversal, list reversal, counting) whose
  response-token loss falls within a minute or two on a CPU;
- ``data/chat.jsonl``: the same tasks as chat ``messages`` rows;
- ``data/general.jsonl``: 600 plain ``text`` rows of simple English, the general data mixed in against
  forgetting;
- ``data/long_tail.jsonl``: 2000 rows whose lengths are long-tailed (median ~37 tokens, a tail past 250),
  for the throughput benchmark.

Same inputs, same bytes: every generator is seeded, and ``.complete`` marks a finished folder.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
from pathlib import Path

from .outputs import readable_by_all

DEFAULT_DIR = Path("~/.cache/sft-operator/tiny")
VERSION = "1"

WORDS = (
    "apple river stone cloud tiger green orange planet music garden silver window summer winter yellow "
    "forest candle pencil rabbit bottle castle dragon island jacket kitten ladder mirror needle ocean pepper "
    "rocket sugar tomato violin wagon zebra anchor basket cactus dolphin engine feather guitar hammer igloo "
    "jungle koala lemon magnet napkin oyster parrot quilt ribbon saddle tunnel umbrella valley walnut yacht "
    "blue red black white quick slow bright dark happy calm brave gentle small large warm cold"
).split()
NOUNS = "cat dog bird child farmer teacher river city train ship tree house road market book letter".split()
VERBS = "sees finds likes follows paints builds carries watches opens reads".split()
ADJS = "old young small large quiet busy green red happy tired".split()
CHAT_TEMPLATE = (
    # Newlines as {{ '\n' }}: transformers renders templates with trim_blocks, which eats a newline after a tag.
    "{% for m in messages %}{% if loop.first %}{{ bos_token }}{% else %}{{ '\\n' }}{% endif %}"
    "<|{{ m['role'] }}|>{{ '\\n' }}{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{% if messages %}{{ '\\n' }}{% endif %}<|assistant|>{{ '\\n' }}{% endif %}"
)


def task_row(rng: random.Random, long_tail: bool = False) -> dict[str, str]:
    """One instruction row from a few small learnable tasks."""
    if long_tail:
        # Lognormal list lengths: median ~6 words, a long tail up to ~120 words (~500 tokens).
        n = max(1, min(120, int(math.exp(rng.gauss(1.8, 0.9)))))
        items = [rng.choice(WORDS) for _ in range(n)]
        return {"instruction": "Repeat the list backwards.", "input": " ".join(items), "output": " ".join(reversed(items))}
    kind = rng.randrange(5)
    if kind == 0:
        a, b = rng.randrange(100), rng.randrange(100)
        return {"instruction": f"What is {a} plus {b}?", "output": str(a + b)}
    if kind == 1:
        w = rng.choice(WORDS)
        return {"instruction": "Reverse the word.", "input": w, "output": w[::-1]}
    if kind == 2:
        items = [rng.choice(WORDS) for _ in range(rng.randint(2, 5))]
        return {"instruction": "Repeat the list backwards.", "input": " ".join(items), "output": " ".join(reversed(items))}
    if kind == 3:
        items = [rng.choice(WORDS) for _ in range(rng.randint(1, 9))]
        return {"instruction": "How many words are there?", "input": " ".join(items), "output": str(len(items))}
    w = rng.choice(WORDS)
    return {"instruction": f"Spell {w} in capitals.", "output": w.upper()}


def general_row(rng: random.Random) -> dict[str, str]:
    sentences = []
    for _ in range(rng.randint(1, 4)):
        sentences.append(
            f"The {rng.choice(ADJS)} {rng.choice(NOUNS)} {rng.choice(VERBS)} the {rng.choice(ADJS)} {rng.choice(NOUNS)}."
        )
    return {"text": " ".join(sentences)}


def as_chat(row: dict[str, str]) -> dict[str, list[dict[str, str]]]:
    user = row["instruction"] + (f"\n{row['input']}" if row.get("input") else "")
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")


def _train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "</s>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<|pad|>",
        additional_special_tokens=specials[3:],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def generate(out: Path, *, train_rows: int = 800, general_rows: int = 600, long_rows: int = 2000) -> Path:
    """Write the assets into ``out`` (replacing a half-written folder). Returns ``out``."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    out = out.expanduser()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "data").mkdir(parents=True)
    rng = random.Random(1234)
    train = [task_row(rng) for _ in range(train_rows)]
    general = [general_row(rng) for _ in range(general_rows)]
    long_tail = [task_row(rng, long_tail=True) for _ in range(long_rows)]
    _write_jsonl(tmp / "data" / "train.jsonl", train)
    _write_jsonl(tmp / "data" / "chat.jsonl", [as_chat(r) for r in train[:200]])
    _write_jsonl(tmp / "data" / "general.jsonl", general)
    _write_jsonl(tmp / "data" / "long_tail.jsonl", long_tail)

    texts = [" ".join(r.values()) for r in train + long_tail[:500]] + [r["text"] for r in general]
    texts += [f"### Instruction:\n{r['instruction']}\n\n### Input:\n{r.get('input', '')}\n\n### Response:\n" for r in train[:50]]
    tokenizer = _train_tokenizer(texts, vocab_size=1024)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(tmp / "model")
    tokenizer.save_pretrained(tmp / "model")
    (tmp / ".complete").write_text(VERSION + "\n")
    readable_by_all(tmp)  # a trainer pod (another user) reads them from a volume
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)
    return out


def is_complete(out: Path) -> bool:
    marker = out.expanduser() / ".complete"
    return marker.exists() and marker.read_text().strip() == VERSION


def ensure(out: Path = DEFAULT_DIR) -> Path:
    """Generate the assets unless a complete copy is already there."""
    return out.expanduser() if is_complete(out) else generate(out)


def main(argv: list[str] | None = None) -> int:
    """Generate the tiny example assets (``sftctl example-assets`` calls this). Returns an exit status."""
    p = argparse.ArgumentParser(prog="python -m sft_trainer.tiny", description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", nargs="?", default=str(DEFAULT_DIR), help=f"where to write (default {DEFAULT_DIR})")
    p.add_argument("--force", action="store_true", help="regenerate even if the folder is complete")
    args = p.parse_args(argv)
    out = Path(args.out_dir).expanduser()
    if is_complete(out) and not args.force:
        print(f"tiny assets already in {out} (use --force to regenerate)")
        return 0
    generate(out)
    print(f"wrote tiny model, tokenizer and datasets to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
