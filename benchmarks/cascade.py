"""Cascade vs the second stage alone: throughput and share of pairs escalated at the fitted band.

    python benchmarks/cascade.py --data-dir ../shared/data --out benchmarks/results/cascade.json

Pairs are the held-out test split of the embedded classifier's data mix (sources with absolute
response labels). Half of them fit the policy with ``aligner.calibration.calibrate`` (target
FPR, isotonic maps, second-stage budget), the other half measure it: recall/FPR of each stage
alone and of the cascade (Wilson 95%), the share escalated, and pairs per second of the cascade
against the second stage alone, timed interleaved over ``--runs`` runs.

The first stage is the shipped embedded classifier (``--first`` takes any ``calibrate`` spec).
With no GPU here, the default second stage is *simulated*: it knows the labels, errs on
``--second-error`` of the pairs, and sleeps ``--second-call-ms + n * --second-pair-ms`` per
call, a stand-in for a large guard behind an endpoint. Pass ``--second guard:PATH`` (or any
spec) to measure a real one. Not a test: figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from _bench import held_out  # noqa: E402

from aligner_chain import CascadeClassifier, HarmClassifier, QAPair, Verdict  # noqa: E402
from aligner_chain.calibration import Target, calibrate, score_pairs  # noqa: E402
from aligner_chain.commands.calibrate import load_classifier  # noqa: E402


class SimulatedGuard(HarmClassifier):
    """A large guard model's stand-in: label-informed scores and a per-call sleep."""

    classifier_id = "simulated-guard"

    def __init__(
        self, labels: dict[QAPair, int], error: float, call_s: float, pair_s: float
    ) -> None:
        self.labels, self.error, self.call_s, self.pair_s = labels, error, call_s, pair_s
        self.sleep = True

    def classify(self, pairs: Sequence[QAPair]) -> list[Verdict]:
        if self.sleep and pairs:
            time.sleep(self.call_s + self.pair_s * len(pairs))
        out = []
        for p in pairs:
            digest = hashlib.sha256(f"{p.question}\0{p.answer}".encode()).digest()
            u, jitter = digest[0] / 256, digest[1] / 256
            harmful = bool(self.labels[p]) != (u < self.error)
            score = (0.85 if harmful else 0.05) + 0.1 * jitter
            out.append(Verdict(score=score, classifier_id=self.classifier_id))
        return out


def sample(data_dir: Path, n: int, seed: int) -> tuple[list[QAPair], list[int]]:
    test = held_out(data_dir, seed, lambda ex: ex.label is not None and ex.rank_group is None)
    test = test[:n]
    return [QAPair(ex.question, ex.answer) for ex in test], [int(ex.label or 0) for ex in test]


def per_second(classifier: HarmClassifier, pairs: list[QAPair], batch: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(pairs), batch):
        classifier.classify(pairs[i : i + batch])
    return len(pairs) / (time.perf_counter() - start)


def interval(estimate: Any) -> list[float]:
    return [round(estimate.value, 4), round(estimate.low, 4), round(estimate.high, 4)]


def brief(stats: dict[str, Any]) -> dict[str, list[float]]:
    """Recall, FPR and precision of one configuration: value and Wilson 95% interval."""
    return {k: interval(stats[k]) for k in ("recall", "fpr", "precision")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--pairs", type=int, default=2000, help="labelled pairs (half fit, half test)")
    p.add_argument("--first", default="embedded", help="first stage (a calibrate spec)")
    p.add_argument("--second", help="second stage (a calibrate spec); default: simulated")
    p.add_argument("--second-error", type=float, default=0.03)
    p.add_argument("--second-call-ms", type=float, default=25.0)
    p.add_argument("--second-pair-ms", type=float, default=15.0)
    p.add_argument("--budget", type=float, default=0.2, help="max share sent to the 2nd stage")
    p.add_argument("--target-fpr", type=float, default=0.05)
    p.add_argument("--conservative", action="store_true", help="see calibrate --conservative")
    p.add_argument("--batch", type=int, default=32, help="pairs per request")
    p.add_argument("--timed-pairs", type=int, default=500, help="pairs per timed run")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: no spinning on a loaded box)"
    )
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cascade.json")
    args = p.parse_args()
    started = time.time()

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)

    pairs, labels = sample(args.data_dir, args.pairs, args.seed)
    first = load_classifier(args.first)
    if args.second:
        second: HarmClassifier = load_classifier(args.second)
        simulated = None
    else:
        second = simulated = SimulatedGuard(
            dict(zip(pairs, labels)),
            args.second_error,
            args.second_call_ms / 1000,
            args.second_pair_ms / 1000,
        )
        simulated.sleep = False  # scoring for the fit need not wait
    s1 = score_pairs(first, pairs, args.batch)
    s2 = score_pairs(second, pairs, args.batch)
    result = calibrate(
        np.asarray(labels),
        s1,
        second=s2,
        target=Target("fpr", args.target_fpr),
        budget=args.budget,
        recalibrate="isotonic",
        holdout=0.5,
        seed=args.seed,
        conservative=args.conservative,
    )
    report, band = result.report, result.policy.calibration.cascade_band
    if simulated is not None:
        simulated.sleep = True

    timed = pairs[: args.timed_pairs]
    cascade = CascadeClassifier(first, second, band=band) if band else first
    variants = {"second_alone": second, "cascade": cascade, "first_alone": first}
    speeds: dict[str, list[float]] = {name: [] for name in variants}
    for run in range(args.runs):  # interleaved, alternating order, so load drift hits all
        for name in list(variants)[:: 1 if run % 2 == 0 else -1]:
            speeds[name].append(per_second(variants[name], timed, args.batch))
    median = {k: statistics.median(v) for k, v in speeds.items()}
    escalated = sum(v.stage == "second" for v in cascade.classify(timed)) / len(timed)

    figures = {
        "pairs": {"fit": report["n_fit"], "evaluated": report["n_evaluated"], "timed": len(timed)},
        "harmful_share": round(report["harmful_share"], 4),
        "target_fpr": args.target_fpr,
        "conservative": args.conservative,
        "budget": args.budget,
        "band": band,
        "correct_at": report["thresholds"]["correct_at"],
        "escalated_share_evaluated": interval(report["escalated"]),
        "escalated_share_timed": round(escalated, 4),
        "pairs_per_second": {k: round(v, 1) for k, v in median.items()},
        "cascade_speedup_vs_second_alone": round(median["cascade"] / median["second_alone"], 2),
        "quality_on_held_out": {
            "cascade": brief(report),
            "first_alone": brief(report["alone"]["first"]),
            "second_alone": brief(report["alone"]["second"]),
        },
    }
    config = {
        "first": first.classifier_id,
        "second": second.classifier_id
        if simulated is None
        else f"simulated: error {args.second_error}, {args.second_call_ms} ms/call + "
        f"{args.second_pair_ms} ms/pair",
        "batch": args.batch,
        "torch_threads": args.threads,
        "runs": args.runs,
        "seed": args.seed,
    }
    payload = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.time() - started, 1),
        "cores": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "config": config,
        "figures": figures,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
