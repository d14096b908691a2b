"""Batching: ``AlignerRunnable.batch`` of 16 answers vs 16 sequential ``invoke`` calls.

    python benchmarks/batch_throughput.py   # --model <folder> (default: the tests' tiny Llama)

Every answer is corrected (``mode="always"``); the batch runs one pipeline, so the corrector
sees the 16 pairs in one call (the micro-batcher never splits one caller's batch).
``default`` is the shipped corrector (micro-batching, copy drafts for single answers and
batches); ``plain`` has both off, so its calls are plain ``generate``. Target: >= 3x
throughput for the batch. ``plain_batch`` / ``default_batch`` is what copy drafts gain in a
batch. ``--workload harmful`` corrects :data:`_bench.HARMFUL` instead of the harmless
:func:`_bench.pairs`, which a keep-token corrector keeps with one token each; ``workload`` in
the JSON counts kept and rewritten answers.
"""

from __future__ import annotations

import time
from pathlib import Path

from _bench import (
    add_memory,
    add_workload,
    interleaved,
    median,
    memory_hook,
    model_path,
    outcomes,
    parse,
    parser,
    ratios,
    workload,
    write,
)


def main() -> None:
    p = parser(__doc__ or "", "batch_throughput.json")
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--size", type=int, default=16, help="answers per batch")
    add_workload(p)
    add_memory(p)
    args = parse(p)
    started = time.time()

    from aligner_chain import AlignerRunnable, RoutingPolicy, TransformersCorrector
    from aligner_chain.correctors.transformers import GenerationSettings

    path = model_path(args.model)
    policy = RoutingPolicy(mode="always", verify_after_correct=False)
    corrector = TransformersCorrector(path)
    runnables = {
        "default": AlignerRunnable(corrector=corrector, policy=policy),
        "plain": AlignerRunnable(
            corrector=TransformersCorrector(
                path, generation=GenerationSettings(copy_drafts=False), batching=False
            ),
            policy=policy,
        ),
    }
    measured = workload(args.workload, args.size)
    values = [{"question": q.question, "answer": q.answer} for q in measured]
    outputs = {name: [m.text for m in r.batch(values)] for name, r in runnables.items()}
    assert outputs["default"] == outputs["plain"]
    assert outputs["default"] == [runnables["default"].invoke(v).text for v in values]

    variants = {}
    for name, r in runnables.items():
        variants[f"{name}_sequential"] = lambda r=r: [r.invoke(v) for v in values]
        variants[f"{name}_batch"] = lambda r=r: r.batch(values)
    timings = interleaved(variants, args.runs, before=memory_hook(args, corrector))
    figures: dict[str, object] = {
        "answers": args.size,
        "identical_outputs": True,
        "workload": {"name": args.workload, **outcomes(corrector, measured)},
    }
    for clock, times in (("wall", timings.wall), ("cpu", timings.cpu)):
        figures[clock] = {
            "median_s": {k: round(median(v), 3) for k, v in times.items()},
            **{
                f"speedup_{name}": round(
                    median(ratios(times[f"{name}_sequential"], times[f"{name}_batch"])), 3
                )
                for name in runnables
            },
            "speedup_copy_drafts_in_batch": round(
                median(ratios(times["plain_batch"], times["default_batch"])), 3
            ),
        }
    figures["target_speedup"] = 3.0
    config = {
        "model": str(args.model or "tiny test Llama"),
        "runs": args.runs,
        "threads": args.threads,
        "workload": args.workload,
        "memory": args.memory,
    }
    write(args.out, figures, config, started)


if __name__ == "__main__":
    main()
