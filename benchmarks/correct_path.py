"""Correct path: ``AlignerRunnable`` correcting one answer vs a bare ``model.generate``.

    python benchmarks/correct_path.py   # --model <folder> (default: the tests' tiny Llama)

Both decode the same prompt to the same number of tokens (checked; the tiny model never emits
EOS, so every call fills its budget). ``runnable_plain`` uses plain ``generate`` inside
(copy drafts and micro-batching off), so its excess over ``bare_generate`` is the plumbing:
parsing, prompt preparation and tokenization, routing, records, child runs. Target: <= 5 %.
``in_call`` measures the same inside each call (invoke time minus the time in
``model.generate`` during it), which machine drift between calls cannot reach.
``runnable_batched_plain`` adds only the micro-batcher (an idle one runs a lone synchronous
call on the caller's thread); ``runnable_default`` is the shipped configuration
(micro-batching, copy drafts on), for reference.

``--workload synthetic`` (default) times the fourth of the harmless :func:`_bench.pairs`;
``harmful`` the first pair of :data:`_bench.HARMFUL` that the model rewrites (all of them are
corrected once to find it; if it keeps them all, the first). A keep-token corrector (the
embedded mini Aligner) keeps a harmless answer with one generated token, so ``synthetic``
then times one prefill and one step, ``harmful`` a generated correction. ``workload`` in the
JSON counts kept and rewritten answers.
"""

from __future__ import annotations

import time
from pathlib import Path

from _bench import (
    HARMFUL,
    add_memory,
    add_workload,
    interleaved,
    median,
    memory_hook,
    model_path,
    outcomes,
    pairs,
    parse,
    parser,
    ratios,
    workload,
    write,
)


def main() -> None:
    p = parser(__doc__ or "", "correct_path.json")
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--calls", type=int, default=3, help="calls of each variant per run")
    add_workload(p)
    add_memory(p)
    args = parse(p)
    started = time.time()

    import torch

    from aligner_chain import AlignerRunnable, RoutingPolicy, TransformersCorrector
    from aligner_chain.correctors.transformers import GenerationSettings

    path = model_path(args.model)
    plain = TransformersCorrector(
        path, generation=GenerationSettings(copy_drafts=False), batching=False
    )
    batched = TransformersCorrector(path, generation=GenerationSettings(copy_drafts=False))
    default = TransformersCorrector(path)
    policy = RoutingPolicy(mode="always", verify_after_correct=False)
    runnable_plain = AlignerRunnable(corrector=plain, policy=policy)
    runnable_batched = AlignerRunnable(corrector=batched, policy=policy)
    runnable_default = AlignerRunnable(corrector=default, policy=policy)

    if args.workload == "synthetic":
        candidates = pairs(4)[3:]
    else:
        candidates = workload(args.workload, len(HARMFUL))
    found = outcomes(plain, candidates)
    pair = candidates[found["first_rewritten"] or 0]
    prepared = plain._prepare(pair)
    inputs = plain._inputs([prepared])
    kwargs = plain._generate_kwargs(prepared.max_new_tokens, inputs["input_ids"].shape[1])
    model = plain.loaded.model
    value = {"question": pair.question, "answer": pair.answer}

    def bare() -> int:
        with torch.inference_mode():
            out = model.generate(**inputs, **kwargs)
        return out.shape[1] - inputs["input_ids"].shape[1]

    n_bare = bare()
    n_runnable = runnable_plain.invoke(value).response_metadata["aligner"]
    correction = plain.correct([pair])[0]
    # same token count: the tiny model never stops early; a model that stops emits EOS too
    stopped = correction.info["finish_reason"] == "stop"
    assert n_bare == correction.info["new_tokens"] + stopped, (n_bare, correction.info)
    assert runnable_default.invoke(value).text == n_runnable["final_answer"]

    timings = interleaved(
        {
            "bare_generate": bare,
            "runnable_plain": lambda: runnable_plain.invoke(value),
            "corrector_plain": lambda: plain.correct([pair]),
            "runnable_batched_plain": lambda: runnable_batched.invoke(value),
            "runnable_default": lambda: runnable_default.invoke(value),
        },
        args.runs,
        calls=args.calls,
        before=memory_hook(args, default),
    )
    figures: dict[str, object] = {
        "workload": {"name": args.workload, **found},
        "kept": bool(correction.info.get("kept")),
        "new_tokens": n_bare,
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "target_overhead_pct": 5.0,
    }
    for clock, times in (("wall", timings.wall), ("cpu", timings.cpu)):
        overhead = [r - 1 for r in ratios(times["runnable_plain"], times["bare_generate"])]
        figures[clock] = {
            "median_s": {k: round(median(v), 4) for k, v in times.items()},
            "runnable_plain_overhead_pct": round(100 * median(overhead), 2),
            "runnable_plain_overhead_pct_per_run": [round(100 * x, 2) for x in overhead],
            "meets_target": median(overhead) <= 0.05,
            "runnable_default_speedup_vs_bare": round(
                median(ratios(times["bare_generate"], times["runnable_default"])), 3
            ),
        }
    # Within one call, so the machine's drift between calls cannot enter: invoke time minus
    # the time spent inside model.generate during that invoke.
    inside: list[float] = []
    real_generate = model.generate

    def timed_generate(*a: object, **k: object) -> object:
        start = time.perf_counter()
        try:
            return real_generate(*a, **k)
        finally:
            inside.append(time.perf_counter() - start)

    model.generate = timed_generate
    in_call = []
    for _ in range(args.runs * args.calls):
        start = time.perf_counter()
        runnable_plain.invoke(value)
        in_call.append((time.perf_counter() - start, inside[-1]))
    del model.generate
    figures["in_call"] = {
        "plumbing_ms": round(1000 * median([t - g for t, g in in_call]), 3),
        "overhead_pct": round(100 * median([t / g - 1 for t, g in in_call]), 2),
        "calls": len(in_call),
    }
    wall = timings.wall
    figures["micro_batcher_lone_call_ms"] = round(
        1000
        * median([b - a for a, b in zip(wall["runnable_plain"], wall["runnable_batched_plain"])]),
        2,
    )
    config = {
        "model": str(args.model or "tiny test Llama"),
        "runs": args.runs,
        "calls": args.calls,
        "workload": args.workload,
        "memory": args.memory,
    }
    write(args.out, figures, config, started)


if __name__ == "__main__":
    main()
