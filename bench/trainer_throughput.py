#!/usr/bin/env python
"""Trainer throughput benchmark: our trainer against the classic recipe and TRL's SFTTrainer.

Every contender trains the same model (``--model``: the tiny Llama-style model of ``sft_trainer.tiny``,
a larger tied one, or a ~0.5B config for GPUs) on the same generated long-tailed instruction data
(median ~37 tokens, a tail past 250) with the same hyperparameters (learning rate, epochs, batch,
accumulation, warmup, scheduler, weight decay, clipping, seed), each in its own subprocess so that peak
RSS is measured fairly. Engine settings stay at each contender's own defaults, as a user gets them:
CPU threads (torch's default, every core, for TRL and classic; ours: the available cores per process)
unless ``--threads`` sets them all; precision and gradient checkpointing (TRL's SFTConfig turns both
bf16 autocast and gradient checkpointing on; transformers' Trainer neither; ours: bf16 on GPUs that
have it, else fp32, and no checkpointing) unless ``--precision`` / ``--gradient-checkpointing`` set
them for all:

  classic   transformers Trainer, every row padded to 512, pad = eos, labels = input_ids
  trl       TRL SFTTrainer, its defaults otherwise (prompt/completion rows: completion-only loss,
            dynamic padding, random batches, no packing, no padding-free)
  ours      sft_trainer defaults (random batches cut into similar-length sub-batches, response-only logits)
  packed    sft_trainer with dataset.packing (padding-free rows, position ids reset)

Reported: trained (non-padding) tokens per second of wall-clock time — the same token count (the
dataset's real tokens x epochs) divided by each contender's training time — and its ratio to classic
and to TRL; the whole process's wall-clock time (start, data, model load, training, saving: what a user
waits for); CPU seconds beside them; peak RSS; and the response-token eval loss of each trained model on
the same held-out rows (computed by the parent). Wall-clock ratios are only fair on a quiet machine with
one contender at a time (``--jobs 1``, the default); CPU seconds stay fair under other load.
With several seeds (data order; the initial weights are the same), it also prints the mean and spread
over seeds: at a high learning rate one run's eval loss moves by ~0.1 with the batch order alone, so a
single seed cannot tell two trainers apart.

    python bench/trainer_throughput.py                           # all four, seed 42, ~3-5 min on 2 cores
    python bench/trainer_throughput.py --model small-tied        # hidden 256, vocab 2048, tied (3.7M)
    python bench/trainer_throughput.py --rows 800                # quicker
    python bench/trainer_throughput.py --seeds 1 2 3 4 5 --epochs 3 --only trl ours packed --jobs 2

On a GPU (one short run; MFU = 6 x non-embedding parameters x trained tokens / time / peak FLOPs):

    python bench/trainer_throughput.py --device cuda --precision bf16 --model 0.5b --lr 1e-4 --batch 64 \
        --only trl ours packed
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "trainer_image"), str(ROOT / "contract"), str(ROOT / "operator")]
CONTENDERS = ("classic", "trl", "ours", "packed")
SEQ = 512


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/sft-bench", help="assets, runs and results (default /tmp/sft-bench)")
    p.add_argument("--rows", type=int, default=1800, help="training rows from the long-tailed set (default 1800)")
    p.add_argument("--data", choices=("long-tail", "spread"), default="long-tail",
                   help="long-tail (the tiny assets' set: median ~37 tokens, a tail past 250; default) or spread "
                        "(list lengths uniform over 1-120 words: rows of 51-289 tokens, median 163, with small-tied's tokenizer)")
    p.add_argument("--eval-rows", type=int, default=200, help="held-out rows for the eval loss (default 200)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--accumulation", type=int, default=1)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seeds", "--seed", type=int, nargs="+", default=[42],
                   help="seeds to run every contender with (data order, dropout); default 42")
    p.add_argument("--jobs", type=int, default=1,
                   help="contender runs at a time (default 1); CPU-second ratios stay fair, wall-clock ones do not")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for every contender (default: each contender's own default)")
    p.add_argument("--only", nargs="*", choices=CONTENDERS, default=list(CONTENDERS))
    p.add_argument("--model", choices=("tiny", "small-tied", "0.5b"), default="tiny",
                   help="tiny (~1M parameters, vocab 1024, untied; default), small-tied (4 layers, hidden 256, "
                        "vocab 2048, tied embeddings, 3.7M parameters, its own tokenizer) or 0.5b (a 24-layer, "
                        "hidden-1024 Llama config with random weights, ~0.48B parameters, the tiny tokenizer)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where every contender trains (default cpu; cpu hides the GPUs from all of them)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                   help="fp32, or bf16 autocast over fp32 weights, for every contender (default: each "
                        "contender's own: TRL bf16, classic fp32, ours bf16 on a GPU that has it, else fp32)")
    p.add_argument("--gradient-checkpointing", choices=("on", "off"), default=None,
                   help="for every contender (default: each contender's own: TRL on, classic and ours off)")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="the device's dense bf16 peak for MFU with --device cuda (default 989: H100/H200 SXM)")
    p.add_argument("--contender", choices=CONTENDERS, help=argparse.SUPPRESS)  # the child's role
    args = p.parse_args(argv)
    args.seed = args.seeds[0]  # a child runs one seed
    return args


HP = dict(warmup_ratio=0.05, weight_decay=0.0, max_grad_norm=1.0, scheduler="cosine")


def model_path(args) -> Path:
    """The model every contender starts from (weights and tokenizer)."""
    work = Path(args.workdir)
    return {"tiny": work / "tiny" / "model", "small-tied": work / "model-small-tied", "0.5b": work / "model-0.5b"}[args.model]


def ensure_model(args) -> Path:
    """The --model small-tied / 0.5b weights: random, seeded, written once next to the tiny assets."""
    path = model_path(args)
    if args.model == "tiny" or (path / "config.json").exists():
        return path
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    assets = Path(args.workdir) / "tiny"
    if args.model == "small-tied":
        from sft_trainer import tiny

        # Its own 2048-token tokenizer, trained on the same generated text as the tiny one.
        rows = [json.loads(line) for name in ("train.jsonl", "general.jsonl")
                for line in (assets / "data" / name).read_text().splitlines()]
        long_tail = [json.loads(line) for line in (assets / "data" / "long_tail.jsonl").read_text().splitlines()[:500]]
        tok = tiny._train_tokenizer([" ".join(r.values()) for r in rows + long_tail], vocab_size=2048)
        shape = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                     num_key_value_heads=4, tie_word_embeddings=True)
    else:
        tok = AutoTokenizer.from_pretrained(assets / "model")
        shape = dict(hidden_size=1024, intermediate_size=5504, num_hidden_layers=24, num_attention_heads=16,
                     num_key_value_heads=8, tie_word_embeddings=False)
    config = LlamaConfig(vocab_size=len(tok), max_position_embeddings=2048, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **shape)
    torch.manual_seed(0)
    tmp = path.with_name(path.name + ".tmp")
    LlamaForCausalLM(config).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(path)
    return path


def non_embedding_parameters(path: Path) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    return sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)


def prompt_of(row: dict) -> str:
    from sft_contract.spec import DEFAULT_PROMPT_TEMPLATE, DEFAULT_PROMPT_TEMPLATE_WITH_INPUT

    if row.get("input"):
        return DEFAULT_PROMPT_TEMPLATE_WITH_INPUT.replace("{instruction}", row["instruction"]).replace("{input}", row["input"])
    return DEFAULT_PROMPT_TEMPLATE.replace("{instruction}", row["instruction"])


def spread_rows(n: int) -> list[dict]:
    """``--data spread``: the long-tailed set's list-reversal task with list lengths drawn uniformly from 1 to
    120 words, so row lengths spread evenly (a random batch mixes short and long rows)."""
    import random

    from sft_trainer.tiny import WORDS

    rng = random.Random(7)
    rows = []
    for _ in range(n):
        items = [rng.choice(WORDS) for _ in range(rng.randint(1, 120))]
        rows.append({"instruction": "Repeat the list backwards.", "input": " ".join(items),
                     "output": " ".join(reversed(items))})
    return rows


def split_rows(args, assets: Path) -> tuple[list[dict], list[dict]]:
    if args.data == "spread":
        rows = spread_rows(2000)
    else:
        rows = [json.loads(line) for line in (assets / "data" / "long_tail.jsonl").read_text().splitlines()]
    return rows[: args.rows], rows[len(rows) - args.eval_rows :]


# ---------------------------------------------------------------- contenders (run in a child process)


def hf_args(args, out: Path, **extra):
    common = dict(
        output_dir=str(out), learning_rate=args.lr, num_train_epochs=args.epochs, per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=args.accumulation, warmup_steps=HP["warmup_ratio"], weight_decay=HP["weight_decay"],
        max_grad_norm=HP["max_grad_norm"], seed=args.seed, lr_scheduler_type=HP["scheduler"],
        use_cpu=args.device == "cpu",
        save_strategy="no", eval_strategy="no", report_to=[], logging_steps=50, disable_tqdm=True,
    )
    # Engine settings only when forced: otherwise each trainer's config class keeps its own default.
    if args.precision:
        common["bf16"] = args.precision == "bf16"
    if args.gradient_checkpointing:
        common["gradient_checkpointing"] = args.gradient_checkpointing == "on"
    common.update(extra)
    return common


def train_and_save(trainer, tok, out: Path) -> tuple[float, float]:
    """Train an HF/TRL trainer; (wall, CPU) seconds of the training call; the model lands in out/model."""
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.train()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    trainer.save_model(str(out / "model"))
    tok.save_pretrained(out / "model")
    return seconds, cpu


def run_classic(args, assets: Path, out: Path) -> tuple[float, float]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, default_data_collator

    tok = AutoTokenizer.from_pretrained(model_path(args))
    tok.pad_token = tok.eos_token  # the classic recipe
    train, _ = split_rows(args, assets)
    texts = [prompt_of(r) + r["output"] + tok.eos_token for r in train]
    enc = tok(texts, padding="max_length", max_length=SEQ, truncation=True)
    ds = Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                            "labels": [list(x) for x in enc["input_ids"]]})  # labels = input_ids, padding included
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(model_path(args), dtype=torch.float32)
    trainer = Trainer(model=model, args=TrainingArguments(**hf_args(args, out)), train_dataset=ds,
                      data_collator=default_data_collator)
    return train_and_save(trainer, tok, out)


def run_trl(args, assets: Path, out: Path) -> tuple[float, float]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(model_path(args))
    train, _ = split_rows(args, assets)
    ds = Dataset.from_list([{"prompt": prompt_of(r), "completion": r["output"]} for r in train])
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(model_path(args), dtype=torch.float32)
    cfg = SFTConfig(**hf_args(args, out, max_length=SEQ))
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok)
    return train_and_save(trainer, tok, out)


def run_ours(args, assets: Path, out: Path, packing: bool) -> tuple[float, float]:
    from sft_trainer import train
    from sft_contract.spec import TrainingSpec

    train_rows, _ = split_rows(args, assets)
    data_file = out / "train.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in train_rows))
    spec = TrainingSpec.model_validate({
        "model": {"source": str(model_path(args))},
        "dataset": {"train": {"source": str(data_file)}, "validationSplit": 0, "maxSeqLength": SEQ, "packing": packing},
        "hyperparameters": {"learningRate": args.lr, "numEpochs": args.epochs, "perDeviceBatchSize": args.batch,
                            "gradientAccumulationSteps": args.accumulation, "warmupRatio": HP["warmup_ratio"],
                            "weightDecay": HP["weight_decay"], "maxGradNorm": HP["max_grad_norm"], "seed": args.seed,
                            "lrScheduler": HP["scheduler"], "precision": args.precision or "auto",
                            "gradientCheckpointing": args.gradient_checkpointing == "on"},
        "evaluation": {"strategy": "no"},
        "output": {"destination": str(out)},
    })
    metrics = train.run(spec, stdout=None)
    return metrics["trainSeconds"], metrics["trainCpuSeconds"]


def child(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    assets = Path(args.workdir) / "tiny"
    out = run_dir(Path(args.workdir), args.contender, args.seed)
    out.mkdir(parents=True, exist_ok=True)
    if args.contender == "classic":
        seconds, cpu = run_classic(args, assets, out)
    elif args.contender == "trl":
        seconds, cpu = run_trl(args, assets, out)
    else:
        seconds, cpu = run_ours(args, assets, out, packing=args.contender == "packed")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    (out / "result.json").write_text(json.dumps({"trainSeconds": seconds, "trainCpuSeconds": cpu, "peakRssMb": peak_mb}))


# ---------------------------------------------------------------- the parent: run, evaluate, print


def real_tokens_and_eval_set(args, assets: Path):
    from transformers import AutoTokenizer

    from sft_trainer import data
    from sft_contract.spec import DatasetSpec

    tok = AutoTokenizer.from_pretrained(model_path(args))
    spec = DatasetSpec.model_validate({"train": {"source": "x.jsonl"}, "maxSeqLength": SEQ})
    train, held = split_rows(args, assets)
    stats = data.LengthStats()
    rows = lambda rs: [data.RawRow("long_tail.jsonl", i, r) for i, r in enumerate(rs, 1)]  # noqa: E731
    train_ex = data.tokenize_rows(rows(train), data.DataFormat.instruction, spec, tok, "task", stats)
    held_ex = data.tokenize_rows(rows(held), data.DataFormat.instruction, spec, tok, "task", data.LengthStats())
    return sum(len(e) for e in train_ex) * args.epochs, held_ex, stats


def eval_loss(model_dir: Path, held, device: str = "cpu") -> float:
    import torch
    from transformers import AutoModelForCausalLM

    from sft_trainer import collate
    from sft_trainer.train import Amp, Dist, evaluate

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    # Pad with a token id inside every contender's vocabulary; padding is masked out of the loss anyway.
    d = Dist(device=torch.device(device))
    return evaluate(model, held, d, Amp("fp32", None), lambda ex: collate.pad_batch(ex, 0), 16)


def run_dir(work: Path, name: str, seed: int) -> Path:
    return work / f"{name}-seed{seed}"


def run_contender(args, name: str, seed: int) -> tuple[dict | None, str]:
    """One contender, one seed, in its own process (fair peak RSS); returns its result or the failure."""
    out = run_dir(Path(args.workdir), name, seed)
    subprocess.run(["rm", "-rf", str(out)], check=True)
    cmd = [sys.executable, __file__, *sys.argv[1:], "--contender", name, "--seed", str(seed)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    env.pop("OMP_NUM_THREADS", None)  # each contender's own default (a test run's OMP_NUM_THREADS=1 must not leak)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # our trainer would otherwise pick a GPU up by itself
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    process_seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        return None, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    return {**json.loads((out / "result.json").read_text()), "processSeconds": process_seconds}, ""


def summarise(runs: list[dict]) -> dict:
    """Mean over seeds of one contender's runs (eval loss also its standard deviation)."""
    mean = lambda key: statistics.fmean(r[key] for r in runs)  # noqa: E731
    losses = [r["evalLoss"] for r in runs]
    return {
        "seeds": len(runs), "trainCpuSeconds": mean("trainCpuSeconds"), "trainSeconds": mean("trainSeconds"),
        "processSeconds": mean("processSeconds"),
        "tokensPerCpuSecond": mean("tokensPerCpuSecond"), "tokensPerSecond": mean("tokensPerSecond"),
        "peakRssMb": max(r["peakRssMb"] for r in runs), "evalLoss": statistics.fmean(losses),
        "evalLossStdev": statistics.stdev(losses) if len(losses) > 1 else 0.0,
        **({"mfu": statistics.fmean(r["mfu"] for r in runs)} if all("mfu" in r for r in runs) else {}),
    }


def main(argv=None) -> int:
    args = parse(argv)
    if args.contender:
        child(args)
        return 0
    from transformers.utils import logging as hf_logging

    from sft_trainer import tiny

    hf_logging.disable_progress_bar()
    work = Path(args.workdir)
    assets = tiny.ensure(work / "tiny")
    n_params = non_embedding_parameters(ensure_model(args))
    tokens, held, stats = real_tokens_and_eval_set(args, assets)
    print(f"model: {args.model}, {n_params / 1e6:.1f}M non-embedding parameters; {args.device}, precision "
          f"{args.precision or 'each default'}, gradient checkpointing {args.gradient_checkpointing or 'each default'}")
    print(f"data: {args.data}, {args.rows} rows, lengths min/p50/p95/max {stats.min}/{stats.p50}/{stats.p95}/{stats.max} tokens; "
          f"{tokens:,} real tokens over {args.epochs} epoch(s); padded to {SEQ}: {args.rows * SEQ * args.epochs:,}")
    plan = [(seed, name) for seed in args.seeds for name in args.only]
    per_seed: dict[int, dict[str, dict]] = {seed: {} for seed in args.seeds}
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {pool.submit(run_contender, args, name, seed): (seed, name) for seed, name in plan}
        for fut in concurrent.futures.as_completed(futures):
            seed, name = futures[fut]
            r, failure = fut.result()
            if r is None:
                print(f"{name} seed {seed}: failed ({failure})")
                continue
            r["tokensPerSecond"] = tokens / r["trainSeconds"]
            r["tokensPerCpuSecond"] = tokens / r["trainCpuSeconds"]
            r["evalLoss"] = eval_loss(run_dir(work, name, seed) / "model", held, args.device)
            if args.device == "cuda":
                r["mfu"] = 6 * n_params * tokens / r["trainSeconds"] / (args.peak_tflops * 1e12)
            per_seed[seed][name] = r
            print(f"{name} seed {seed}: {r['trainSeconds']:.1f} s training ({r['trainCpuSeconds']:.1f} CPU s), "
                  f"{r['processSeconds']:.1f} s whole process, {r['tokensPerSecond']:,.0f} tok/s, "
                  f"peak RSS {r['peakRssMb']:.0f} MiB, eval loss {r['evalLoss']:.4f}"
                  + (f", MFU {r['mfu']:.1%}" if "mfu" in r else ""), flush=True)
    names = [n for n in args.only if any(n in runs for runs in per_seed.values())]
    results = {n: summarise([runs[n] for runs in per_seed.values() if n in runs]) for n in names}
    seeds = len(args.seeds)
    threads = f"{args.threads} thread(s) each" if args.threads else "each contender's default threads"
    print()
    print(f"Wall-clock throughput: trained tokens / training wall seconds, {threads}, {len(os.sched_getaffinity(0))} cores here; "
          f"'process s' is the whole run a user waits for. CPU seconds beside.")
    if args.jobs > 1:
        print(f"WARNING: --jobs {args.jobs}: contenders ran side by side, so wall-clock ratios are not fair; read CPU s.")
    if seeds > 1:
        print(f"Means over {seeds} seeds; eval loss as mean ± standard deviation.")
    header = (f"{'contender':<9} {'train s':>8} {'tok/s':>8} {'vs classic':>10} {'vs TRL':>7} {'process s':>9} "
              f"{'vs TRL':>7} {'CPU s':>7} {'CPU vs TRL':>10} {'peak RSS MiB':>12} {'eval loss':>16}")
    print(header)
    print("-" * len(header))

    def ratio(name, key, base, inverse=False) -> str:
        if base not in results:
            return "n/a"
        a, b = results[name][key], results[base][key]
        return f"{b / a if inverse else a / b:.2f}x"

    for name, r in results.items():
        spread = f" ± {r['evalLossStdev']:.3f}" if seeds > 1 else ""
        print(f"{name:<9} {r['trainSeconds']:>8.1f} {r['tokensPerSecond']:>8,.0f} "
              f"{ratio(name, 'tokensPerSecond', 'classic'):>10} {ratio(name, 'tokensPerSecond', 'trl'):>7} "
              f"{r['processSeconds']:>9.1f} {ratio(name, 'processSeconds', 'trl', inverse=True):>7} "
              f"{r['trainCpuSeconds']:>7.1f} {ratio(name, 'tokensPerCpuSecond', 'trl'):>10} "
              f"{r['peakRssMb']:>12.0f} {r['evalLoss']:>9.4f}{spread:>7}")
    if args.device == "cuda":
        print("MFU: " + ", ".join(f"{n} {r['mfu']:.1%}" for n, r in results.items() if "mfu" in r)
              + f" (6 x {n_params / 1e6:.0f}M x trained tokens / wall s / {args.peak_tflops:g} TFLOPS)")
    if seeds > 1:
        print()
        print("eval loss per seed" + "".join(f" {n:>8}" for n in names))
        for seed, runs in per_seed.items():
            print(f"{'seed ' + str(seed):<18}" + "".join(f" {runs[n]['evalLoss']:>8.4f}" if n in runs else f" {'-':>8}" for n in names))
        if "trl" in results:
            for n in names:
                if n != "trl":
                    paired = [runs[n]["evalLoss"] - runs["trl"]["evalLoss"] for runs in per_seed.values() if n in runs and "trl" in runs]
                    wins = sum(x <= 0 for x in paired)
                    print(f"{n}: eval loss minus TRL's, mean {statistics.fmean(paired):+.4f} over {len(paired)} seeds; "
                          f"lower or equal in {wins}")
    (work / "results.json").write_text(json.dumps({"summary": results, "perSeed": per_seed}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
