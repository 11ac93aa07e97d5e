"""``python -m sft_trainer.launch [--nnodes N --nproc-per-node G --node-rank R --master-addr A --master-port P] --config FILE``

The pod command. One process in all: run the trainer in this process. Otherwise start the workers with
``torch.distributed.run`` (torchrun) and exit with the *failing rank's* exit code — plain torchrun exits 1
for any failure, which would hide DataError/NaNLoss from the Job's podFailurePolicy.

SIGTERM to the launcher reaches the workers, which save a checkpoint and exit 75. torchrun SIGKILLs a
worker that has not exited ``--shutdown-timeout`` seconds later (30 by default); the launcher gives it the
pod's grace period (``$SFT_TERMINATION_GRACE_SECONDS``, which the operator sets to the pod's
``terminationGracePeriodSeconds``) less ``SHUTDOWN_MARGIN_S`` to report. The launcher exits 75 only when
every local worker exited 75 (its checkpoint committed) or 0; otherwise it exits with the failing worker's
code (a worker killed mid-save: 137), which the Job counts, because nothing was saved.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from sft_contract.exit_codes import ExitCode

GRACE_ENV = "SFT_TERMINATION_GRACE_SECONDS"
SHUTDOWN_MARGIN_S = 5  # the launcher's time to collect the workers' codes and exit before the kubelet's SIGKILL
UNBOUNDED_S = 86_400  # no grace period given: wait for the workers (the pod's own grace period still bounds it)
EXIT_DIR_ENV = "SFT_WORKER_EXIT_DIR"  # where each worker records its exit code (file name: its LOCAL_RANK)
KILLED = 128 + signal.SIGKILL  # a worker that recorded no exit code was killed


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


def shutdown_timeout(grace: str | None) -> int:
    """Seconds torchrun waits for the workers after forwarding SIGTERM, from the pod's grace period."""
    if not grace or not grace.strip():
        return UNBOUNDED_S
    try:
        seconds = int(grace)
    except ValueError:
        raise SystemExit(f"{GRACE_ENV}={grace!r}: expected whole seconds (the pod's terminationGracePeriodSeconds)")
    return max(1, seconds - SHUTDOWN_MARGIN_S)


def combined_exit(codes: Sequence[int | None]) -> int:
    """The launcher's exit code from its workers' (first failure first; None: the worker recorded none,
    it was killed; negative: killed by that signal). 75 only when no worker failed otherwise."""
    failed = [c for c in codes if c not in (ExitCode.OK, ExitCode.INTERRUPTED)]
    if not failed:
        return ExitCode.INTERRUPTED if ExitCode.INTERRUPTED in codes else ExitCode.OK
    code = failed[0]
    if code is None:
        return KILLED
    return code if code > 0 else 128 - code


def record_exit(code: int) -> int:
    """A worker under the launcher writes its exit code where the launcher reads it after a SIGTERM
    (torchrun reports no exit codes then). Returns ``code``."""
    folder = os.environ.get(EXIT_DIR_ENV)
    if folder:
        try:
            (Path(folder) / os.environ.get("LOCAL_RANK", "0")).write_text(f"{int(code)}\n")
        except OSError:
            pass  # the launcher then counts this worker as killed, which fails safe (not 75)
    return code


def recorded_exits(folder: Path, local_workers: int) -> list[int | None]:
    out: list[int | None] = []
    for rank in range(local_workers):
        try:
            out.append(int((folder / str(rank)).read_text()))
        except (OSError, ValueError):
            out.append(None)
    return out


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
        f"--shutdown-timeout={shutdown_timeout(os.environ.get(GRACE_ENV))}",
        "--module",
        "sft_trainer",
        *worker_args,
    ]
    exits = Path(tempfile.mkdtemp(prefix="sft-exits-"))
    os.environ[EXIT_DIR_ENV] = str(exits)  # the workers inherit it
    try:
        run(parse_args(torchrun))
        return ExitCode.OK
    except ChildFailedError as e:
        failures = sorted(e.failures.values(), key=lambda f: f.timestamp)
        return combined_exit([f.exitcode for f in failures])
    except SignalException as e:
        codes = recorded_exits(exits, n)
        code = combined_exit(codes)
        if code != ExitCode.INTERRUPTED:
            from .__main__ import write_termination_log

            reason = (f"{e.sigval.name} received, but not every worker saved and exited 75: exit codes by local "
                      f"rank {codes} (None: killed, e.g. mid-save when {GRACE_ENV} less {SHUTDOWN_MARGIN_S} s ran "
                      f"out); exit {code}")
            print(f"sft_trainer.launch: {reason}", file=sys.stderr)
            write_termination_log(reason)
        return code
    finally:
        shutil.rmtree(exits, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
