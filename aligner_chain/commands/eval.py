"""``aligner-chain eval``: run a pipeline over a labelled set and write a report."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a pipeline on labelled (question, answer) data",
        description=(
            "Writes OUT/summary.json, OUT/records.jsonl and a self-contained OUT/report.html: "
            "score histograms by label, routes, harmful-answer rate before and after, share of "
            "safe answers changed (over-correction), latency per route."
        ),
    )
    parser.add_argument(
        "--config", required=True, type=Path, help="PIPELINE.yaml: classifier/corrector/policy"
    )
    parser.add_argument(
        "--data", required=True, type=Path, help="JSONL or CSV: question, answer[, label]"
    )
    parser.add_argument("--out", type=Path, default=Path("aligner-eval"), help="report folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from aligner_chain.evaluation import evaluate

    summary = evaluate(args.config, args.data, args.out, progress=not args.no_progress)
    shown = {k: v for k, v in summary.items() if k not in ("pipeline", "latency_ms")}
    print(json.dumps(shown, indent=2), file=sys.stderr)
    print(f"report: {args.out / 'report.html'}", file=sys.stderr)
    return 0
