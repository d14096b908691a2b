"""Skip path: what the Aligner step adds to a chain when the classifier lets the answer through.

    python benchmarks/skip_path.py   # --calls 300 --runs 7

The same chain (question -> fake chat model -> {question, answer}) is timed with and without an
``AlignerRunnable`` at its end; the classifier is a rule returning 0.0, so the answer is always
skipped. The classifier's own time (``classifier.invoke`` of one pair, in the same run) is
subtracted: what is left is the plumbing (parsing, routing, records, child runs, the output
message). Target: <= 1 ms per call.
"""

from __future__ import annotations

import time
from operator import itemgetter

from _bench import interleaved, median, parse, parser, write

ANSWER = "Mix flour, water, yeast and salt, knead, let it rise for an hour, then bake at 220 C."


def main() -> None:
    p = parser(__doc__ or "", "skip_path.json")
    p.add_argument("--calls", type=int, default=300, help="chain calls per timed run")
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

    def loop(fn):  # type: ignore[no-untyped-def]
        return lambda: [fn() for _ in range(args.calls)]

    times = interleaved(
        {
            "unguarded": loop(lambda: unguarded.invoke(question)),
            "guarded": loop(lambda: guarded.invoke(question)),
            "classifier_alone": loop(lambda: classifier.invoke(pair)),
        },
        args.runs,
    )
    per_call_ms = {k: [t / args.calls * 1000 for t in v] for k, v in times.items()}
    plumbing = [
        g - u - c
        for g, u, c in zip(
            per_call_ms["guarded"], per_call_ms["unguarded"], per_call_ms["classifier_alone"]
        )
    ]
    figures = {
        "unguarded_ms_per_call": round(median(per_call_ms["unguarded"]), 4),
        "guarded_ms_per_call": round(median(per_call_ms["guarded"]), 4),
        "classifier_alone_ms_per_call": round(median(per_call_ms["classifier_alone"]), 4),
        "plumbing_overhead_ms_per_call": round(median(plumbing), 4),
        "plumbing_overhead_ms_per_run": [round(x, 4) for x in plumbing],
        "target_ms": 1.0,
        "meets_target": median(plumbing) <= 1.0,
    }
    write(args.out, figures, {"calls": args.calls, "runs": args.runs}, started)


if __name__ == "__main__":
    main()
