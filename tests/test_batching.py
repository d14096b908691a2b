"""Micro-batching: coalescing, isolation of failures, cancellation, backpressure, and a
500-request reliability run with injected corrector faults."""

from __future__ import annotations

import asyncio
import random
import threading
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest

from aligner_chain import batching
from aligner_chain.batching import BatchingConfig, MicroBatcher, make_runner
from aligner_chain.correctors.base import Corrector
from aligner_chain.errors import BackpressureError, CorrectorError
from aligner_chain.types import Correction, QAPair


def echo(items: list[str]) -> list[str]:
    return [f"out:{item}" for item in items]


def test_threads_and_tasks_share_batches_and_get_their_own_results() -> None:
    sizes: list[int] = []

    def fn(items: list[str]) -> list[str]:
        sizes.append(len(items))
        time.sleep(0.02)  # a model call: callers arriving meanwhile queue up
        return echo(items)

    batcher = MicroBatcher(fn, BatchingConfig(max_batch_size=8, max_wait_ms=20))
    with ThreadPoolExecutor(16) as pool:
        thread_results = list(pool.map(lambda i: batcher([f"t{i}a", f"t{i}b"]), range(16)))

    async def run_tasks() -> list[list[str]]:
        return await asyncio.gather(*(batcher.acall([f"a{i}"]) for i in range(16)))

    task_results = asyncio.run(run_tasks())
    assert thread_results == [[f"out:t{i}a", f"out:t{i}b"] for i in range(16)]
    assert task_results == [[f"out:a{i}"] for i in range(16)]
    assert sum(sizes) == 48 and max(sizes) <= 8
    assert len(sizes) < 32, f"calls were not coalesced: {sizes}"


async def test_cancelled_caller_does_not_break_the_batch() -> None:
    gate, entered = threading.Event(), threading.Event()
    seen: list[str] = []

    def fn(items: list[str]) -> list[str]:
        seen.extend(items)
        entered.set()
        gate.wait(5)
        return echo(items)

    async def until(condition: Callable[[], bool]) -> None:
        for _ in range(500):  # at most 5 s
            if condition():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("condition not reached in 5 s")

    batcher = MicroBatcher(fn, BatchingConfig(max_batch_size=4, max_wait_ms=0))
    first = asyncio.create_task(batcher.acall(["first"]))
    await until(entered.is_set)  # "first" is inside fn: the rest queue behind it
    queued = {name: asyncio.create_task(batcher.acall([name])) for name in ("a", "b", "c")}
    await until(lambda: batcher.pending == 3)
    queued["b"].cancel()
    first.cancel()  # already running: its result is dropped, the batch goes on
    await asyncio.wait({queued["b"], first}, timeout=5)  # let the cancellations propagate
    gate.set()
    assert await queued["a"] == ["out:a"]
    assert await queued["c"] == ["out:c"]
    for task in (queued["b"], first):
        with pytest.raises(asyncio.CancelledError):
            await task
    assert "b" not in seen  # dropped before reaching the model
    assert batcher.pending == 0


def test_one_callers_bad_input_fails_only_that_caller() -> None:
    def fn(items: list[str]) -> list[str]:
        if "bad" in items:
            raise CorrectorError("cannot correct 'bad'")
        time.sleep(0.01)
        return echo(items)

    # The batch fires when all three are queued (full), or after 2 s on a very slow machine.
    batcher = MicroBatcher(fn, BatchingConfig(max_batch_size=3, max_wait_ms=2000))
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(batcher, [x]) for x in ("ok1", "bad", "ok2")]
        assert futures[0].result(5) == ["out:ok1"]
        assert futures[2].result(5) == ["out:ok2"]
        with pytest.raises(CorrectorError):
            futures[1].result(5)
    assert batcher.stats.isolated_reruns >= 1


def test_full_queue_raises_backpressure_then_recovers() -> None:
    gate = threading.Event()

    def fn(items: list[str]) -> list[str]:
        gate.wait(5)
        return echo(items)

    batcher = MicroBatcher(fn, BatchingConfig(max_batch_size=2, max_wait_ms=0, max_queue=4))
    with ThreadPoolExecutor(8) as pool:
        busy = pool.submit(batcher, ["busy"])
        deadline = time.monotonic() + 5
        while batcher.pending and time.monotonic() < deadline:  # "busy" taken into fn
            time.sleep(0.005)
        waiting = [pool.submit(batcher, [f"w{i}"]) for i in range(4)]
        while batcher.pending < 4 and time.monotonic() < deadline:
            time.sleep(0.005)
        with pytest.raises(BackpressureError, match="queue full"):
            batcher(["one too many"])
        gate.set()
        assert busy.result(5) == ["out:busy"]
        assert [f.result(5) for f in waiting] == [[f"out:w{i}"] for i in range(4)]
    assert batcher.stats.rejected == 1 and batcher.stats.max_pending == 4
    assert batcher(["after"]) == ["out:after"]


def test_batching_off_calls_directly() -> None:
    runner = make_runner(echo, False)
    assert runner(["x"]) == ["out:x"]
    assert asyncio.run(runner.acall(["y"])) == ["out:y"]
    assert runner([]) == []


def _until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 5
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in 5 s"
        time.sleep(0.002)


async def test_a_lone_call_runs_at_once_and_waiting_for_company_is_opt_in(monkeypatch) -> None:
    """With the batcher's clock frozen, a batcher that waits for company can never dispatch;
    the default dispatches a lone call without consulting the clock at all."""
    clock = [0.0]
    monkeypatch.setattr(batching, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    assert await asyncio.wait_for(MicroBatcher(echo).acall(["lone"]), 5) == ["out:lone"]
    call = asyncio.ensure_future(MicroBatcher(echo, BatchingConfig(max_wait_ms=5)).acall(["x"]))
    done, _ = await asyncio.wait({call}, timeout=0.2)
    assert not done  # its 5 ms never pass on the frozen clock
    clock[0] = 1.0
    assert await asyncio.wait_for(call, 5) == ["out:x"]


def test_an_idle_batcher_runs_a_lone_sync_call_on_the_callers_own_thread() -> None:
    """No hand-off to the worker for a lone synchronous call (async callers hand off, as
    they must not block the event loop); fn may call back into its batcher."""
    threads: list[threading.Thread] = []

    def fn(items: list[str]) -> list[str]:
        threads.append(threading.current_thread())
        if items == ["outer"]:
            assert batcher(["inner"]) == ["out:inner"]
        return echo(items)

    batcher = MicroBatcher(fn)
    assert batcher(["outer"]) == ["out:outer"]
    assert threads == [threading.current_thread()] * 2
    assert asyncio.run(batcher.acall(["y"])) == ["out:y"]
    assert threads[2] is not threading.current_thread()
    assert batcher.stats.batches == 2  # the nested call ran inside the outer batch


def test_calls_arriving_during_a_model_call_form_the_next_batch_and_stay_whole() -> None:
    """Batches form from what queued while the model ran; separate callers merge up to
    ``max_batch_size``, and one caller's batch is never split, however large."""
    gate, entered = threading.Event(), threading.Event()
    batches: list[list[str]] = []

    def fn(items: list[str]) -> list[str]:
        batches.append(items)
        entered.set()
        gate.wait(5)
        return echo(items)

    batcher = MicroBatcher(fn, BatchingConfig(max_batch_size=8))
    requests = [[f"{i}{k}" for k in "abc"] for i in range(3)] + [[f"big{i}" for i in range(20)]]
    with ThreadPoolExecutor(8) as pool:
        first = pool.submit(batcher, ["first"])
        assert entered.wait(5)  # dispatched alone: nothing else was queued
        calls, queued = [], 0
        for items in requests:  # enqueued one after the other, in this order
            calls.append(pool.submit(batcher, items))
            queued += len(items)
            _until(lambda n=queued: batcher.pending == n)
        gate.set()
        assert first.result(5) == ["out:first"]
        assert [c.result(5) for c in calls] == [echo(items) for items in requests]
    assert [len(b) for b in batches] == [1, 6, 3, 20]
    assert batcher.stats.batches == 4 and batcher.stats.items == 30


def test_one_callers_batch_runs_in_one_call() -> None:
    sizes: list[int] = []

    def fn(items: list[str]) -> list[str]:
        sizes.append(len(items))
        return echo(items)

    batcher = MicroBatcher(fn, BatchingConfig(max_batch_size=2))
    assert batcher([str(i) for i in range(16)]) == echo([str(i) for i in range(16)])
    assert asyncio.run(batcher.acall(["x"] * 5)) == echo(["x"] * 5)
    assert sizes == [16, 5]


# -- reliability: 500 concurrent requests through a corrector with injected faults ------------


class FaultyEchoCorrector(Corrector):
    """Echoes each answer back tagged with its question; fails like a flaky model would."""

    model_id = "faulty-echo"

    def __init__(self, batching: BatchingConfig, seed: int = 0) -> None:
        self._rng = random.Random(seed)
        self._runner = make_runner(self._correct_batch, batching)
        self.processed: Counter[str] = Counter()

    def correct(self, pairs: Sequence[QAPair]) -> list[Correction]:
        return self._runner(pairs)

    async def acorrect(self, pairs: Sequence[QAPair]) -> list[Correction]:
        return await self._runner.acall(pairs)

    def _correct_batch(self, pairs: list[QAPair]) -> list[Correction]:
        time.sleep(0.002)
        if any(p.answer.startswith("poison") for p in pairs):
            raise CorrectorError("poisoned input")
        if self._rng.random() < 0.1:
            raise CorrectorError("transient device error")
        self.processed.update(p.question for p in pairs)
        return [
            Correction(text=f"{p.question}->{p.answer}!", model_id=self.model_id) for p in pairs
        ]


def test_500_concurrent_requests_with_faults_are_answered_once_each() -> None:
    config = BatchingConfig(max_batch_size=16, max_wait_ms=2, max_queue=2048)
    corrector = FaultyEchoCorrector(config)
    n = 500

    def pairs_for(i: int) -> list[QAPair]:
        answer = "poison" if i % 37 == 0 else f"answer {i}"
        return [QAPair(f"q{i}.{k}", answer) for k in range(1 + i % 3)]

    outcomes: dict[int, list[Correction] | BaseException] = {}

    async def one_async(i: int) -> None:
        try:
            outcomes[i] = await corrector.ainvoke(pairs_for(i))
        except CorrectorError as exc:
            outcomes[i] = exc

    def one_sync(i: int) -> None:
        try:
            outcomes[i] = corrector.invoke(pairs_for(i))
        except CorrectorError as exc:
            outcomes[i] = exc

    async def run_all() -> None:
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(32) as pool:
            threaded = [loop.run_in_executor(pool, one_sync, i) for i in range(0, n, 2)]
            tasks = [one_async(i) for i in range(1, n, 2)]
            await asyncio.wait_for(asyncio.gather(*threaded, *tasks), timeout=120)

    tracemalloc.start()
    started = time.monotonic()
    asyncio.run(run_all())
    elapsed = time.monotonic() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    assert sorted(outcomes) == list(range(n)), "a request was lost"
    failed = [i for i, out in outcomes.items() if isinstance(out, BaseException)]
    for i, out in outcomes.items():
        if isinstance(out, BaseException):
            continue
        expected = [f"{p.question}->{p.answer}!" for p in pairs_for(i)]
        assert [c.text for c in out] == expected, f"request {i} got someone else's answer"
    assert {i for i in range(0, n, 37)} <= set(failed), "poisoned requests must fail"
    # No duplicates: every delivered pair was produced exactly once by the model.
    delivered = Counter(
        c.text.split("->")[0] for out in outcomes.values() if isinstance(out, list) for c in out
    )
    assert max(delivered.values()) == 1
    assert all(corrector.processed[q] == 1 for q in delivered)
    # Pairs the model processed but nobody received belong to requests that failed in part.
    failed_questions = {p.question for i in failed for p in pairs_for(i)}
    assert set(corrector.processed) - set(delivered) <= failed_questions
    stats = corrector._runner.stats  # type: ignore[union-attr]
    assert stats.batches < n and stats.max_pending <= config.max_queue
    assert corrector._runner.pending == 0  # type: ignore[union-attr]
    assert peak < 64 * 2**20, f"peak traced memory {peak / 2**20:.1f} MiB"
    print(
        f"\n500 requests: {n - len(failed)} answered, {len(failed)} failed "
        f"({stats.batches} batches, {stats.isolated_reruns} isolated re-runs, "
        f"max {stats.max_pending} pending, peak {peak / 2**20:.1f} MiB, {elapsed:.2f}s)"
    )


def test_500_concurrent_aligner_calls_end_with_their_answer_or_the_fallback() -> None:
    """Through the whole step with ``fail_open``: a failed correction keeps the request's own
    original answer and records the error; a successful one is that request's correction."""
    from aligner_chain import AlignerRunnable, RoutingPolicy

    corrector = FaultyEchoCorrector(BatchingConfig(max_batch_size=16, max_wait_ms=2), seed=1)
    step = AlignerRunnable(
        corrector=corrector,
        policy=RoutingPolicy(mode="always", verify_after_correct=False, on_error="fail_open"),
    )
    n = 500
    inputs = [
        {"question": f"q{i}", "answer": "poison" if i % 41 == 0 else f"answer {i}"}
        for i in range(n)
    ]

    async def run_all() -> list[object]:
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(16) as pool:
            threaded = [loop.run_in_executor(pool, step.invoke, v) for v in inputs[: n // 2]]
            tasks = [step.ainvoke(v) for v in inputs[n // 2 :]]
            return await asyncio.wait_for(asyncio.gather(*threaded, *tasks), timeout=180)

    outputs = asyncio.run(run_all())
    fallbacks = 0
    assert len(outputs) == n
    for value, out in zip(inputs, outputs):
        record = out.response_metadata["aligner"]  # type: ignore[attr-defined]
        assert record["question"] == value["question"]
        if record["errors"]:
            fallbacks += 1
            assert out.content == value["answer"]  # type: ignore[attr-defined]
            assert record["errors"][0] in (
                "corrector: CorrectorError: poisoned input",
                "corrector: CorrectorError: transient device error",
            )
        else:
            assert out.content == f"{value['question']}->{value['answer']}!"  # type: ignore[attr-defined]
    poisoned = [o for v, o in zip(inputs, outputs) if v["answer"] == "poison"]
    assert all(o.content == "poison" for o in poisoned)  # type: ignore[attr-defined]
    assert len(poisoned) <= fallbacks < n
    assert corrector._runner.pending == 0


# -- the real model: concurrent calls share generate() and match unbatched output -------------


def test_transformers_corrector_coalesces_concurrent_calls(tiny_lm_path: Path) -> None:
    from aligner_chain.correctors.transformers import GenerationSettings, TransformersCorrector

    pairs = [QAPair(f"Question number {i}?", f"The answer is {i} and more.") for i in range(8)]
    short = GenerationSettings(new_tokens_margin=8)  # short generations keep the test fast
    reference = TransformersCorrector(
        str(tiny_lm_path), device="cpu", generation=short, batching=False
    )
    expected = [reference.correct([p])[0].text for p in pairs]

    batched = TransformersCorrector(
        str(tiny_lm_path),
        device="cpu",
        generation=short,
        batching=BatchingConfig(max_batch_size=8, max_wait_ms=50),
    )

    async def run() -> list[list[Correction]]:
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(4) as pool:
            threaded = [loop.run_in_executor(pool, batched.invoke, [p]) for p in pairs[:4]]
            tasks = [batched.ainvoke([p]) for p in pairs[4:]]
            return await asyncio.gather(*threaded, *tasks)

    results = asyncio.run(run())
    assert [r[0].text for r in results] == expected
    batches = batched.batcher.stats.batches  # type: ignore[union-attr]
    assert batches < len(pairs), f"{batches} model calls for {len(pairs)} concurrent requests"


def test_model_classifiers_coalesce_concurrent_calls(
    tiny_seqcls_path: Path, tiny_guard_path: Path
) -> None:
    from aligner_chain.classifiers import GuardModelClassifier, SequenceClassifier

    pairs = [QAPair(f"Question {i}?", f"Answer number {i}.") for i in range(6)]
    config = BatchingConfig(max_batch_size=6, max_wait_ms=100)
    for cls, path in (
        (SequenceClassifier, tiny_seqcls_path),
        (GuardModelClassifier, tiny_guard_path),
    ):
        alone = cls(str(path), device="cpu", batching=False)
        expected = [alone.classify([p])[0].score for p in pairs]
        shared = cls(str(path), device="cpu", batching=config)

        async def run(clf: object = shared) -> list[list[object]]:
            return await asyncio.gather(*(clf.ainvoke([p]) for p in pairs))  # type: ignore[attr-defined]

        results = asyncio.run(run())
        assert [r[0].score for r in results] == pytest.approx(expected, abs=1e-5)
        assert shared.batcher.stats.batches < len(pairs)  # type: ignore[union-attr]


class Fatal(BaseException):
    """Not an Exception: it kills the worker thread."""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dying_worker_fails_its_callers_and_is_replaced() -> None:
    workers: list[threading.Thread] = []

    def fn(items: list[str]) -> list[str]:
        workers.append(threading.current_thread())
        if len(workers) == 1:
            raise Fatal("worker killed")
        return echo(items)

    batcher = MicroBatcher(fn, BatchingConfig(max_wait_ms=0))
    with pytest.raises(Fatal):  # async callers always go through the worker thread
        asyncio.run(batcher.acall(["first"]))
    workers[0].join(5)  # let it die inside this test, where its warning is expected
    assert asyncio.run(batcher.acall(["second"])) == ["out:second"]
    assert workers[1] is not workers[0]  # a new worker took over
