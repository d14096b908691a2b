"""Concurrency: 32 concurrent ``ainvoke`` calls through the micro-batcher vs sequential awaits.

    python benchmarks/concurrency.py   # --model <folder> (default: the tests' tiny Llama)

Each call corrects one answer (``mode="always"``). Concurrent calls are coalesced by the
corrector's :class:`~aligner_chain.batching.MicroBatcher` into shared ``generate`` calls of up
to ``max_batch_size`` pairs; sequential awaits decode one answer at a time, with copy drafts as
shipped (``sequential``) and without (``sequential_plain``). Outputs must be identical.
Target: >= 3x throughput. ``--workload harmful`` corrects :data:`_bench.HARMFUL` (in turn)
instead of the harmless :func:`_bench.pairs`, which a keep-token corrector keeps with one token
each; ``workload`` in the JSON counts kept and rewritten answers.
"""

from __future__ import annotations

import asyncio
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
    p = parser(__doc__ or "", "concurrency.json")
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--callers", type=int, default=32)
    p.add_argument("--max-batch-size", type=int, default=None, help="default: BatchingConfig's")
    add_workload(p)
    add_memory(p)
    args = parse(p)
    started = time.time()

    from aligner_chain import AlignerRunnable, RoutingPolicy, TransformersCorrector
    from aligner_chain.batching import BatchingConfig
    from aligner_chain.correctors.transformers import GenerationSettings

    batching = (
        BatchingConfig(max_batch_size=args.max_batch_size)
        if args.max_batch_size
        else BatchingConfig()
    )
    path = model_path(args.model)
    policy = RoutingPolicy(mode="always", verify_after_correct=False)
    corrector = TransformersCorrector(path, batching=batching)
    runnable = AlignerRunnable(corrector=corrector, policy=policy)
    plain = AlignerRunnable(
        corrector=TransformersCorrector(
            path, generation=GenerationSettings(copy_drafts=False), batching=batching
        ),
        policy=policy,
    )
    measured = workload(args.workload, args.callers)
    values = [{"question": q.question, "answer": q.answer} for q in measured]

    async def concurrent() -> list[str]:
        return [m.text for m in await asyncio.gather(*(runnable.ainvoke(v) for v in values))]

    async def sequential(r: AlignerRunnable = runnable) -> list[str]:
        return [(await r.ainvoke(v)).text for v in values]

    stats = corrector.batcher.stats
    expected = asyncio.run(sequential())
    assert asyncio.run(sequential(plain)) == expected, "outputs differ"
    before = stats.batches
    assert asyncio.run(concurrent()) == expected, "outputs differ"
    coalesced = args.callers / (stats.batches - before)
    timings = interleaved(
        {
            "sequential": lambda: asyncio.run(sequential()),
            "concurrent": lambda: asyncio.run(concurrent()),
            "sequential_plain": lambda: asyncio.run(sequential(plain)),
        },
        args.runs,
        before=memory_hook(args, corrector),
    )
    figures: dict[str, object] = {
        "callers": args.callers,
        "concurrent_items_per_generate_call": round(coalesced, 2),
        "identical_outputs": True,
        "workload": {"name": args.workload, **outcomes(corrector, measured)},
    }
    for clock, times in (("wall", timings.wall), ("cpu", timings.cpu)):
        speedups = ratios(times["sequential"], times["concurrent"])
        figures[clock] = {
            "median_s": {k: round(median(v), 3) for k, v in times.items()},
            "speedup": round(median(speedups), 3),
            "speedup_per_run": [round(x, 3) for x in speedups],
            "speedup_vs_plain_sequential": round(
                median(ratios(times["sequential_plain"], times["concurrent"])), 3
            ),
        }
    figures["target_speedup"] = 3.0
    config = {
        "model": str(args.model or "tiny test Llama"),
        "runs": args.runs,
        "threads": args.threads,
        "batching": batching.model_dump(),
        "workload": args.workload,
        "memory": args.memory,
    }
    write(args.out, figures, config, started)


if __name__ == "__main__":
    main()
