"""``aligner-chain export``: turn a correction log into training data (JSONL)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

from aligner_chain.errors import InputError
from aligner_chain.store import CorrectionStore
from aligner_chain.training.data import FORMATS, export_row, write_jsonl


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a correction log as DPO, SFT or Q-A-C training data",
        description=(
            "dpo: prompt/chosen/rejected (chosen = accepted correction, rejected = original), "
            "for TRL's DPOTrainer. sft: prompt/completion with the corrections. qac: "
            "question/answer/correction for `aligner-chain train`; answers judged safe are "
            "kept as copies."
        ),
    )
    parser.add_argument("--db", required=True, type=Path, help="the correction log (SQLite)")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--out", required=True, type=Path, help="the JSONL file to write")
    parser.add_argument("--since", help="only decisions created at or after this ISO-8601 time")
    parser.add_argument("--until", help="only decisions created before this ISO-8601 time")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.db.is_file():  # opening a missing path would create an empty log
        raise InputError(f"{args.db}: no such correction log")
    with CorrectionStore(args.db) as store:
        total = 0

        def rows() -> Iterator[dict[str, str]]:  # counts what it reads, for the summary
            nonlocal total
            for stored in store.decisions(since=args.since, until=args.until):
                total += 1
                row = export_row(stored.record, args.format)
                if row is not None:
                    yield row

        written = write_jsonl(rows(), args.out)
    print(
        f"wrote {written} {args.format} rows to {args.out} "
        f"({total - written} of {total} decisions carry no usable {args.format} example)",
        file=sys.stderr,
    )
    return 0
