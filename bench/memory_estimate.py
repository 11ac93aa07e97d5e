#!/usr/bin/env python
"""The memory estimate (``sft_contract.memory``) against measured peaks, on CPU.

For each tiny architecture of ``sft_trainer.architectures`` (scaled up with ``--hidden``/``--layers`` so
that activations, not fixed costs, dominate) and each setup (full fine-tuning, full with gradient
checkpointing, LoRA), this runs the trainer's own model preparation and training step (``modeling.
prepare_model``, ``train.loss_sum``, fused AdamW, clipping) for a few steps on rows that fill
``--seq`` with every token labelled (the estimate's worst case), under a dispatch mode that accounts every
tensor storage alive (what an allocator's "allocated bytes" counts; torch's ``MemTracker`` does the same
but refuses the second forward of gradient checkpointing). The peak of the last steps is compared with the
estimate less its fixed GPU overhead (CUDA context, allocator slack: nothing of that on CPU). fp32 only:
bf16 autocast and FSDP shards need a GPU to measure.

    python bench/memory_estimate.py                    # all architectures, ~1-2 min on 2 cores
    python bench/memory_estimate.py --only llama qwen2 --batch 2 --seq 512
    python bench/memory_estimate.py --only qwen2 --setups full --hidden 256 --layers 2 --vocab 151936 --batch 2 --seq 2048
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "trainer_image"), str(ROOT / "contract"), str(ROOT / "operator")]

SETUPS = {
    "full": {},
    "full+gc": {"gradientCheckpointing": True},
    "lora": {"peft": {"rank": 8, "dropout": 0.05}},
    "lora+gc": {"peft": {"rank": 8, "dropout": 0.05}, "gradientCheckpointing": True},
}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", help="architectures (default: all)")
    p.add_argument("--setups", nargs="*", choices=list(SETUPS), default=list(SETUPS))
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--vocab", type=int, help="widen the vocabulary to this many tokens (random weights; the "
                   "tokenizer's ids stay a corner of it), e.g. 151936 for Qwen's: a shape where the logits dominate")
    return p.parse_args(argv)


def scaled(family, hidden: int, layers: int):
    cfg = dict(family.config)
    heads = cfg.get("num_attention_heads", 4)
    cfg.update(hidden_size=hidden, intermediate_size=cfg.get("intermediate_size", 2 * 64) * hidden // 64,
               num_hidden_layers=layers)
    if "head_dim" in cfg:
        cfg["head_dim"] = hidden // heads
    if "query_pre_attn_scalar" in cfg:
        cfg["query_pre_attn_scalar"] = hidden // heads
    return dataclasses.replace(family, config=cfg)


def widen(model_dir: Path, vocab: int) -> None:
    """Rewrite the model in ``model_dir`` with a ``vocab``-token embedding (and head), random weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    config.vocab_size = vocab
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)


class StoragePeak:
    """Live tensor storage bytes and their peak, for every tensor any aten op reads or makes (CPU too)."""

    def __init__(self):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        tracker = self
        self.sizes: dict[int, int] = {}
        self.current = self.peak = 0

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_flatten((args, kwargs, out))[0]:
                    if isinstance(t, torch.Tensor):
                        tracker.see(t)
                return out

        self.mode = Mode()

    def see(self, t) -> None:
        import weakref

        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return
        key, size = st._cdata, st.nbytes()
        old = self.sizes.get(key)
        if old == size:
            return
        if old is None:
            weakref.finalize(st, self.free, key)
        self.sizes[key] = size
        self.current += size - (old or 0)
        self.peak = max(self.peak, self.current)

    def free(self, key: int) -> None:
        self.current -= self.sizes.pop(key, 0)

    def reset_peak(self) -> None:
        self.peak = self.current


def measure(model_dir: Path, setup: dict, args) -> tuple[int, dict]:
    """Peak bytes over the last steps of a few training steps, and the spec used."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from sft_trainer import collate, data, modeling
    from sft_contract.spec import TrainingSpec
    from sft_trainer.train import loss_sum

    spec = TrainingSpec.model_validate({
        "model": {"source": str(model_dir)},
        "dataset": {"train": {"source": "unused.jsonl"}, "maxSeqLength": args.seq},
        "hyperparameters": {"perDeviceBatchSize": args.batch, "precision": "fp32",
                            "gradientCheckpointing": setup.get("gradientCheckpointing", False)},
        **({"peft": setup["peft"]} if "peft" in setup else {}),
        "output": {"destination": "unused"},
    })
    tok = AutoTokenizer.from_pretrained(model_dir)
    pad_added = data.ensure_pad_token(tok)
    amp = modeling.resolve_precision("fp32", torch.device("cpu"))
    config = AutoConfig.from_pretrained(model_dir)
    model = modeling.prepare_model(spec, config, tok, amp, torch.device("cpu"), pad_added)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, fused=True)
    g = torch.Generator().manual_seed(0)
    rows = [data.Example(ids, [data.IGNORE] + ids[1:]) for ids in
            torch.randint(10, len(tok) - 10, (args.batch, args.seq), generator=g).tolist()]
    batch = collate.pad_batch(rows, tok.pad_token_id)
    tracker = StoragePeak()
    for t in [*model.parameters(), *model.buffers()]:  # made before tracking started
        tracker.see(t)
    with tracker.mode:
        for step in range(args.steps):
            if step == 1:
                tracker.reset_peak()  # from the second step on: optimizer states exist, as in a long run
            loss = loss_sum(model, batch) / collate.trained_tokens(batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
    return tracker.peak, spec


def main(argv=None) -> int:
    args = parse(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import json

    import torch

    from sft_trainer import architectures
    from sft_contract import memory

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    names = args.only or list(architectures.FAMILIES)
    errors = []
    print(f"hidden {args.hidden}, {args.layers} layers{f', vocab {args.vocab:,}' if args.vocab else ''}, batch {args.batch} x {args.seq} tokens, fp32, CPU; "
          "error = estimate (less the GPU overhead) / measured peak - 1")
    print(f"{'architecture':<12} {'setup':<8} {'params':>8} {'measured MiB':>12} {'estimate MiB':>12} {'error':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        base = architectures._base_tokenizer()
        for name in names:
            family = scaled(architectures.FAMILIES[name], args.hidden, args.layers)
            model_dir = architectures.build(family, Path(tmp) / name, base)
            if args.vocab:
                widen(model_dir, args.vocab)
            shapes = memory.Shapes.from_config(json.loads((model_dir / "config.json").read_text()), "bench")
            for setup_name in args.setups:
                peak, spec = measure(model_dir, SETUPS[setup_name], args)
                e = memory.estimate(shapes, memory.setup_for(spec, world=1, strategy="ddp", precision="fp32"))
                predicted = e.total - e.overhead
                err = predicted / peak - 1
                errors.append((setup_name, err))
                print(f"{name:<12} {setup_name:<8} {shapes.parameters / 1e6:>7.2f}M {peak / 2**20:>12.1f} "
                      f"{predicted / 2**20:>12.1f} {err:>+7.1%}", flush=True)
    print()
    for setup_name in args.setups:
        errs = [e for s, e in errors if s == setup_name]
        print(f"{setup_name:<8} error: mean {statistics.fmean(errs):+.1%}, min {min(errs):+.1%}, max {max(errs):+.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
