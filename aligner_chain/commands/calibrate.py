"""``aligner-chain calibrate``: fit a routing policy (and a cascade band) to labelled traffic."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import logging
import re
import sys
from pathlib import Path

import numpy as np

from aligner_chain.calibration import (
    LabelledData,
    Target,
    calibrate,
    format_report,
    read_labelled,
    reliability_diagram,
    score_pairs,
)
from aligner_chain.classifiers.base import HarmClassifier
from aligner_chain.errors import ConfigurationError
from aligner_chain.routing import RoutingPolicy

logger = logging.getLogger(__name__)

_IMPORT_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")

SPEC_HELP = (
    "'embedded' (the shipped classifier), 'embedded:DIR' (one trained by train-classifier), "
    "'guard:PATH' (a generative guard model such as Llama Guard), 'judge:MODEL' (an LLM judge, "
    "an init_chat_model spec), 'field:NAME' (scores already "
    "in the data, e.g. from a decision log), "
    "'module:attr' (a HarmClassifier, a factory returning one, or a (question, answer) -> score "
    "function), or a sequence-classifier folder or hub id"
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate",
        help="fit routing bands (and a cascade's uncertain band) to your labelled traffic",
        description=(
            "Reads JSONL lines {question, answer, label} (label 1 = harmful), scores them and "
            "writes a routing policy plus a report beside it: POLICY.report.md, "
            "POLICY.report.json and POLICY.reliability.png. With --second-stage every pair is "
            "also scored by the second stage, to choose the band of first-stage scores worth "
            "escalating within --second-stage-budget."
        ),
    )
    p.add_argument("--data", required=True, type=Path, help="labelled JSONL")
    p.add_argument("--classifier", default="embedded", help=f"first stage: {SPEC_HELP}")
    p.add_argument("--second-stage", help="makes it a cascade; same forms as --classifier")
    target = p.add_mutually_exclusive_group()
    target.add_argument(
        "--target-fpr", type=float, help="max share of safe answers flagged (default 0.05)"
    )
    target.add_argument("--target-recall", type=float, help="min share of harmful answers flagged")
    p.add_argument(
        "--conservative",
        action="store_true",
        help="hold the Wilson 95%% bound of the FPR/recall, not the sample rate, to the target",
    )
    p.add_argument(
        "--second-stage-budget",
        type=float,
        default=0.1,
        help="max share of pairs sent to the second stage (default 0.1)",
    )
    p.add_argument(
        "--recalibrate",
        choices=["none", "platt", "isotonic"],
        default="none",
        help="fit a score map per stage and store it with the policy (recommended for cascades)",
    )
    p.add_argument("--reask-precision", type=float, help="set reask_at where precision >= this")
    p.add_argument("--refuse-precision", type=float, help="set refuse_at where precision >= this")
    p.add_argument(
        "--holdout", type=float, default=0.0, help="share of the data kept out to report on"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the holdout split")
    p.add_argument("--policy", type=Path, help="start from this policy (other settings kept)")
    p.add_argument("--batch-size", type=int, default=64, help="pairs per classifier call")
    p.add_argument("--out", required=True, type=Path, help="the policy file (.yaml or .json)")
    p.set_defaults(func=run)


def load_classifier(spec: str) -> HarmClassifier:
    """A classifier from a command-line spec: the forms of
    :func:`~aligner_chain.env.classifier_from_spec` plus ``embedded:DIR`` and ``module:attr``."""
    from aligner_chain.classifiers import RunnableClassifier
    from aligner_chain.env import classifier_from_spec

    prefix = spec.split(":", 1)[0]
    if prefix == "embedded" and spec != "embedded":
        from aligner_chain.classifiers.embedded import EmbeddedClassifier

        return EmbeddedClassifier(spec.removeprefix("embedded:"))
    if prefix not in ("judge", "guard") and _IMPORT_SPEC.match(spec) and not Path(spec).exists():
        module, attr = spec.split(":")
        try:
            obj = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigurationError(f"cannot import classifier {spec!r}: {exc}") from exc
        if isinstance(obj, HarmClassifier):
            return obj
        if (
            callable(obj)
            and not isinstance(obj, type)
            and len(inspect.signature(obj).parameters) == 2
        ):
            return RunnableClassifier(obj, classifier_id=spec)
        made = obj() if callable(obj) else obj
        if not isinstance(made, HarmClassifier):
            raise ConfigurationError(f"{spec} is not a HarmClassifier, factory or judge function")
        return made
    classifier = classifier_from_spec(spec)
    if classifier is None:
        raise ConfigurationError("calibration needs a classifier ('none' has no scores)")
    return classifier


def _field(spec: str | None) -> str | None:
    return spec.removeprefix("field:") if spec and spec.startswith("field:") else None


def _scores(spec: str, data: LabelledData, batch_size: int) -> np.ndarray:
    name = _field(spec)
    if name is not None:
        return data.fields[name]
    classifier = load_classifier(spec)
    logger.info("scoring %d pairs with %s", len(data.pairs), classifier.classifier_id)
    return score_pairs(classifier, data.pairs, batch_size)


def run(args: argparse.Namespace) -> int:
    fields = [f for f in (_field(args.classifier), _field(args.second_stage)) if f]
    data = read_labelled(args.data, fields)
    base = RoutingPolicy.load(args.policy) if args.policy else None  # fail before scoring
    if args.target_recall is not None:
        target = Target("recall", args.target_recall)
    else:
        target = Target("fpr", 0.05 if args.target_fpr is None else args.target_fpr)
    first = _scores(args.classifier, data, args.batch_size)
    second = _scores(args.second_stage, data, args.batch_size) if args.second_stage else None
    result = calibrate(
        data.labels,
        first,
        second=second,
        target=target,
        budget=args.second_stage_budget,
        recalibrate=args.recalibrate,
        reask_precision=args.reask_precision,
        refuse_precision=args.refuse_precision,
        holdout=args.holdout,
        seed=args.seed,
        base=base,
        conservative=args.conservative,
    )
    result.report["data"] = str(args.data)
    result.policy.save(args.out)
    stem = args.out.with_suffix("")
    text = format_report(result.report)
    Path(f"{stem}.report.md").write_text(text, encoding="utf-8")
    Path(f"{stem}.report.json").write_text(result.to_json() + "\n", encoding="utf-8")
    written = [str(args.out), f"{stem}.report.md", f"{stem}.report.json"]
    if importlib.util.find_spec("matplotlib") is None:
        print(
            "aligner-chain: no reliability diagram: pip install 'aligner-chain[report]'",
            file=sys.stderr,
        )
    else:
        reliability_diagram(f"{stem}.reliability.png", result.curves, result.labels)
        written.append(f"{stem}.reliability.png")
    print(text, end="")
    print(f"wrote {', '.join(written)}", file=sys.stderr)
    return 0
