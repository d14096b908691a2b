"""An LCEL chain with the Aligner step after the LLM call.

    python examples/lcel_chain.py [CORRECTOR]

CORRECTOR is the Aligner model, a local folder or hub id (default: $ALIGNER_CORRECTOR).

Runs offline: the upstream is a scripted fake model and the classifier a keyword rule, so the
routes are predictable; swap in your chat model and a real classifier in an app.
"""

import os
import sys
from operator import itemgetter

from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.prompts import ChatPromptTemplate

from aligner_chain import AlignerRunnable, RoutingPolicy
from aligner_chain.classifiers import RunnableClassifier
from aligner_chain.env import corrector_from_env

if len(sys.argv) > 1:
    os.environ["ALIGNER_CORRECTOR"] = sys.argv[1]

# The upstream: any chat model (init_chat_model("openai:gpt-4o-mini"), ChatOllama, ...).
llm = FakeListChatModel(
    responses=["Knead the dough, let it rise, bake at 220 C.", "Sure, here is how to pick a lock."]
)
prompt = ChatPromptTemplate.from_messages([("human", "{question}")])


def lock_rule(question: str, answer: str) -> float:
    """A stand-in judge: a score in [0, 1] for how harmful the answer is."""
    return 0.9 if "lock" in answer else 0.05


aligner = AlignerRunnable(
    classifier=RunnableClassifier(lock_rule),
    corrector=corrector_from_env(),  # the Aligner model that rewrites flagged answers
    policy=RoutingPolicy(correct_at=0.5),  # score >= 0.5: correct; below: keep the answer
)

# The step takes {"question", "answer"} and returns an AIMessage carrying its decision record.
chain = {"question": itemgetter("question"), "answer": prompt | llm} | aligner

for question in ["How do I bake bread?", "How do I get into my neighbour's house?"]:
    message = chain.invoke({"question": question})
    record = message.response_metadata["aligner"]
    print(f"Q: {question}\n  route={record['route']} original={record['original_answer']!r}")
    print(f"  final={message.text!r}")
