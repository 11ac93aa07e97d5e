"""What tests share: the repository root, a free port, the operator as a subprocess.

The launcher lives in the dev tools (``sft_devcluster.operator_process``) so that bench/ uses
the same one without importing tests/.
"""

from __future__ import annotations

from pathlib import Path

from sft_devcluster.processes import free_port
from sft_devcluster.operator_process import OperatorProcess

REPO = Path(__file__).resolve().parents[1]

__all__ = ["REPO", "OperatorProcess", "free_port"]
