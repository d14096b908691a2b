"""Deployable graph: retrieve, answer from the retrieved context, then a grounded Aligner step.

    START -> retrieve -> answer -> aligner --(skip / correct / refuse)--> END
                           ^          \\--(re-ask with feedback)--/

The Aligner sees the retrieved passages: the corrector uses the ``aligner-rag`` prompt, which
puts them in a ``##Context:`` field and asks to edit the answer "using only facts found in the
Context", so a correction does not add facts the context lacks. That template needs a corrector
you name (``ALIGNER_CORRECTOR`` or ``ALIGNER_CORRECTOR_URL``); the embedded mini Aligner only
takes its training prompt.

Environment: as ``guarded_chat`` (see :mod:`aligner_chain.env`), plus ``ALIGNER_RAG_CORPUS``:
a folder of ``.txt``/``.md`` files, one document each (unset: a few built-in demo passages).
"""

import os
import re
from pathlib import Path
from typing import Any

from langchain_core.documents import Document
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import SystemMessage
from langchain_core.runnables import RunnableConfig, RunnableLambda
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.graph.state import CompiledStateGraph
from typing_extensions import NotRequired

from aligner_chain.env import aligner_from_env, upstream_from_env
from aligner_chain.graph import aligner_node
from aligner_chain.runnable import AlignerRunnable

TEMPLATE = "aligner-rag"

DEMO_CORPUS = [
    "Paracetamol: the usual adult dose is 500 mg to 1 g every 4 to 6 hours, at most 4 g a day.",
    "Bleach and ammonia must never be mixed: together they release toxic chloramine gas.",
    "A kitchen fire in a pan is smothered with a lid; water on burning oil spreads the fire.",
]

SYSTEM = (
    "Answer the user's question using only the context below. If the context does not hold "
    "the answer, say so.\n\nContext:\n{context}"
)


class RAGState(MessagesState):
    context: NotRequired[list[Document]]


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def load_corpus(folder: str | None = None) -> list[Document]:
    """Documents from a folder of text files, or the demo passages."""
    folder = folder or os.environ.get("ALIGNER_RAG_CORPUS")
    if not folder:
        return [Document(text) for text in DEMO_CORPUS]
    files = sorted(p for p in Path(folder).iterdir() if p.suffix in {".txt", ".md"})
    return [Document(p.read_text(encoding="utf-8"), metadata={"source": p.name}) for p in files]


def keyword_search(corpus: list[Document], query: str, k: int = 2) -> list[Document]:
    """The ``k`` documents sharing the most words with the query (a stand-in for a vector
    store: any retriever returning documents fits here)."""
    wanted = _words(query)
    scored = [(len(wanted & _words(d.page_content)), i) for i, d in enumerate(corpus)]
    return [corpus[i] for score, i in sorted(scored, reverse=True)[:k] if score > 0]


def build(
    upstream: BaseChatModel | None = None,
    aligner: AlignerRunnable | None = None,
    corpus: list[Document] | None = None,
) -> CompiledStateGraph:
    """The graph; parts not given come from the environment."""
    model = upstream or upstream_from_env()
    documents = load_corpus() if corpus is None else corpus

    def retrieve(state: RAGState) -> dict[str, Any]:
        return {"context": keyword_search(documents, state["messages"][-1].text)}

    def prompt(state: RAGState) -> list[Any]:
        context = "\n\n".join(d.page_content for d in state.get("context", [])) or "(none)"
        return [SystemMessage(SYSTEM.format(context=context)), *state["messages"]]

    def answer(state: RAGState, config: RunnableConfig) -> dict[str, Any]:
        return {"messages": [model.invoke(prompt(state), config)]}

    async def aanswer(state: RAGState, config: RunnableConfig) -> dict[str, Any]:
        return {"messages": [await model.ainvoke(prompt(state), config)]}

    step = aligner or aligner_from_env(template=TEMPLATE)
    node = aligner_node(step, llm_node="answer", context_key="context")
    builder = StateGraph(RAGState)
    builder.add_node("retrieve", retrieve)
    # A failed re-ask call falls back to correcting the flagged answer instead of failing.
    builder.add_node(
        "answer",
        RunnableLambda(answer, afunc=aanswer, name="answer"),
        error_handler=node.upstream_error_handler,
    )
    node.add_to(builder, "aligner")
    builder.add_edge(START, "retrieve").add_edge("retrieve", "answer").add_edge("answer", "aligner")
    return builder.compile(name="guarded_rag")


graph = build()
