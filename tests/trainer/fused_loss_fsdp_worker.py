"""Run by test_fused_loss_fsdp.py under torchrun (2 processes, gloo): one backward of the trainer's loss with
FSDP2 sharding every layer and the root (the LM head's weight a DTensor shard), fused and unfused, against the
unwrapped model over both ranks' batches. Rank 0 writes the figures to the JSON file named by argv[1]."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from sft_trainer import architectures, collate, loss, modeling, train
from sft_trainer.distributed import setup_distributed, wrap
from sft_trainer.data import IGNORE, Example


def build(name: str):
    import transformers

    family = architectures.FAMILIES[name]
    config = getattr(transformers, family.config_class)(vocab_size=300, pad_token_id=0, bos_token_id=1,
                                                        eos_token_id=2, **family.config)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def batch_of(rank: int):
    g = torch.Generator().manual_seed(10 + rank)
    rows = []
    for n in (21, 13, 8):
        ids = torch.randint(3, 300, (n,), generator=g).tolist()
        rows.append(Example(input_ids=ids, labels=[IGNORE] * (n // 3) + ids[n // 3 :]))
    return collate.pad_batch(rows, pad_id=0)


def sharded_grads(name: str, batch, fused: bool, d) -> tuple[float, dict[str, torch.Tensor], bool]:
    os.environ["SFT_FUSED_LOSS"] = "1" if fused else "0"
    base = build(name)
    model = wrap(base, d, "fsdp", modeling.decoder_layers(base), param_dtype=None, cpu_offload=False)
    head_sharded = type(base.get_output_embeddings().weight).__name__ == "DTensor"
    s = train.loss_sum(model, batch)
    s.backward()
    total = torch.tensor([float(s.detach())])
    dist.all_reduce(total)
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    return float(total), grads, head_sharded


def main() -> None:
    out_path = sys.argv[1]
    d = setup_distributed()
    calls = []
    real = loss.fused_linear_cross_entropy

    def counted(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    loss.fused_linear_cross_entropy = counted
    report = {}
    for name in ("llama", "llama-tied"):
        # The unwrapped model over both batches: FSDP averages the ranks' gradients.
        os.environ["SFT_FUSED_LOSS"] = "0"
        ref, ref_total = build(name), 0.0
        for r in range(d.world):
            s = train.loss_sum(ref, batch_of(r))
            s.backward()
            ref_total += float(s.detach())
        ref_grads = {n: p.grad / d.world for n, p in ref.named_parameters()}
        entry = {"reference_loss": ref_total}
        for fused in (True, False):
            calls.clear()
            total, grads, head_sharded = sharded_grads(name, batch_of(d.rank), fused, d)
            worst = max(float((grads[n] - g).abs().max() / g.abs().max().clamp_min(1e-12)) for n, g in ref_grads.items())
            key = "fused" if fused else "unfused"
            entry[key] = {"loss": total, "worst_relative_grad_error": worst, "fused_calls": len(calls),
                          "head_sharded": head_sharded, "parameters": len(grads)}
        report[name] = entry
    if d.rank == 0:
        with open(out_path, "w") as f:
            json.dump(report, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
