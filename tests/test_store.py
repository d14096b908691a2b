"""The correction log: durability, queries, bad files and the LangChain callback."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.runnables import RunnableLambda

from aligner_chain.record import DecisionRecord, Route
from aligner_chain.store import CorrectionStore, StoreError
from aligner_chain.types import Verdict


def make_record(i: int, *, route: Route = Route.CORRECT) -> DecisionRecord:
    corrected = f"Safe answer {i}." if route is Route.CORRECT else None
    return DecisionRecord(
        route=route,
        initial_route=route,
        mode="sync",
        question=f"Question {i}?",
        original_answer=f"Harmful answer {i}.",
        corrected_answer=corrected,
        final_answer=corrected or f"Harmful answer {i}.",
        changed=corrected is not None,
        verdict_before=Verdict(score=0.9, classifier_id="tiny-guard"),
        verdict_after=Verdict(score=0.1, classifier_id="tiny-guard") if corrected else None,
        classifier_id="tiny-guard",
        corrector_id="tiny-aligner",
    )


def test_round_trip_keeps_every_field(tmp_path: Path) -> None:
    records = [make_record(i) for i in range(3)] + [make_record(3, route=Route.SKIP)]
    with CorrectionStore(tmp_path / "log.db") as store:
        assert store.record(records) == 4
        stored = list(store)
    assert [s.record for s in stored] == records
    assert [s.id for s in stored] == [1, 2, 3, 4]
    assert stored[0].recorded_at.endswith("+00:00")


def test_reopen_and_query(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    with CorrectionStore(path) as store:
        store.record([make_record(i) for i in range(1200)])
        store.record([make_record(i, route=Route.SKIP) for i in range(2000, 2005)])
    with CorrectionStore(path) as store:
        assert len(store) == 1205
        assert store.count(route=Route.SKIP) == 5
        assert store.count(route="correct", changed=True) == 1200
        assert store.count(corrector_id="other") == 0
        # Paging crosses page boundaries without losing or repeating a row.
        questions = [s.record.question for s in store.decisions(route="correct")]
        assert questions == [f"Question {i}?" for i in range(1200)]
        assert len(list(store.decisions(limit=700))) == 700
        first = next(iter(store)).record.created_at
        assert store.count(since=first) == 1205
        assert store.count(until=first) == 0


def test_recording_is_idempotent(tmp_path: Path) -> None:
    record = make_record(1)
    with CorrectionStore(tmp_path / "log.db") as store:
        assert store.record([record]) == 1
        assert store.record([record, record.model_dump(mode="json")]) == 0
        assert store.record([]) == 0
        assert len(store) == 1


def test_file_settings(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    CorrectionStore(path).close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert {"decisions_created_at", "decisions_route"} <= indexes
    conn.close()


def test_foreign_sqlite_file_is_refused_and_untouched(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE users (name TEXT)")
    conn.execute("INSERT INTO users VALUES ('ada')")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match=r"other\.db.*another application.*users"):
        CorrectionStore(path)
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT name FROM users").fetchall() == [("ada",)]
    assert conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 1


def test_corrupt_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(os.urandom(8192))
    with pytest.raises(StoreError, match=r"garbage\.db.*not a readable SQLite database"):
        CorrectionStore(path)


def test_damaged_pages_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "damaged.db"
    with CorrectionStore(path) as store:
        store.record([make_record(i) for i in range(300)])
    # Overwrite data pages (not the header) so the file opens but reading fails.
    raw = bytearray(path.read_bytes())
    raw[8192:] = b"\xff" * (len(raw) - 8192)
    path.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match=r"damaged\.db"), CorrectionStore(path) as store:
        list(store)


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    CorrectionStore(path).close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version=99")
    conn.close()
    with pytest.raises(StoreError, match="newer aligner-chain"):
        CorrectionStore(path)


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        CorrectionStore(tmp_path / "nope" / "log.db")


def test_callback_records_each_decision_once(tmp_path: Path) -> None:
    records = iter([make_record(1), make_record(2)])

    def step(messages: list) -> AIMessage:
        return AIMessage(
            content="corrected",
            response_metadata={"aligner": next(records).to_metadata()},
        )

    inner = RunnableLambda(step)
    # Every level of the nested chain, and the graph-like state, carry the same message.
    outer = inner | RunnableLambda(lambda m: {"messages": [HumanMessage("hi"), m]})
    with CorrectionStore(tmp_path / "log.db") as store:
        handler = store.callback()
        first = outer.invoke([HumanMessage("hi")], config={"callbacks": [handler]})
        outer.invoke([HumanMessage("hi")], config={"callbacks": [handler]})
        # A history replayed through a fresh handler is not stored twice either.
        RunnableLambda(lambda _: first).invoke(None, config={"callbacks": [store.callback()]})
        assert [s.record.question for s in store] == ["Question 1?", "Question 2?"]


def test_callback_ignores_messages_without_a_record(tmp_path: Path) -> None:
    chain = RunnableLambda(lambda _: AIMessage("plain", response_metadata={"aligner": "junk"}))
    with CorrectionStore(tmp_path / "log.db") as store:
        chain.invoke(None, config={"callbacks": [store.callback()]})
        assert len(store) == 0


_WRITER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from test_store import make_record
    from aligner_chain.store import CorrectionStore

    store = CorrectionStore({path!r})
    batch = 0
    while True:
        store.record([make_record(batch * 10 + i) for i in range(10)])
        print(batch, flush=True)
        batch += 1
    """
)


def test_sigkill_mid_stream_loses_nothing_committed(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    script = _WRITER.format(tests=str(Path(__file__).parent), path=str(path))
    writer = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, bufsize=1
    )
    assert writer.stdout is not None
    committed = -1
    try:
        for line in writer.stdout:
            committed = int(line)
            if committed >= 30:
                break
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    assert writer.returncode == -signal.SIGKILL
    # The writer may have committed more batches after the last line we read; never fewer.
    with CorrectionStore(path) as store:
        assert store.integrity_check() == ["ok"]
        questions = [s.record.question for s in store]
    assert len(questions) % 10 == 0, "a batch was partly stored"
    assert len(questions) >= (committed + 1) * 10
    assert questions == [f"Question {i}?" for i in range(len(questions))]
