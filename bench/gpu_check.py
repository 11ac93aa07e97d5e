#!/usr/bin/env python
"""The GPU figures of issue #20 in one short call: MFU, peak memory against the estimate, the fused loss
against the unfused one, FSDP's loss against DDP's.

A Qwen2.5-0.5B-shaped model (24 layers, width 896, 14/2 heads, MLP 4,864, tied, vocab 151,936) with random
weights, built offline, and prompt/completion rows of ~``--rows-tokens`` tokens (70% completion). Every run is
the trainer as a pod runs it (``sft_trainer``'s main, bf16 on CUDA), a few steps each:

  fused     our defaults (the fused, chunked LM-head loss); its peak memory (``torch.cuda.max_memory_allocated``
            and ``_reserved``) beside ``sftctl validate``'s estimate for the same spec
  unfused   the same with ``SFT_FUSED_LOSS=0``: the peak and the step time the fused loss saves
  ddp/fsdp  two processes (``sft_trainer.launch``), one per GPU, the same seed and data: their per-step losses
            (needs two GPUs; with one it says so and skips)

MFU = trained tokens per second x (6 x parameters + 12 x layers x width x sequence) / the GPU's dense bf16 peak
(``--peak-tflops``; H100/H200 SXM: 989). Prints a table; ``--json FILE`` keeps the figures.

    python bench/gpu_check.py                      # on the GPU machine: ~5 min
    python bench/gpu_check.py --tiny --steps 3     # a smoke run of the script itself on a CPU (tiny shapes)
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
sys.path[:0] = [str(ROOT / "contract"), str(ROOT / "trainer_image"), str(ROOT / "bench")]

SHAPE_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151_936)
SHAPE_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=151_936)
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}

# Runs sft_trainer's main in this process and then reports the device's peak memory (a child of this script).
CHILD = """
import json, sys, torch
from sft_trainer.__main__ import main
if torch.cuda.is_available():
    torch.cuda.reset_peak_memory_stats()
rc = main(["--config", sys.argv[1]])
peak = {"allocated": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.max_memory_reserved()} \\
    if torch.cuda.is_available() else {}
open(sys.argv[2], "w").write(json.dumps({"rc": int(rc), **peak}))
sys.exit(int(rc))
"""


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per run")
    p.add_argument("--batch", type=int, default=4, help="per-device batch size")
    p.add_argument("--seq", type=int, default=2048, help="maxSeqLength")
    p.add_argument("--rows-tokens", type=int, default=1900, help="tokens per row")
    p.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak (default: by its name)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes, fp32: check the script itself on a CPU")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return p.parse_args(argv)


def build(work: Path, args) -> tuple[Path, Path, dict]:
    import torch
    import transformers
    from sft_trainer import architectures

    family = architectures.FAMILIES["qwen2"]
    tok = architectures.tokenizer_for(family)
    ids = {f"{k}_token_id": tok.convert_tokens_to_ids(v) if v else None for k, v in family.specials.items()}
    shape = SHAPE_TINY if args.tiny else SHAPE_05B
    config = transformers.Qwen2Config(max_position_embeddings=max(4096, args.seq), tie_word_embeddings=True,
                                      **shape, **ids)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    if not args.tiny:
        model = model.to(torch.bfloat16)
    model.save_pretrained(work / "model")
    tok.save_pretrained(work / "model")
    rows = work / "train.jsonl"
    write_rows(tok, rows, args.steps * args.batch * 2, args.rows_tokens, 0.7)
    return work / "model", rows, shape


def text_of(tok, rng: random.Random, n_tokens: int) -> str:
    """Words from the tiny assets' generator, cut to ``n_tokens`` tokens."""
    from sft_trainer.tiny import general_row

    words: list[str] = []
    while len(words) < n_tokens:
        words += general_row(rng)["text"].split()
    ids = tok(" ".join(words), add_special_tokens=False)["input_ids"][:n_tokens]
    return tok.decode(ids)


def write_rows(tok, path: Path, rows: int, row_tokens: int, response: float) -> None:
    rng = random.Random(0)
    with path.open("w") as f:
        for _ in range(rows):
            completion = int(row_tokens * response)
            f.write(json.dumps({"prompt": text_of(tok, rng, row_tokens - completion - 8),
                                "completion": text_of(tok, rng, completion)}) + "\n")


def spec_for(model: Path, rows: Path, out: Path, args, **extra) -> dict:
    return {
        "model": {"source": str(model)},
        "dataset": {"train": {"source": str(rows)}, "validationSplit": 0, "maxSeqLength": args.seq,
                    "format": "prompt-completion"},
        "hyperparameters": {"learningRate": 1e-4, "numEpochs": 1, "maxSteps": args.steps, "perDeviceBatchSize": args.batch,
                            "gradientAccumulationSteps": 1, "seed": 1,
                            **({"precision": "fp32"} if args.tiny else {"precision": "bf16"})},
        "evaluation": {"strategy": "no"},
        "checkpointing": {"strategy": "steps", "steps": 10 * args.steps},
        "output": {"destination": str(out)},
        **extra,
    }


def env_for(work: Path, name: str, **extra) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "contract"), str(ROOT / "trainer_image"), os.environ.get("PYTHONPATH", "")]),
            "HF_HUB_OFFLINE": "1", "SFT_RUN_ID": f"gpu-{name}", "SFT_TERMINATION_LOG": str(work / f"{name}.termination"),
            **extra}


def single(work: Path, name: str, model: Path, rows: Path, args, **env) -> dict:
    config = work / f"{name}.json"
    config.write_text(json.dumps(spec_for(model, rows, work / name, args)))
    t0 = time.perf_counter()
    with (work / f"{name}.log").open("w") as log:
        proc = subprocess.run([sys.executable, "-c", CHILD, str(config), str(work / f"{name}.peak.json")],
                              env=env_for(work, name, **env), stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed (exit {proc.returncode}):\n{(work / f'{name}.log').read_text()[-3000:]}")
    metrics = json.loads((work / name / "metrics.json").read_text())
    return {"wall_s": time.perf_counter() - t0, "metrics": metrics, "peak": json.loads((work / f"{name}.peak.json").read_text())}


def step_losses(out: Path) -> list[float]:
    from sft_trainer import outputs

    records = [json.loads(line) for line in (out / outputs.LOG).read_text().splitlines() if line.strip()]
    return [r["loss"] for r in records if "loss" in r]


def distributed(work: Path, strategy: str, model: Path, rows: Path, args) -> list[float]:
    config = work / f"{strategy}.json"
    config.write_text(json.dumps(spec_for(model, rows, work / strategy, args, distributed={"strategy": strategy})))
    with (work / f"{strategy}.log").open("w") as log:
        proc = subprocess.run([sys.executable, "-m", "sft_trainer.launch", "--nproc-per-node", "2", "--config", str(config)],
                              env=env_for(work, strategy), stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"{strategy} failed (exit {proc.returncode}):\n{(work / f'{strategy}.log').read_text()[-3000:]}")
    return step_losses(work / strategy)


def main(argv=None) -> int:
    args = parse(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from sft_contract import memory

    gpus = torch.cuda.device_count()
    name = torch.cuda.get_device_name(0) if gpus else "CPU"
    peak_tflops = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    figures: dict = {"device": name, "gpus": gpus}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, rows, shape = build(work, args)
        fused = single(work, "fused", model, rows, args)
        unfused = single(work, "unfused", model, rows, args, SFT_FUSED_LOSS="0")
        shapes = memory.Shapes.from_config(json.loads((model / "config.json").read_text()), "gpu-check")
        setup = memory.Setup(batch=args.batch, seq=args.seq, precision="fp32" if args.tiny else "bf16",
                             device="cuda" if gpus else "cpu")
        est = memory.estimate(shapes, setup)
        from safetensors.torch import load_file

        n_params = sum(t.numel() for t in load_file(str(model / "model.safetensors")).values())
        flops_per_token = 6 * n_params + 12 * shape["num_hidden_layers"] * shape["hidden_size"] * args.seq
        for key, run in (("fused", fused), ("unfused", unfused)):
            m = run["metrics"]
            figures[key] = {"tokens_per_s": m["tokensPerSecond"], "train_s": m["trainSeconds"], "train_loss": m["trainLoss"],
                            "peak_allocated_gib": run["peak"].get("allocated", 0) / 2**30,
                            "peak_reserved_gib": run["peak"].get("reserved", 0) / 2**30,
                            "mfu": (m["tokensPerSecond"] * flops_per_token / (peak_tflops * 1e12)) if peak_tflops and gpus else None}
        figures["estimate_gib"] = est.total / 2**30
        figures["estimate_logits_gib"] = est.logits / 2**30
        if gpus >= 2:
            ddp, fsdp = distributed(work, "ddp", model, rows, args), distributed(work, "fsdp", model, rows, args)
            figures["ddp_losses"], figures["fsdp_losses"] = ddp, fsdp
            figures["fsdp_ddp_max_rel_diff"] = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(ddp, fsdp))
        else:
            figures["fsdp_vs_ddp"] = f"skipped: needs 2 GPUs, this machine has {gpus}"

    print(f"{name}; Qwen2 layout {shape['num_hidden_layers']} layers x {shape['hidden_size']}, vocab {shape['vocab_size']:,}, "
          f"{n_params / 1e6:,.0f}M parameters; batch {args.batch} x {args.seq}, {args.steps} steps, "
          f"{'fp32' if args.tiny else 'bf16'}")
    print(f"{'':<9} {'tokens/s':>10} {'train s':>8} {'MFU':>6} {'peak alloc GiB':>15} {'peak reserved GiB':>18} {'train loss':>11}")
    for key in ("fused", "unfused"):
        f = figures[key]
        mfu = f"{f['mfu']:.1%}" if f["mfu"] is not None else "-"
        print(f"{key:<9} {f['tokens_per_s']:>10,.0f} {f['train_s']:>8.1f} {mfu:>6} {f['peak_allocated_gib']:>15.2f} "
              f"{f['peak_reserved_gib']:>18.2f} {f['train_loss']:>11.5f}")
    f, u = figures["fused"], figures["unfused"]
    if u["peak_allocated_gib"]:
        print(f"fused / unfused: peak {f['peak_allocated_gib'] / u['peak_allocated_gib']:.2f}x, "
              f"throughput {f['tokens_per_s'] / u['tokens_per_s']:.2f}x")
        print(f"estimate {figures['estimate_gib']:.2f} GiB (logits {figures['estimate_logits_gib']:.2f}) against the measured "
              f"peak reserved {f['peak_reserved_gib']:.2f} GiB: {figures['estimate_gib'] / f['peak_reserved_gib'] - 1:+.0%}")
    if "fsdp_ddp_max_rel_diff" in figures:
        print(f"FSDP against DDP, {len(figures['ddp_losses'])} steps: largest relative loss difference "
              f"{figures['fsdp_ddp_max_rel_diff']:.2e}")
    else:
        print(f"FSDP against DDP: {figures['fsdp_vs_ddp']}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
