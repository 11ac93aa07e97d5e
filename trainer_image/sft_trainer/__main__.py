"""``python -m sft_trainer --config FILE``: validate the config, train, exit with an ``ExitCode``.

Works unchanged under torchrun (it reads RANK/WORLD_SIZE/LOCAL_RANK). The config is the TrainingSpec as
camelCase JSON (the operator's ConfigMap); YAML is accepted too, and so is a whole SFTJob manifest (its
``spec`` is used). ``--config`` defaults to ``$SFT_CONFIG``, then ``/etc/sft/config.json``.
On failure a one-line reason goes to ``$SFT_TERMINATION_LOG`` (default /dev/termination-log); on success
rank 0 writes the run's result there as JSON (``sft_trainer.result``), where the operator reads it.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from sft_contract import cel
from sft_contract.exit_codes import DEFAULT_TERMINATION_LOG, ExitCode
from sft_contract.spec import TRAINING_FIELDS, TrainingSpec

from . import gates
from .errors import ConfigError, EvaluationFailed, TrainerError
from .result import TERMINATION_LIMIT, write_result

DEFAULT_CONFIG = "/etc/sft/config.json"


def write_termination_log(reason: str) -> None:
    """Best effort: the file may not exist or be writable outside a pod."""
    path = os.environ.get("SFT_TERMINATION_LOG", DEFAULT_TERMINATION_LOG)
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(" ".join(reason.split())[:TERMINATION_LIMIT] + "\n")
    except OSError:
        pass


def training_part(doc: dict[str, Any]) -> dict[str, Any]:
    """The TrainingSpec fields of a config: a bare TrainingSpec, or an SFTJob manifest's spec."""
    if isinstance(doc, dict) and doc.get("kind") == "SFTJob":
        spec = doc.get("spec") or {}
        keep = {_camel(f) for f in TRAINING_FIELDS}
        return {k: v for k, v in spec.items() if k in keep}
    return doc


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(w.title() for w in rest)


def parse_spec(doc: dict[str, Any], where: str = "config") -> TrainingSpec:
    """The schema (pydantic), then the CRD's CEL rules on the same fields (sft_contract.cel)."""
    part = training_part(doc)
    try:
        spec = TrainingSpec.model_validate(part)
    except ValidationError as e:
        errors = "; ".join(
            f"{'.'.join(str(x) for x in err['loc']) or '(root)'}: {err['msg']}" for err in e.errors()[:5]
        )
        raise ConfigError(f"{where}: invalid training spec: {errors}") from None
    broken = cel.problems(TrainingSpec, part)
    if broken:
        errors = "; ".join(f"{path or '(root)'}: {message}" for path, message in broken[:5])
        raise ConfigError(f"{where}: invalid training spec: {errors}")
    return spec


def load_config(path: str) -> TrainingSpec:
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror or e}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        try:
            import yaml

            doc = yaml.safe_load(text)
        except Exception as e:  # noqa: BLE001 - neither JSON nor YAML
            raise ConfigError(f"config {path} is neither JSON nor YAML: {e}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"config {path}: expected an object")
    return parse_spec(doc, path)


def setup_logging() -> None:
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=logging.INFO if rank == "0" else logging.WARNING,
        stream=sys.stderr,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sft_trainer", description="Supervised fine-tuning from a TrainingSpec.")
    p.add_argument("--config", default=os.environ.get("SFT_CONFIG", DEFAULT_CONFIG), help="TrainingSpec JSON/YAML file")
    args = p.parse_args(argv)
    setup_logging()
    # A rank that dies inside C++ (an abort in a collective, a segfault) leaves its Python stack in the pod log.
    faulthandler.enable()
    log = logging.getLogger("sft_trainer")
    try:
        spec = load_config(args.config)
        from . import train  # torch is imported only once the config is valid
        from .run_hooks import train_under_hooks

        # The destination lock is held from training through the export; train.run may also return a
        # finished, unexported model's metrics.
        metrics = train_under_hooks(spec, lambda hooks: train.run(spec, sinks=hooks.sinks, lock=hooks.lock))
        rejected = gates.rejection(metrics)
        if rejected:  # exported (under rejected/) and tracked, but the job fails: exit 80
            raise EvaluationFailed(rejected)
        write_result(metrics)  # rank 0: the result the operator reads
        return ExitCode.OK
    except TrainerError as e:
        log.error("%s (exit %d %s)", e.reason, e.code, e.code.name)
        write_termination_log(e.reason)
        return int(e.code)
    except Exception as e:  # noqa: BLE001 - unexpected: keep the traceback in the log, the reason in the message
        traceback.print_exc()
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and _lost_peer(e):
            reason = f"another rank was lost ({type(e).__name__}: {' '.join(str(e).split())[:300]}); " \
                     "the group restarts from the last checkpoint"
            log.error("%s (exit %d PEER_LOST)", reason, ExitCode.PEER_LOST)
            write_termination_log(reason)
            return int(ExitCode.PEER_LOST)
        write_termination_log(f"{type(e).__name__}: {e}")
        return 1


def _lost_peer(error: BaseException) -> bool:
    from .distributed import lost_peer  # torch: imported by the run that raised

    return lost_peer(error)


if __name__ == "__main__":
    from .launch import record_exit  # under the launcher: it reads this after a SIGTERM

    sys.exit(record_exit(main()))
