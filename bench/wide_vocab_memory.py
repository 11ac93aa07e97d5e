#!/usr/bin/env python
"""Peak memory and speed at a real vocabulary: our trainer (fused LM-head loss), the unfused loss and TRL (issue #20).

A narrow model (Qwen2 layout: 2 layers, width 256, tied embeddings) with Qwen's 151,936-token vocabulary,
built offline (random weights; the tokenizer is the architecture matrix's small ChatML one: the ids it makes
are a corner of the big vocabulary, which changes nothing in what the LM head computes). Prompt/completion
rows that fill ~93% of the sequence (~1,900 tokens at 2,048), ~70% of them completion (trained), batch 2,
fp32 weights, a few optimizer steps (``--steps``): the peak comes in the first steps (the optimizer's states
exist after the first), so an epoch adds time, not memory. Each contender is a process of its own, one after
the other (run together, they would share the cores); its peak RSS is that process's own (``wait4``), its
wall-clock the process's, start to exit, its train time the training loop's, its CPU seconds the process's.
The parent then prints what ``sftctl validate`` estimates for ours as a CPU SFTJob, against its peak RSS.

  ours      the trainer as a pod runs it (``python -m sft_trainer --config``), its defaults (fused loss)
  unfused   the same with ``SFT_FUSED_LOSS=0`` (the full logits at response positions)
  trl       TRL's SFTTrainer (completion-only loss, its chunked fused LM head), its defaults

``--settings defaults``: each at its own engine defaults (TRL's SFTConfig: bf16 autocast and gradient
checkpointing on; ours on a CPU: fp32, no checkpointing). ``equal``: fp32, no checkpointing for every one.
The hyperparameters are the same everywhere (lr 1e-4, linear decay, no warmup, no weight decay, clip 1.0).
After training, the parent computes each model's response-token cross-entropy on the same held-out rows.

    python bench/wide_vocab_memory.py --steps 3                # ours, trl at 2,048: 15 min on 2 busy cores
    python bench/wide_vocab_memory.py --steps 3 --seqs 1024 4096 8192 --json a.json
    python bench/wide_vocab_memory.py --steps 3 --settings equal --only ours trl unfused --json b.json
    python bench/wide_vocab_memory.py --from-json a.json b.json --plot docs/img/wide-vocab-memory.png
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "trainer_image"), str(ROOT / "contract"), str(ROOT / "operator")]

VOCAB = 151_936
CONTENDERS = ("ours", "unfused", "trl")
HP = dict(lr=1e-4, max_grad_norm=1.0)  # linear decay, no warmup, no weight decay: both trainers


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4,
                   help="optimizer steps (default 4; at least 2: AdamW's states exist from the second on)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seqs", "--seq", type=int, nargs="+", default=[2048], help="maxSeqLength values (default 2048)")
    p.add_argument("--fill", type=float, default=1900 / 2048, help="row length / maxSeqLength (default ~0.93)")
    p.add_argument("--response", type=float, default=0.7, help="fraction of each row that is completion")
    p.add_argument("--eval-rows", type=int, default=4, help="held-out rows for the eval cross-entropy")
    p.add_argument("--settings", nargs="+", choices=("defaults", "equal"), default=["defaults"])
    p.add_argument("--only", nargs="*", choices=CONTENDERS, default=["ours", "trl"],
                   help="which, in this order (default ours trl)")
    p.add_argument("--memory-cap-gib", type=float,
                   help="cap each contender's address space (RLIMIT_AS) so that one that would not fit fails alone")
    p.add_argument("--plot", help="write peak RSS against sequence length to this PNG (needs matplotlib)")
    p.add_argument("--json", help="write the results to this file too")
    p.add_argument("--from-json", nargs="+", metavar="JSON",
                   help="run nothing: print and plot the results of earlier --json files together")
    p.add_argument("--workdir", help="keep the model, rows and runs here (default: a temporary directory)")
    p.add_argument("--child", help=argparse.SUPPRESS)  # a TRL run's JSON arguments (the child's role)
    return p.parse_args(argv)


# ---------------------------------------------------------------- the fixture


def build_model(out: Path):
    """The wide-vocabulary model and its tokenizer in ``out``."""
    import torch
    import transformers

    from sft_trainer import architectures

    family = architectures.FAMILIES["qwen2"]
    tok = architectures.tokenizer_for(family)
    ids = {f"{k}_token_id": tok.convert_tokens_to_ids(v) if v else None for k, v in family.specials.items()}
    config = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
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
    count = lambda: len(tok(" ".join(words), add_special_tokens=False)["input_ids"])  # noqa: E731
    while count() < n_tokens:
        words += general_row(rng)["text"].split()
    while count() > n_tokens:
        words.pop()
    return " ".join(words)


def rows_of(tok, rows: int, row_tokens: int, response: float, seed: int) -> list[dict]:
    rng = random.Random(seed)
    completion = int(row_tokens * response)
    return [{"prompt": text_of(tok, rng, row_tokens - completion - 8), "completion": text_of(tok, rng, completion)}
            for _ in range(rows)]


# ---------------------------------------------------------------- the contenders


def ours_spec(model: Path, train: Path, out: Path, seq: int, args, settings: str) -> dict:
    hp = {"learningRate": HP["lr"], "numEpochs": 1, "maxSteps": args.steps, "perDeviceBatchSize": args.batch,
          "gradientAccumulationSteps": 1, "warmupRatio": 0.0, "lrScheduler": "linear", "weightDecay": 0.0,
          "maxGradNorm": HP["max_grad_norm"], "seed": 1}
    if settings == "equal":
        hp.update(precision="fp32", gradientCheckpointing=False)
    return {
        "model": {"source": str(model)},
        "dataset": {"train": {"source": str(train)}, "validationSplit": 0, "maxSeqLength": seq, "format": "prompt-completion"},
        "hyperparameters": hp,
        "evaluation": {"strategy": "no"},
        "checkpointing": {"strategy": "steps", "steps": 10 * args.steps},
        "output": {"destination": str(out)},
    }


def trl_child(job: dict) -> None:
    """One TRL run (in its own process): train, save the model, write the train time."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    from trl import SFTConfig, SFTTrainer

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    out = Path(job["out"])
    tok = AutoTokenizer.from_pretrained(job["model"])
    rows = [json.loads(line) for line in Path(job["train"]).read_text().splitlines()]
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32)
    engine = {"bf16": False, "gradient_checkpointing": False} if job["settings"] == "equal" else {}
    cfg = SFTConfig(output_dir=str(out), max_length=job["seq"], learning_rate=HP["lr"], max_steps=job["steps"],
                    per_device_train_batch_size=job["batch"], gradient_accumulation_steps=1, warmup_steps=0,
                    lr_scheduler_type="linear", weight_decay=0.0, max_grad_norm=HP["max_grad_norm"], seed=1,
                    use_cpu=True, save_strategy="no", eval_strategy="no", report_to=[], logging_steps=1,
                    disable_tqdm=True, **engine)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok)
    t0 = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - t0
    trainer.save_model(str(out / "model"))
    tok.save_pretrained(out / "model")
    (out / "result.json").write_text(json.dumps({"trainSeconds": seconds, "trainLoss": result.training_loss}))


def run(name: str, settings: str, seq: int, work: Path, args) -> dict:
    """One contender in its own process; its peak RSS, times, train loss and the saved model's directory."""
    tag = f"{name}-{settings}-{seq}"
    out, log = work / tag, work / f"{tag}.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path[:2]), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": "", "SFT_RUN_ID": f"wide-{tag}"}
    env.pop("OMP_NUM_THREADS", None)  # each contender's own thread default
    train = work / f"train-{seq}.jsonl"
    if name == "trl":
        job = {"model": str(work / "model"), "train": str(train), "out": str(out), "seq": seq, "steps": args.steps,
               "batch": args.batch, "settings": settings}
        cmd = [sys.executable, __file__, "--child", json.dumps(job)]
    else:
        env["SFT_FUSED_LOSS"] = "0" if name == "unfused" else "1"
        config = work / f"{tag}.json"
        config.write_text(json.dumps(ours_spec(work / "model", train, out, seq, args, settings)))
        cmd = [sys.executable, "-m", "sft_trainer", "--config", str(config)]
    t0 = time.perf_counter()
    cap = int(args.memory_cap_gib * 2**30) if args.memory_cap_gib else None
    limit = (lambda: resource.setrlimit(resource.RLIMIT_AS, (cap, cap))) if cap else None
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"), preexec_fn=limit)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    r = {"name": name, "settings": settings, "seq": seq, "wall_s": seconds, "cpu_s": usage.ru_utime + usage.ru_stime,
         "peak_rss_mib": usage.ru_maxrss / 1024, "exit": code}
    if code != 0:
        r["failure"] = log.read_text()[-2000:]
        return r
    if name == "trl":
        m = json.loads((out / "result.json").read_text())
        r.update(train_s=m["trainSeconds"], train_loss=m["trainLoss"], model=str(out / "model"))
    else:
        m = json.loads((out / "metrics.json").read_text())
        r.update(train_s=m["trainSeconds"], train_loss=m["trainLoss"], model=str(out / "model"))
    return r


def eval_ce(model_dir: str, held) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    from sft_trainer import collate
    from sft_trainer.train import Amp, Dist, evaluate

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return evaluate(model, held, Dist(device=torch.device("cpu")), Amp("fp32", None),
                    lambda ex: collate.pad_batch(ex, 0), 2, shard=False)


def held_out(tok, rows: list[dict], seq: int):
    from sft_trainer import data
    from sft_contract.spec import DataFormat, DatasetSpec

    spec = DatasetSpec.model_validate({"train": {"source": "x.jsonl"}, "maxSeqLength": seq, "format": "prompt-completion"})
    raw = [data.RawRow("held.jsonl", i, r) for i, r in enumerate(rows, 1)]
    return data.tokenize_rows(raw, DataFormat.prompt_completion, spec, tok, "held", data.LengthStats())


# ---------------------------------------------------------------- report


def validate_estimate(work: Path, seq: int, batch: int) -> tuple[float, str]:
    """What ``sftctl validate`` estimates for this run as a CPU SFTJob (gpusPerNode 0): (MiB, its line). The MiB
    come from the same estimate in this process (validate prints 0.1 GiB steps)."""
    import yaml

    from sft_contract import memory

    job = {"apiVersion": "sft.dev/v1alpha1", "kind": "SFTJob", "metadata": {"name": f"wide-{seq}"}, "spec": {
        "model": {"source": "pvc://bench/model"},
        "dataset": {"train": {"source": f"pvc://bench/train-{seq}.jsonl"}, "validationSplit": 0, "maxSeqLength": seq,
                    "format": "prompt-completion"},
        "hyperparameters": {"perDeviceBatchSize": batch, "gradientAccumulationSteps": 1},
        "evaluation": {"strategy": "no"},
        "output": {"destination": "pvc://bench/out"},
        "resources": {"gpusPerNode": 0},
    }}
    path = work / f"sftjob-{seq}.yaml"
    path.write_text(yaml.safe_dump(job))
    (work.parent / "bench").unlink(missing_ok=True)
    (work.parent / "bench").symlink_to(work)  # pvc://bench/... through $SFT_PVC_ROOT
    env = {**os.environ, "SFT_PVC_ROOT": str(work.parent), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(sys.path[:2])}
    try:
        out = subprocess.run([sys.executable, "-m", "sft_operator.cli.sftctl", "validate", str(path)], env=env,
                             capture_output=True, text=True, check=True).stdout
    finally:
        (work.parent / "bench").unlink()
    line = next(x for x in out.splitlines() if "memory per CPU process" in x)
    shapes = memory.Shapes.from_config(json.loads((work / "model" / "config.json").read_text()))
    e = memory.estimate(shapes, memory.Setup(batch=batch, seq=seq, precision="fp32", device="cpu"))
    return e.total / 2**20, line.split(": ", 1)[1]


def trl_version() -> str:
    from importlib.metadata import version

    return version("trl")


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for (name, settings) in dict.fromkeys((r["name"], r["settings"]) for r in results):
        pts = sorted((r["seq"], r["peak_rss_mib"] / 1024) for r in results
                     if r["name"] == name and r["settings"] == settings and r["exit"] == 0)
        if pts:
            label = {"ours": "ours (fused loss)", "unfused": "ours, unfused loss", "trl": f"TRL {trl_version()}"}[name]
            ax.plot(*zip(*pts), marker="o", label=f"{label}, {settings}")
    ax.set_xscale("log", base=2)
    seqs = sorted({r["seq"] for r in results})
    ax.set_xticks(seqs, [f"{s:,}" for s in seqs])
    ax.set_xlabel("maxSeqLength (rows fill ~93%, batch 2)")
    ax.set_ylabel("peak RSS (GiB)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"Qwen2 layout, 2 layers, width 256, vocab {VOCAB:,}, CPU")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def run_all(args) -> dict:
    """Build the fixture, run every contender, and return what the report needs (also what --json saves)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        tok = build_model(work / "model")
        held = {}
        for seq in args.seqs:
            row_tokens = int(seq * args.fill)
            rows = rows_of(tok, args.steps * args.batch + args.eval_rows, row_tokens, args.response, seed=seq)
            (work / f"train-{seq}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[: args.steps * args.batch]))
            held[seq] = held_out(tok, rows[args.steps * args.batch :], seq)
        results = []
        for seq in args.seqs:
            for settings in args.settings:
                for name in args.only:
                    r = run(name, settings, seq, work, args)
                    if r["exit"] == 0:
                        r["eval_ce"] = eval_ce(r.pop("model"), held[seq])
                    r.update(steps=args.steps, batch=args.batch)
                    results.append(r)
                    print(f"{name} {settings} seq {seq}: " + (f"exit {r['exit']}: {r['failure'][-600:]}" if r["exit"]
                          else f"peak RSS {r['peak_rss_mib']:,.0f} MiB, {r['wall_s']:.1f} s process, "
                               f"{r['train_s']:.1f} s training, eval CE {r['eval_ce']:.4f}"), flush=True)
        validate = {seq: validate_estimate(work, seq, args.batch)[1] for seq in args.seqs}
        config = json.loads((work / "model" / "config.json").read_text())
    return {"results": results, "validate": validate, "config": config,
            "machine": f"{len(os.sched_getaffinity(0))} cores, load average {load[0]:.1f} at the start, "
                       f"{os.getloadavg()[0]:.1f} at the end", "cap_gib": args.memory_cap_gib}


def report(runs: list[dict], args) -> None:
    from sft_contract import memory

    results = [r for run in runs for r in run["results"]]
    print(f"Qwen2 layout, 2 layers, width 256, tied, vocab {VOCAB:,}; rows of ~{args.fill:.0%} of maxSeqLength "
          f"({args.response:.0%} completion), fp32 weights, CPU; " + "; ".join(run["machine"] for run in runs))
    print(f"{'seq':>5} {'settings':<9} {'contender':<8} {'steps':>5} {'peak RSS MiB':>12} {'vs TRL':>7} {'process s':>9} "
          f"{'train s':>8} {'speed vs TRL':>12} {'CPU s':>7} {'CPU vs TRL':>10} {'eval CE':>8}")
    for r in results:
        if r["exit"]:
            caps = {run["cap_gib"] for run in runs if r in run["results"]} - {None}
            cap = f" under the {caps.pop():g} GiB address-space cap" if caps and r["exit"] > 0 else ""
            how = f"killed by signal {-r['exit']}" if r["exit"] < 0 else f"exit {r['exit']}"
            print(f"{r['seq']:>5} {r['settings']:<9} {r['name']:<8} {r['steps']:>5} failed ({how}{cap})")
            continue
        trl = next((t for t in results if t["name"] == "trl" and t["seq"] == r["seq"] and t["settings"] == r["settings"]
                    and not t["exit"]), None)
        mem = f"{r['peak_rss_mib'] / trl['peak_rss_mib']:.2f}x" if trl else "-"
        same = trl and trl["steps"] == r["steps"]
        speed = f"{trl['train_s'] / r['train_s']:.2f}x" if same else "-"
        cpu = f"{trl['cpu_s'] / r['cpu_s']:.2f}x" if same else "-"
        print(f"{r['seq']:>5} {r['settings']:<9} {r['name']:<8} {r['steps']:>5} {r['peak_rss_mib']:>12,.0f} {mem:>7} "
              f"{r['wall_s']:>9.1f} {r['train_s']:>8.1f} {speed:>12} {r['cpu_s']:>7.1f} {cpu:>10} {r['eval_ce']:>8.4f}")
    # The estimate as sftctl validate makes it for these runs as CPU SFTJobs (gpusPerNode 0), from today's code.
    shapes = memory.Shapes.from_config(runs[0]["config"])
    print("memory estimate (sftctl validate, CPU SFTJob) against ours' measured peak RSS:")
    for r in results:
        if r["name"] == "ours" and not r["exit"]:
            e = memory.estimate(shapes, memory.Setup(batch=r["batch"], seq=r["seq"], precision="fp32", device="cpu"))
            print(f"  seq {r['seq']:>5} {r['settings']:<9}: {e.total / 2**20:>6,.0f} MiB against {r['peak_rss_mib']:,.0f}: "
                  f"{e.total / 2**20 / r['peak_rss_mib'] - 1:+.1%} (tensors {(e.total - e.overhead) / 2**20:,.0f}, "
                  f"logits {e.logits / 2**20:,.0f})")
    for run in runs if not args.from_json else []:  # a saved line is the code of its day
        for seq, line in run.get("validate", {}).items():
            print(f"  sftctl validate at seq {seq}: {line}")


def main(argv=None) -> int:
    args = parse(argv)
    if args.child:
        trl_child(json.loads(args.child))
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.from_json:
        runs = [json.loads(Path(f).read_text()) for f in args.from_json]
    else:
        runs = [run_all(args)]
        if args.json:
            Path(args.json).write_text(json.dumps(runs[0], indent=2))
    print()
    report(runs, args)
    if args.plot:
        plot([r for run in runs for r in run["results"]], args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
