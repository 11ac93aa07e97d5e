#!/usr/bin/env python
"""How long a SIGTERM'd trainer takes to save its checkpoint and exit, for a ~0.5B full fine-tune on CPU.

A Qwen2.5-0.5B-shaped model (the bundled table's config: 494M parameters, tied embeddings, vocab 151,936)
with random weights and the tiny tokenizer, full fine-tuning in fp32 (AdamW: a checkpoint of 12 B per
parameter), one row per step. The trainer runs as the pod runs it (``python -m sft_trainer.launch``);
after its first progress line the benchmark sends SIGTERM to the launcher, as the kubelet does, and
measures until it exits 75. Printed: the time to exit, the save time the trainer reports, the checkpoint
size and the write bandwidth it implies, next to the grace period the renderer would set.

    python bench/sigterm_save.py                # ~12 GiB of memory and ~8 GiB of disk under --workdir
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "trainer_image"), str(ROOT / "contract"), str(ROOT / "operator")]
MODEL = "Qwen/Qwen2.5-0.5B"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="/tmp/sft-sigterm")
    p.add_argument("--seq", type=int, default=64)
    args = p.parse_args(argv)
    work = Path(args.workdir)
    from sft_trainer import tiny
    from sft_contract import memory

    assets = tiny.ensure(work / "tiny")
    model_dir = work / "qwen2.5-0.5b-random"
    if not (model_dir / "config.json").exists():
        import torch
        from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

        cfg = memory.bundled_table()[MODEL]
        torch.manual_seed(0)
        Qwen2ForCausalLM(Qwen2Config(**{k: v for k, v in cfg.items() if k != "model_type"})).save_pretrained(model_dir)
        AutoTokenizer.from_pretrained(assets / "model").save_pretrained(model_dir)
    out = work / "out"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    spec = {"model": {"source": str(model_dir)},
            "dataset": {"train": {"source": str(assets / "data" / "train.jsonl")}, "validationSplit": 0,
                        "maxSeqLength": args.seq},
            "hyperparameters": {"learningRate": 1e-5, "numEpochs": 1, "perDeviceBatchSize": 1,
                                "gradientAccumulationSteps": 1, "precision": "fp32"},
            "evaluation": {"strategy": "no"}, "output": {"destination": str(out)}}
    cfg_file = work / "config.json"
    cfg_file.write_text(json.dumps(spec))
    term = work / "termination-log"
    env = {**os.environ, "SFT_TERMINATION_LOG": str(term), "PYTHONPATH": f"{ROOT / 'trainer_image'}:{ROOT / 'contract'}:{ROOT / 'operator'}"}
    proc = subprocess.Popen([sys.executable, "-m", "sft_trainer.launch", "--config", str(cfg_file)], env=env,
                            stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if '"event": "progress"' in line:
            break
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.stdout.read()
    code = proc.wait()
    total = time.monotonic() - t0
    reason = term.read_text().strip()
    saved = float(re.search(r" in ([\d.]+) s", reason).group(1))
    (ckpt,) = (out / "checkpoints").iterdir()
    size = sum(f.stat().st_size for f in ckpt.iterdir())
    shapes = memory.table_shapes(MODEL)
    e = memory.estimate(shapes, memory.Setup(batch=1, seq=args.seq, precision="fp32"))
    print(f"exit {code}: {reason}")
    print(f"SIGTERM to exit: {total:.1f} s; the save itself: {saved:.1f} s; checkpoint {size / 1e9:.2f} GB "
          f"({size / saved / 1e6:.0f} MB/s); estimated checkpoint {memory.checkpoint_bytes(e) / 1e9:.2f} GB; "
          f"the renderer's grace period for this model: {memory.grace_period_seconds(memory.checkpoint_bytes(e))} s")
    return 0 if code == 75 else 1


if __name__ == "__main__":
    sys.exit(main())
