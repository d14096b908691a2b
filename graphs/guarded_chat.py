"""Deployable graph: a chat model, then the Aligner step.

    START -> llm -> aligner --(skip / correct / refuse)--> END
                      \\--(re-ask with feedback)--> llm

Configured from environment variables (see :mod:`aligner_chain.env`): ``ALIGNER_UPSTREAM``
(an ``init_chat_model`` spec; unset = the offline demo model, which only echoes),
``ALIGNER_CORRECTOR`` / ``ALIGNER_CORRECTOR_URL``, ``ALIGNER_CLASSIFIER``, ``ALIGNER_POLICY``.

Streaming: the Aligner runs after the LLM node, so ``stream_mode="messages"`` shows the
upstream's raw tokens and not the correction (it replaces the answer under the same id); read
the final answer from ``"updates"`` or ``"values"``, or use ``AlignedChatModel`` as the model
where raw text must never reach the client.
"""

from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.runnables import RunnableConfig, RunnableLambda
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.graph.state import CompiledStateGraph

from aligner_chain.env import aligner_from_env, upstream_from_env
from aligner_chain.graph import aligner_node
from aligner_chain.runnable import AlignerRunnable


def build(
    upstream: BaseChatModel | None = None, aligner: AlignerRunnable | None = None
) -> CompiledStateGraph:
    """The graph; parts not given come from the environment."""
    model = upstream or upstream_from_env()

    def llm(state: MessagesState, config: RunnableConfig) -> dict[str, Any]:
        return {"messages": [model.invoke(state["messages"], config)]}

    async def allm(state: MessagesState, config: RunnableConfig) -> dict[str, Any]:
        return {"messages": [await model.ainvoke(state["messages"], config)]}

    node = aligner_node(aligner or aligner_from_env(), llm_node="llm")
    builder = StateGraph(MessagesState)
    # A failed re-ask call falls back to correcting the flagged answer instead of failing.
    builder.add_node(
        "llm",
        RunnableLambda(llm, afunc=allm, name="llm"),
        error_handler=node.upstream_error_handler,
    )
    node.add_to(builder, "aligner")
    builder.add_edge(START, "llm").add_edge("llm", "aligner")
    return builder.compile(name="guarded_chat")


graph = build()
