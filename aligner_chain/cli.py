"""The ``aligner-chain`` console script.

Exit codes: 0 success, 1 the answer was refused or a model failed, 2 bad usage or input
(empty text, missing model path, invalid policy file).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from aligner_chain.commands import COMMANDS
from aligner_chain.errors import AlignerError, ConfigurationError, InputError, ModelLoadError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aligner-chain",
        description="Classify, route and correct LLM answers with an Aligner model.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"aligner_chain.commands.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except (InputError, ConfigurationError, ModelLoadError) as exc:
        print(f"aligner-chain: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except AlignerError as exc:
        print(f"aligner-chain: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
