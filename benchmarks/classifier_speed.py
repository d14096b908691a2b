"""Speed, memory and AUROC of the embedded classifier: fp32 vs the int8 fast path.

    python benchmarks/classifier_speed.py   # --data-dir ../shared/data --threads 1 --out <json>

Each variant runs in its own process on pairs sampled by the parent, so its peak RSS is the
classifier's (plus the sampled pairs), not the data loader's. Pairs come from the held-out
test splits (response-level sources with human or judge labels), limited to <= 256 tokens for
the speed figures; AUROC uses all sampled pairs at full length (long answers are windowed).
Not a test: numbers depend on the machine and on what else runs on it (the load average is
recorded next to them; CPU milliseconds per pair are less sensitive to other processes than
wall-clock rates).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _bench import held_out

LABELLED = (
    "gptfuzz",
    "jailbreakbench",
    "diasafety",
    "llm_self_defense",
    "openai_rbr_gold",
    "safe_rlhf_mini",
    "coconot_contrast",
    "benign_instructions",
)


def _sample(data_dir: Path, n: int, seed: int) -> list[tuple[str, str, int]]:
    test = held_out(data_dir, seed, lambda ex: ex.source in LABELLED)
    return [(ex.question, ex.answer, int(ex.label or 0)) for ex in test[:n]]


def _variant(args: argparse.Namespace) -> dict[str, object]:
    import torch

    from aligner_chain.classifiers.embedded import EmbeddedClassifier
    from aligner_chain.training.train_classifier import auroc
    from aligner_chain.types import QAPair

    torch.set_num_threads(args.threads)
    rows = [tuple(r) for r in json.loads(args.sample.read_text())]
    clf = EmbeddedClassifier(quantize=args.variant, batch_size=args.batch_size)
    tok = clf.loaded.encoder.tokenizer

    def n_tokens(q: str, a: str) -> int:
        return len(tok(q, a, verbose=False)["input_ids"])

    short = [QAPair(q, a) for q, a, _ in rows if n_tokens(q, a) <= 256][: args.speed_pairs]
    lengths = [n_tokens(p.question, p.answer) for p in short]
    clf.classify(short[:8])  # warm-up
    batched, cpu_ms = [], []
    for _ in range(args.runs):
        t, c = time.perf_counter(), time.process_time()
        clf.classify(short)
        batched.append(len(short) / (time.perf_counter() - t))
        cpu_ms.append((time.process_time() - c) * 1000 / len(short))
    singles = []
    for _ in range(args.runs):
        for pair in short[: args.single_pairs]:
            t = time.perf_counter()
            clf.classify([pair])
            singles.append((time.perf_counter() - t) * 1000)
    scores = [v.score for v in clf.classify([QAPair(q, a) for q, a, _ in rows])]
    return {
        "variant": args.variant,
        "torch_threads": torch.get_num_threads(),
        "speed_pairs": len(short),
        "tokens_mean": round(statistics.mean(lengths), 1),
        "tokens_max": max(lengths),
        "pairs_per_s_batched_median": round(statistics.median(batched), 1),
        "cpu_ms_per_pair_batched_median": round(statistics.median(cpu_ms), 2),
        "single_pair_ms_median": round(statistics.median(singles), 2),
        "single_pair_ms_p90": round(sorted(singles)[int(0.9 * len(singles))], 2),
        "single_pair_timings": len(singles),
        "auroc_pairs": len(rows),
        "auroc": round(auroc(scores, [y for *_, y in rows]), 4),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def _machine() -> dict[str, object]:
    import torch
    import transformers

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "aligner_chain_commit": commit,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "classifier_speed.json"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 when shared)")
    parser.add_argument("--pairs", type=int, default=600, help="labelled pairs for AUROC")
    parser.add_argument("--speed-pairs", type=int, default=256, help="pairs for throughput")
    parser.add_argument("--single-pairs", type=int, default=40, help="pairs timed one by one")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variant", choices=["none", "int8"], help=argparse.SUPPRESS)
    parser.add_argument("--sample", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(_variant(args)))
        return
    result: dict[str, object] = {"machine": _machine()}
    with tempfile.TemporaryDirectory() as tmp:
        sample = Path(tmp) / "pairs.json"
        sample.write_text(json.dumps(_sample(args.data_dir, args.pairs, args.seed)))
        for variant in ("none", "int8"):
            cmd = [sys.executable, __file__, "--variant", variant, "--sample", str(sample)]
            for name in ("speed_pairs", "single_pairs", "runs", "batch_size", "threads"):
                cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            key = "fp32" if variant == "none" else "int8"
            result[key] = json.loads(proc.stdout.splitlines()[-1])
    result["machine"]["load_average_1m_after"] = round(os.getloadavg()[0], 2)  # type: ignore[index]
    fp32, int8 = result["fp32"], result["int8"]
    result["auroc_loss_int8"] = round(fp32["auroc"] - int8["auroc"], 4)  # type: ignore[index]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
