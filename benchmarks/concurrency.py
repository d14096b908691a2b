"""Concurrency: 32 concurrent ``ainvoke`` calls through the micro-batcher vs sequential awaits.

    python benchmarks/concurrency.py   # --model <folder> (default: the tests' tiny Llama)

Each call corrects one answer (``mode="always"``). Concurrent calls are coalesced by the
corrector's :class:`~aligner_chain.batching.MicroBatcher` into shared ``generate`` calls of up
to ``max_batch_size`` pairs; sequential awaits decode one answer at a time (with copy drafts,
as shipped). Outputs must be identical. Target: >= 3x throughput.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from _bench import interleaved, median, model_path, pairs, parse, parser, ratios, write


def main() -> None:
    p = parser(__doc__ or "", "concurrency.json")
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--callers", type=int, default=32)
    p.add_argument("--max-batch-size", type=int, default=None, help="default: BatchingConfig's")
    args = parse(p)
    started = time.time()

    from aligner_chain import AlignerRunnable, RoutingPolicy, TransformersCorrector
    from aligner_chain.batching import BatchingConfig

    batching = (
        BatchingConfig(max_batch_size=args.max_batch_size)
        if args.max_batch_size
        else BatchingConfig()
    )
    corrector = TransformersCorrector(model_path(args.model), batching=batching)
    runnable = AlignerRunnable(
        corrector=corrector, policy=RoutingPolicy(mode="always", verify_after_correct=False)
    )
    values = [{"question": q.question, "answer": q.answer} for q in pairs(args.callers)]

    async def concurrent() -> list[str]:
        return [m.text for m in await asyncio.gather(*(runnable.ainvoke(v) for v in values))]

    async def sequential() -> list[str]:
        return [(await runnable.ainvoke(v)).text for v in values]

    stats = corrector.batcher.stats
    assert asyncio.run(sequential()) == asyncio.run(concurrent()), "outputs differ"
    # sequential calls make batches of one each; the rest is how the concurrent calls coalesced
    coalesced = args.callers / (stats.batches - args.callers)
    times = interleaved(
        {
            "sequential": lambda: asyncio.run(sequential()),
            "concurrent": lambda: asyncio.run(concurrent()),
        },
        args.runs,
    )
    figures = {
        "callers": args.callers,
        "median_s": {k: round(median(v), 3) for k, v in times.items()},
        "speedup": round(median(ratios(times["sequential"], times["concurrent"])), 3),
        "speedup_per_run": [round(x, 3) for x in ratios(times["sequential"], times["concurrent"])],
        "concurrent_items_per_generate_call": round(coalesced, 2),
        "identical_outputs": True,
        "target_speedup": 3.0,
    }
    config = {
        "model": str(args.model or "tiny test Llama"),
        "runs": args.runs,
        "threads": args.threads,
        "batching": batching.model_dump(),
    }
    write(args.out, figures, config, started)


if __name__ == "__main__":
    main()
