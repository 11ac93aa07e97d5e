"""`python -m sft_operator` / `sft-operator`: the operator process (``sft_operator.runtime.main``)."""

from __future__ import annotations


def run() -> None:
    from sft_operator.runtime.main import run as run_operator

    run_operator()


if __name__ == "__main__":
    run()
