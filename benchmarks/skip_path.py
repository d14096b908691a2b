"""Skip path: what the Aligner step adds to a chain when the classifier lets the answer through.

    python benchmarks/skip_path.py   # --calls 500 --runs 5

The same chain (question -> fake chat model -> {question, answer}) is timed with and without an
``AlignerRunnable`` at its end, call by call in turns (median per call, per run). The
classifier is a rule returning 0.0, so the answer is always skipped; its own time
(``classifier.invoke`` of one pair, timed in the same turns) is subtracted. What is left is the
plumbing: parsing, routing, records, child runs, the output message. Target: <= 1 ms per call.
Wall clock and CPU time are both reported; on a loaded machine CPU time is the steadier one.
"""

from __future__ import annotations

import time
from operator import itemgetter

from _bench import interleaved, median, parse, parser, write

ANSWER = "Mix flour, water, yeast and salt, knead, let it rise for an hour, then bake at 220 C."


def main() -> None:
    p = parser(__doc__ or "", "skip_path.json")
    p.add_argument("--calls", type=int, default=500, help="calls of each variant per run")
    args = parse(p)
    started = time.time()

    from langchain_core.language_models.fake_chat_models import FakeListChatModel
    from langchain_core.runnables import RunnablePassthrough

    from aligner_chain import AlignerRunnable, QAPair, RunnableClassifier
    from aligner_chain.correctors.base import Corrector

    class UnusedCorrector(Corrector):
        """The skip path must never reach the corrector."""

        def correct(self, pairs):  # type: ignore[no-untyped-def]
            raise AssertionError("skip path called the corrector")

    classifier = RunnableClassifier(lambda q, a: 0.0)
    llm = FakeListChatModel(responses=[ANSWER])
    unguarded = RunnablePassthrough.assign(answer=itemgetter("question") | llm)
    aligner = AlignerRunnable(classifier=classifier, corrector=UnusedCorrector())
    guarded = unguarded | aligner
    question = {"question": "How do I bake bread?"}
    pair = [QAPair(question["question"], ANSWER)]
    assert guarded.invoke(question).response_metadata["aligner"]["route"] == "skip"

    timings = interleaved(
        {
            "unguarded": lambda: unguarded.invoke(question),
            "guarded": lambda: guarded.invoke(question),
            "classifier_alone": lambda: classifier.invoke(pair),
        },
        args.runs,
        calls=args.calls,
    )
    figures: dict[str, object] = {"target_ms": 1.0}
    for clock, times in (("wall", timings.wall), ("cpu", timings.cpu)):
        ms = {k: [t * 1000 for t in v] for k, v in times.items()}
        plumbing = [
            g - u - c for g, u, c in zip(ms["guarded"], ms["unguarded"], ms["classifier_alone"])
        ]
        figures[clock] = {
            **{f"{k}_ms_per_call": round(median(v), 4) for k, v in ms.items()},
            "plumbing_overhead_ms_per_call": round(median(plumbing), 4),
            "plumbing_overhead_ms_per_run": [round(x, 4) for x in plumbing],
            "meets_target": median(plumbing) <= 1.0,
        }
    write(args.out, figures, {"calls": args.calls, "runs": args.runs}, started)


if __name__ == "__main__":
    main()
