"""The ``deltasparse`` command line: ``demo``, ``train``, ``eval``, ``stream``, ``bench``, ``report``."""

from __future__ import annotations

import argparse
import logging
import sys

from . import __version__

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deltasparse",
        description="Train networks for temporal activation sparsity (Delta Activation Layer) "
        "and run them as exact delta inference on streams.",
    )
    p.add_argument("--version", action="version", version=f"deltasparse {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    p.add_subparsers(dest="command", metavar="COMMAND")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    if args.command is None:
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
