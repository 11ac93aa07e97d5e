#!/usr/bin/env python
"""Peak memory at a real vocabulary: the trainer with its fused LM-head loss against the unfused one (issue #20).

A narrow model (Qwen2 layout: 2 layers, width 256, tied embeddings) with Qwen's 151,936-token vocabulary,
built offline (random weights; the tokenizer is the architecture matrix's small ChatML one: the ids it makes
are a corner of the big vocabulary, which changes nothing in what the LM head computes). Prompt/completion
rows of ~1,900 tokens, ~70% of them completion (trained), batch 2, maxSeqLength 2,048, fp32, a few steps.
Each contender is the whole trainer (``python -m sft_trainer --config``) in its own process, one after the
other; peak RSS is that process's own (``wait4``), the wall-clock is the process's, start to exit.

    python bench/wide_vocab_memory.py                 # fused and unfused, 4 steps, ~3-4 min on 2 cores
    python bench/wide_vocab_memory.py --steps 2 --rows-tokens 1000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "trainer_image"), str(ROOT / "operator")]

VOCAB = 151_936
CONTENDERS = {"fused": {"SFT_FUSED_LOSS": "1"}, "unfused": {"SFT_FUSED_LOSS": "0"}}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--rows-tokens", type=int, default=1900, help="tokens per row")
    p.add_argument("--response", type=float, default=0.7, help="fraction of each row that is completion")
    p.add_argument("--only", nargs="*", choices=list(CONTENDERS), default=list(CONTENDERS),
                   help="which, in this order (wall-clock is only fair on a quiet machine: swap the order to check)")
    return p.parse_args(argv)


def build_model(out: Path):
    """The wide-vocabulary model and its tokenizer in ``out``."""
    import torch
    import transformers

    from sft_trainer import architectures

    family = architectures.FAMILIES["qwen2"]
    tok = architectures.tokenizer_for(family)
    ids = {f"{k}_token_id": tok.convert_tokens_to_ids(v) if v else None for k, v in family.specials.items()}
    config = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                                      tie_word_embeddings=True, **ids)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return tok


def text_of(tok, rng: random.Random, n_tokens: int) -> str:
    """Words from the tiny assets' generator until the text is ``n_tokens`` tokens long."""
    from sft_trainer.tiny import general_row

    words: list[str] = []
    while len(tok(" ".join(words), add_special_tokens=False)["input_ids"]) < n_tokens:
        words += general_row(rng)["text"].split()
    while len(tok(" ".join(words), add_special_tokens=False)["input_ids"]) > n_tokens:
        words.pop()
    return " ".join(words)


def write_rows(tok, path: Path, rows: int, row_tokens: int, response: float) -> None:
    rng = random.Random(0)
    with path.open("w") as f:
        for _ in range(rows):
            completion = int(row_tokens * response)
            f.write(json.dumps({"prompt": text_of(tok, rng, row_tokens - completion - 8),
                                "completion": text_of(tok, rng, completion)}) + "\n")


def run(name: str, config: Path, work: Path) -> dict:
    env = {**os.environ, **CONTENDERS[name], "PYTHONPATH": os.pathsep.join(sys.path[:2]), "HF_HUB_OFFLINE": "1",
           "SFT_RUN_ID": f"wide-{name}"}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "sft_trainer", "--config", str(config)], env=env,
                            stdout=subprocess.DEVNULL, stderr=(work / f"{name}.log").open("w"))
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed (exit {proc.returncode}):\n{(work / f'{name}.log').read_text()[-3000:]}")
    metrics = json.loads((work / name / "metrics.json").read_text())
    return {"peak_rss_mib": usage.ru_maxrss / 1024, "wall_s": seconds, "cpu_s": usage.ru_utime + usage.ru_stime,
            "train_s": metrics["trainSeconds"],
            "train_loss": metrics["trainLoss"], "tokens": metrics["trainedTokens"]}


def main(argv=None) -> int:
    args = parse(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    from sft_trainer import memory

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tok = build_model(work / "model")
        write_rows(tok, work / "train.jsonl", args.steps * args.batch, args.rows_tokens, args.response)
        results = {}
        for name in args.only:
            spec = {
                "model": {"source": str(work / "model")},
                "dataset": {"train": {"source": str(work / "train.jsonl")}, "validationSplit": 0,
                            "maxSeqLength": args.seq, "format": "prompt-completion"},
                "hyperparameters": {"learningRate": 1e-4, "numEpochs": 1, "maxSteps": args.steps,
                                    "perDeviceBatchSize": args.batch, "gradientAccumulationSteps": 1,
                                    "precision": "fp32", "seed": 1},
                "evaluation": {"strategy": "no"},
                "checkpointing": {"strategy": "steps", "steps": 10 * args.steps},
                "output": {"destination": str(work / name)},
            }
            config = work / f"{name}.json"
            config.write_text(json.dumps(spec))
            results[name] = run(name, config, work)
        shapes = memory.Shapes.from_config(json.loads((work / "model" / "config.json").read_text()), "bench")
        est = memory.estimate(shapes, memory.Setup(batch=args.batch, seq=args.seq, precision="fp32"))
        unfused_est = memory.estimate(shapes.__class__(**{**shapes.__dict__, "model_type": "unfused"}),
                                      memory.Setup(batch=args.batch, seq=args.seq, precision="fp32"))

    print(f"Qwen2 layout, 2 layers, width 256, tied, vocab {VOCAB:,}; {args.steps * args.batch} rows of "
          f"~{args.rows_tokens} tokens ({args.response:.0%} completion), batch {args.batch}, maxSeqLength {args.seq}, "
          f"{args.steps} steps, fp32, CPU ({os.cpu_count()} cores)")
    print(f"{'':<10} {'peak RSS MiB':>12} {'process s':>10} {'CPU s':>7} {'train s':>8} {'train loss':>11} {'trained tokens':>15}")
    for name, r in results.items():
        print(f"{name:<10} {r['peak_rss_mib']:>12,.0f} {r['wall_s']:>10.1f} {r['cpu_s']:>7.1f} {r['train_s']:>8.1f} "
              f"{r['train_loss']:>11.5f} {r['tokens']:>15,}")
    if len(results) == 2:
        f, u = results["fused"], results["unfused"]
        print(f"fused / unfused: peak RSS {f['peak_rss_mib'] / u['peak_rss_mib']:.2f}x, process wall-clock "
              f"{f['wall_s'] / u['wall_s']:.2f}x, CPU time {f['cpu_s'] / u['cpu_s']:.2f}x, train time {f['train_s'] / u['train_s']:.2f}x; "
              f"train loss difference {f['train_loss'] - u['train_loss']:+.2e}")
    print(f"memory estimate (less its {memory.gib(memory.OVERHEAD_FIXED)} fixed GPU overhead): fused "
          f"{(est.total - memory.OVERHEAD_FIXED) / 2**20:,.0f} MiB (logits {est.logits / 2**20:,.0f}); the old, unfused term "
          f"{(unfused_est.total - memory.OVERHEAD_FIXED) / 2**20:,.0f} MiB (logits {unfused_est.logits / 2**20:,.0f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
