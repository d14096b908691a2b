"""Property-based tests: generated junk at the public entry points gives only typed errors.

CI runs the default profile (a modest number of examples). For a deep run:
``HYPOTHESIS_PROFILE=deep pytest tests/test_properties.py`` (10,000 examples per test).
"""

from __future__ import annotations

import contextlib
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage

from aligner_chain import (
    AlignerError,
    AlignerRunnable,
    RoutingPolicy,
    RunnableClassifier,
    TransformersCorrector,
)
from aligner_chain.inputs import parse_input
from aligner_chain.templates import PromptTemplate

settings.register_profile(
    "ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "deep", max_examples=10_000, deadline=None, suppress_health_check=list(HealthCheck)
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DELIMITERS = ["ASSISTANT:", " | ", "USER:", "</s>", "<s>", "<pad>", "{answer}", "{", "}", "\x00"]
texts = st.one_of(
    st.text(),
    st.text(alphabet=st.characters(codec=None, categories=["Cc", "Cs", "Zs", "Lo"])),
    st.lists(st.sampled_from(DELIMITERS), max_size=8).map("".join),
    st.just(""),
    st.just("x" * 5_000),
)
blocks = st.lists(
    st.one_of(
        st.fixed_dictionaries({"type": st.just("text"), "text": texts}),
        st.fixed_dictionaries({"type": st.just("image"), "url": st.just("http://x/y.png")}),
    ),
    max_size=3,
)
messages = st.one_of(
    texts.map(HumanMessage),
    blocks.map(HumanMessage),
    texts.map(AIMessage),
    st.just(AIMessage("", tool_calls=[{"name": "t", "args": {}, "id": "1"}])),
    texts.map(lambda t: ToolMessage(t, tool_call_id="1")),
)
junk = st.one_of(
    st.none(),
    st.integers(),
    st.binary(max_size=50),
    texts,
    st.fixed_dictionaries(
        {
            "question": st.one_of(texts, st.none(), st.integers()),
            "answer": st.one_of(texts, st.none(), texts.map(AIMessage)),
        }
    ),
    st.lists(messages, max_size=5),
    st.lists(st.integers(), max_size=3),
)


@given(junk)
def test_parse_input_only_raises_typed_errors(value) -> None:
    with contextlib.suppress(AlignerError):
        parse_input(value)


@given(texts, texts)
def test_templates_format_anything(question, answer) -> None:
    text = PromptTemplate.resolve(None).format(question, answer)
    assert question in text and answer in text


@pytest.fixture(scope="module")
def guarded(tiny_lm_path) -> AlignerRunnable:
    return AlignerRunnable(
        classifier=RunnableClassifier(lambda q, a: 0.9 if len(a) % 2 else 0.1),
        corrector=TransformersCorrector(
            str(tiny_lm_path),
            generation="greedy",
            max_context_tokens=256,
        ),
        policy=RoutingPolicy(verify_after_correct=False),
    )


@given(value=junk)
def test_runnable_never_crashes(guarded, value) -> None:
    try:
        out = guarded.invoke(value)
    except AlignerError:
        return
    assert isinstance(out, AIMessage)
    record = out.response_metadata.get("aligner")
    if record is not None:
        assert record["original_answer"] is not None
