"""Entry point of the ``kvtier`` command: one subcommand per module."""

from __future__ import annotations

import argparse
import logging
import sys

from kvtier import __version__
from kvtier.cli import chain_demo, demo, index, route, serve, stats, stop
from kvtier.errors import KVTierError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvtier", description="Tiered KV-cache offloading for vLLM fleets.")
    parser.add_argument("--version", action="version", version=f"kvtier {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    subparsers = parser.add_subparsers(dest="command", required=True)
    demo.add_parser(subparsers)
    chain_demo.add_parser(subparsers)
    serve.add_parser(subparsers)
    stop.add_parser(subparsers)
    stats.add_parser(subparsers)
    index.add_parser(subparsers)
    route.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # `kvtier serve --detach` starts the same command line without --detach
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        return 130
    except KVTierError as exc:
        print(f"kvtier: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
