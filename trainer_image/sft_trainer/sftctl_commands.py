"""The ``sftctl`` commands the trainer contributes: ``run``, ``example-assets`` and the data check of
``validate --data`` (entry points in pyproject.toml, groups ``sftctl.commands`` and ``sftctl.data_check``).

The operator's CLI never imports the trainer; it finds these through the entry points. torch is
loaded only when one of them runs, so registering them costs nothing.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

TRAINER_EXTRA = "pip install 'sft-operator[trainer]'"


def add_run(subparsers: Any) -> None:
    p = subparsers.add_parser("run", help="run the trainer on this machine on an SFTJob manifest (no cluster)")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--output", help="override spec.output.destination")
    p.set_defaults(func=cmd_run)


def add_example_assets(subparsers: Any) -> None:
    p = subparsers.add_parser("example-assets", help="generate the tiny offline model, tokenizer and datasets")
    p.add_argument("dir", nargs="?", help="where to write them (default ~/.cache/sft-operator/tiny)")
    p.set_defaults(func=cmd_example_assets)


def cmd_run(args: argparse.Namespace) -> int:
    try:
        from sft_trainer import local  # torch lives here, loaded only now
    except ImportError as err:
        print(f"sftctl run needs the trainer extra: {TRAINER_EXTRA} ({err})", file=sys.stderr)
        return 1
    return local.run(args.file, output=args.output)


def cmd_example_assets(args: argparse.Namespace) -> int:
    try:
        from sft_trainer import tiny
    except ImportError as err:
        print(f"sftctl example-assets needs the trainer extra: {TRAINER_EXTRA} ({err})", file=sys.stderr)
        return 1
    return tiny.main([args.dir] if args.dir else [])


def check_data(where: str, spec: Any, world_size: int) -> bool:
    """``validate --data``: the trainer's data check on this machine (sft_trainer.datacheck) of a valid
    SFTJob's spec (a TrainingSpec), as ``world_size`` processes would split it; True when the data is fit
    to train on. pvc:// is read from $SFT_PVC_ROOT/<claim>,
    as ``sftctl run`` reads it."""
    try:
        from sft_trainer import datacheck, loading
        from sft_trainer.errors import TrainerError
        from sft_trainer.local import check_claims_mounted
    except ImportError as err:
        print(f"{where}: --data needs the trainer extra: {TRAINER_EXTRA} ({err})", file=sys.stderr)
        return False
    try:
        check_claims_mounted(spec)
        result = datacheck.check(spec, loading.load_tokenizer(spec), world_size)
    except TrainerError as err:
        print(f"{where}: data: {err.reason}", file=sys.stderr)
        return False
    for line in result.lines():
        print(f"{where}: data: {line}")
    if not result.ok:
        print(f"{where}: data: {result.error().reason}", file=sys.stderr)
    return result.ok
