"""``aligner-chain correct``: run the whole step on one (question, answer) pair."""

from __future__ import annotations

import argparse
import json

from aligner_chain.env import build_aligner
from aligner_chain.errors import InputError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "correct",
        help="classify, route and correct one answer",
        description="Prints the final answer, or with --json the whole decision record.",
    )
    p.add_argument("--question", "-q", required=True, help="the user's question")
    p.add_argument("--answer", "-a", required=True, help="the upstream model's answer")
    p.add_argument(
        "--model", help="corrector: local folder or hub id (default: the embedded mini Aligner)"
    )
    p.add_argument(
        "--corrector-url", help="an OpenAI-compatible server serving --model (e.g. vLLM)"
    )
    p.add_argument(
        "--classifier",
        default="embedded",
        help="'embedded' (default), 'none' (correct every answer: the paper's setting), "
        "'judge:<init_chat_model spec>', 'guard:<model>', or a sequence-classifier folder or id",
    )
    p.add_argument("--template", help="prompt preset name or format string")
    p.add_argument("--policy", help="routing policy file (.yaml or .json)")
    p.add_argument("--json", action="store_true", help="print the decision record as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    for name in ("question", "answer"):
        if not getattr(args, name).strip():
            raise InputError(f"--{name} is empty")
    step = build_aligner(
        classifier=args.classifier,
        model=args.model,
        url=args.corrector_url,
        policy=args.policy,
        template=args.template,
    )
    message = step.invoke({"question": args.question, "answer": args.answer})
    if args.json:
        print(json.dumps(message.response_metadata["aligner"], indent=2, ensure_ascii=False))
    else:
        print(message.text)
    return 0
