"""``python -m sft_trainer.launch [--nnodes N --nproc-per-node G --node-rank R --master-addr A --master-port P] --config FILE``

The pod command. One process in all: run the trainer in this process. Otherwise start the workers with
``torch.distributed.run`` (torchrun) and exit with the *failing rank's* exit code — plain torchrun exits 1
for any failure, which would hide DataError/NaNLoss from the Job's podFailurePolicy. SIGTERM to the
launcher reaches the workers (they save a checkpoint) and the launcher exits 75 (retriable).
"""

from __future__ import annotations

import argparse
import os
import sys

from .exit_codes import ExitCode


def parse(argv: list[str] | None):
    p = argparse.ArgumentParser(prog="python -m sft_trainer.launch", description=__doc__.split("\n\n")[0])
    p.add_argument("--nnodes", type=int, default=int(os.environ.get("SFT_NNODES", "1")))
    p.add_argument("--nproc-per-node", "--nproc_per_node", default=os.environ.get("SFT_NPROC_PER_NODE", "1"),
                   help="processes per node: a number, or gpu/auto")
    p.add_argument("--node-rank", "--node_rank", type=int,
                   default=int(os.environ.get("JOB_COMPLETION_INDEX", os.environ.get("SFT_NODE_RANK", "0"))))
    p.add_argument("--master-addr", "--master_addr", default=os.environ.get("MASTER_ADDR", "127.0.0.1"))
    p.add_argument("--master-port", "--master_port", type=int, default=int(os.environ.get("MASTER_PORT", "29500")))
    p.add_argument("--config", default=None, help="TrainingSpec JSON (default $SFT_CONFIG, then /etc/sft/config.json)")
    return p.parse_args(argv)


def nproc(value: str) -> int:
    if value.isdigit():
        return int(value)
    import torch

    return max(1, torch.cuda.device_count()) if value in ("gpu", "auto") else 1


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    n = nproc(str(args.nproc_per_node))
    worker_args = ["--config", args.config] if args.config else []
    if args.nnodes * n == 1:
        from .__main__ import main as worker

        return worker(worker_args)

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    torchrun = [
        f"--nnodes={args.nnodes}",
        f"--nproc-per-node={n}",
        f"--node-rank={args.node_rank}",
        f"--master-addr={args.master_addr}",
        f"--master-port={args.master_port}",
        "--max-restarts=0",  # restarts are the Job controller's business (podFailurePolicy, backoffLimit)
        "--module",
        "sft_trainer",
        *worker_args,
    ]
    try:
        run(parse_args(torchrun))
        return ExitCode.OK
    except ChildFailedError as e:
        _, first = e.get_first_failure()
        code = first.exitcode
        # A worker killed by a signal reports -N; SIGTERM'd workers save first and exit 75 themselves.
        return code if code > 0 else 128 - code
    except SignalException:
        return ExitCode.INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
