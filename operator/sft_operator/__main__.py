"""`python -m sft_operator` / `sft-operator`: the operator process (``sft_operator.runtime.main``).

The operator reaches the API server through Kopf's client and ``sft_operator.runtime.client``, both on
aiohttp. Kopf imports the kubernetes library whenever it is installed (``sftctl`` needs it for
status and watch); in the operator that costs ~24 MiB of memory and a second of start-up for
nothing, so this entry point keeps it out of the process (``kube.load_credentials`` still uses
it for a kubeconfig user with an exec plugin).
"""

from __future__ import annotations

import sys


def without_kubernetes_library() -> None:
    """Make ``import kubernetes`` fail in this process unless something imported it already."""
    sys.modules.setdefault("kubernetes", None)  # type: ignore[arg-type]


def run() -> None:
    without_kubernetes_library()
    from sft_operator.runtime.main import run as run_operator

    run_operator()


if __name__ == "__main__":
    run()
