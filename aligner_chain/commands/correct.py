"""``aligner-chain correct``: run the whole step on one (question, answer) pair."""

from __future__ import annotations

import argparse
import json

from aligner_chain.classifiers.base import HarmClassifier
from aligner_chain.classifiers.sequence import SequenceClassifier
from aligner_chain.correctors.transformers import TransformersCorrector
from aligner_chain.defaults import default_classifier, default_corrector
from aligner_chain.errors import InputError
from aligner_chain.routing import RoutingPolicy
from aligner_chain.runnable import AlignerRunnable


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
        "--classifier",
        default="embedded",
        help="'embedded' (default), a sequence-classifier folder or hub id, or 'none' to "
        "correct every answer (the paper's setting)",
    )
    p.add_argument("--template", help="prompt preset name or format string")
    p.add_argument("--policy", help="routing policy file (.yaml or .json)")
    p.add_argument("--json", action="store_true", help="print the decision record as JSON")
    p.set_defaults(func=run)


def _classifier(spec: str) -> HarmClassifier | None:
    if spec == "none":
        return None
    if spec == "embedded":
        return default_classifier()
    return SequenceClassifier(spec)


def run(args: argparse.Namespace) -> int:
    for name in ("question", "answer"):
        if not getattr(args, name).strip():
            raise InputError(f"--{name} is empty")
    policy = RoutingPolicy.load(args.policy) if args.policy else RoutingPolicy()
    classifier = _classifier(args.classifier)
    if classifier is None:
        policy = policy.model_copy(update={"mode": "always"})
    corrector = (
        TransformersCorrector(args.model, template=args.template)
        if args.model
        else default_corrector()
    )
    step = AlignerRunnable(classifier=classifier, corrector=corrector, policy=policy)
    message = step.invoke({"question": args.question, "answer": args.answer})
    if args.json:
        print(json.dumps(message.response_metadata["aligner"], indent=2, ensure_ascii=False))
    else:
        print(message.text)
    return 0
