"""Deployable graph: a tool-using ``create_agent`` agent with ``AlignerMiddleware``.

    model <-> tools;  after each model answer: AlignerMiddleware
    (tool-call turns pass; answers are skipped, corrected, refused, or re-asked via the model)

Configured from environment variables as ``guarded_chat`` (see :mod:`aligner_chain.env`);
without ``ALIGNER_UPSTREAM`` the offline demo model calls the tool once and echoes its result.

Streaming: the middleware runs after the model node, so ``stream_mode="messages"`` shows the
model's raw tokens before the verdict; a changed answer then arrives as a whole new message.
Use ``AlignedChatModel`` as the agent's model where raw text must never reach the client.
"""

from langchain.agents import create_agent
from langchain_core.language_models import BaseChatModel
from langchain_core.tools import BaseTool, tool
from langgraph.graph.state import CompiledStateGraph

from aligner_chain.env import aligner_from_env, upstream_from_env
from aligner_chain.middleware import AlignerMiddleware
from aligner_chain.runnable import AlignerRunnable

NOTES = {
    "refunds": "Refunds are issued within 14 days to the original payment method.",
    "passwords": "Password resets go through the self-service portal; staff never ask for one.",
    "shipping": "Standard shipping takes 3 to 5 working days.",
}


@tool
def search_notes(query: str) -> str:
    """Search the support team's notes for a topic."""
    hits = [text for topic, text in NOTES.items() if topic.rstrip("s") in query.lower()]
    return "\n".join(hits) or "No note matches."


def build(
    upstream: BaseChatModel | None = None,
    aligner: AlignerRunnable | None = None,
    tools: list[BaseTool] | None = None,
) -> CompiledStateGraph:
    """The agent; parts not given come from the environment."""
    return create_agent(
        upstream or upstream_from_env(),
        tools=[search_notes] if tools is None else tools,
        system_prompt="You are a support assistant. Use search_notes before answering.",
        middleware=[AlignerMiddleware(aligner or aligner_from_env())],
        name="guarded_agent",
    )


graph = build()
