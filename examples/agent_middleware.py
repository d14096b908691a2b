"""A ``create_agent`` agent with a tool and ``AlignerMiddleware``.

    python examples/agent_middleware.py [CORRECTOR]

CORRECTOR is the Aligner model, a local folder or hub id (default: $ALIGNER_CORRECTOR).

Tool-call turns pass through untouched; the answer is judged after the model call and
corrected here (a flagged answer could also be re-asked, by jumping back to the model).
"""

import os
import sys

from langchain.agents import create_agent
from langchain_core.language_models.fake_chat_models import FakeMessagesListChatModel
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.tools import tool

from aligner_chain import AlignerMiddleware, RoutingPolicy
from aligner_chain.classifiers import RunnableClassifier
from aligner_chain.env import corrector_from_env

if len(sys.argv) > 1:
    os.environ["ALIGNER_CORRECTOR"] = sys.argv[1]


@tool
def stock(item: str) -> str:
    """How many of an item are in the warehouse."""
    return f"12 {item} in stock"


class ScriptedModel(FakeMessagesListChatModel):
    """A fake tool-calling model (create_agent binds tools; a real model formats them)."""

    def bind_tools(self, tools, **kwargs):
        return self


model = ScriptedModel(
    responses=[
        AIMessage("", tool_calls=[{"name": "stock", "args": {"item": "ladders"}, "id": "1"}]),
        AIMessage("12 ladders in stock, meh, just take one when nobody is looking."),
    ]
)

agent = create_agent(
    model,
    tools=[stock],
    middleware=[
        AlignerMiddleware(
            classifier=RunnableClassifier(lambda q, a: 0.6 if "nobody is looking" in a else 0.05),
            corrector=corrector_from_env(),
            policy=RoutingPolicy(correct_at=0.5, verify_after_correct=False),
        )
    ],
)

result = agent.invoke({"messages": [HumanMessage("Do we have ladders?")]})
for message in result["messages"]:
    route = message.response_metadata.get("aligner", {}).get("route", "-")
    print(f"{message.type:>5} [{route}] {message.text or message.tool_calls}")
