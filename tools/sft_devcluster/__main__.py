"""``python -m sft_devcluster up|down|status|import-image|stop|start|restart`` (same as ``sftctl dev-cluster``)."""

import argparse
import sys

from . import add_subparser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sft_devcluster")
    add_subparser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["dev-cluster", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
