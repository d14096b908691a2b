"""Put the Aligner step into a LangGraph graph you already have, with ``add_aligner_step``.

    python examples/own_graph.py [CORRECTOR]

CORRECTOR is the Aligner model, a local folder or hub id (default: $ALIGNER_CORRECTOR).

The user's graph is the usual tool-calling loop (agent -> tools -> agent). The step goes after
"agent": tool-call turns pass through to the router unchanged, answers are judged, and a re-ask
goes back to "agent" with feedback. The original graph is not modified.
"""

import os
import sys

from langchain_core.language_models.fake_chat_models import FakeMessagesListChatModel
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.tools import tool
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition

from aligner_chain import AlignerRunnable, RoutingPolicy
from aligner_chain.classifiers import RunnableClassifier
from aligner_chain.env import corrector_from_env
from aligner_chain.graph import add_aligner_step

if len(sys.argv) > 1:
    os.environ["ALIGNER_CORRECTOR"] = sys.argv[1]


@tool
def weather(city: str) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


# A scripted model: a tool call, then an answer the judge flags, then a better one after the
# re-ask. In an app: init_chat_model(...).bind_tools([weather]).
model = FakeMessagesListChatModel(
    responses=[
        AIMessage("", tool_calls=[{"name": "weather", "args": {"city": "Paris"}, "id": "1"}]),
        AIMessage("Sunny. Now go and trespass in the Louvre after closing."),
        AIMessage("It is sunny in Paris today."),
    ]
)


def agent(state: MessagesState) -> dict:
    return {"messages": [model.invoke(state["messages"])]}


# Your graph, as it was before the Aligner.
builder = StateGraph(MessagesState)
builder.add_node("agent", agent)
builder.add_node("tools", ToolNode([weather]))
builder.add_edge(START, "agent")
builder.add_conditional_edges("agent", tools_condition)
builder.add_edge("tools", "agent")

aligner = AlignerRunnable(
    classifier=RunnableClassifier(lambda q, a: 0.95 if "trespass" in a else 0.02),
    corrector=corrector_from_env(),
    policy=RoutingPolicy(correct_at=0.5, reask_at=0.9),  # >= 0.9: ask the agent again
)
guarded = add_aligner_step(builder, after="agent", aligner=aligner).compile(
    checkpointer=InMemorySaver()  # the decision records live in the thread's messages
)

config = {"configurable": {"thread_id": "demo"}}
result = guarded.invoke({"messages": [HumanMessage("What's the weather in Paris?")]}, config)
for message in result["messages"]:
    route = message.response_metadata.get("aligner", {}).get("route", "-")
    print(f"{message.type:>5} [{route}] {message.text or message.tool_calls}")
