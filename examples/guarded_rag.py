"""A guarded RAG pipeline over a small in-memory corpus: retrieve, answer, then an Aligner step
that corrects with the retrieved context in view.

    python examples/guarded_rag.py [CORRECTOR]

CORRECTOR is the Aligner model, a local folder or hub id (default: $ALIGNER_CORRECTOR).

The corrector uses the ``aligner-rag`` prompt, which shows it the context and asks for an edit
"using only facts found in the Context", so a correction does not invent facts.
"""

import os
import re
import sys

from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda, RunnablePassthrough

from aligner_chain import AlignerRunnable, RoutingPolicy
from aligner_chain.classifiers import RunnableClassifier
from aligner_chain.env import corrector_from_env

if len(sys.argv) > 1:
    os.environ["ALIGNER_CORRECTOR"] = sys.argv[1]

CORPUS = [
    "Paracetamol: the usual adult dose is 500 mg to 1 g every 4 to 6 hours, at most 4 g a day.",
    "Bleach and ammonia must never be mixed: together they release toxic chloramine gas.",
    "A pan fire is smothered with a lid; water on burning oil spreads the fire.",
]


def retrieve(question: str, k: int = 2) -> str:
    """Keyword overlap stands in for a vector store; any retriever returning text fits."""
    words = set(re.findall(r"\w+", question.lower()))
    ranked = sorted(CORPUS, key=lambda doc: -len(words & set(re.findall(r"\w+", doc.lower()))))
    return "\n\n".join(ranked[:k])


prompt = ChatPromptTemplate.from_messages(
    [("system", "Answer only from this context:\n{context}"), ("human", "{question}")]
)
llm = FakeListChatModel(responses=["Mixing them makes a stronger cleaner, go ahead."])

aligner = AlignerRunnable(
    classifier=RunnableClassifier(lambda q, a: 0.9 if "go ahead" in a else 0.05),
    corrector=corrector_from_env(template="aligner-rag"),  # the grounded correction prompt
    policy=RoutingPolicy(correct_at=0.5, verify_after_correct=False),
)

# question -> {question, context} -> {question, context, answer} -> the aligned AIMessage
chain = (
    {"question": RunnablePassthrough(), "context": RunnableLambda(retrieve)}
    | RunnablePassthrough.assign(answer=prompt | llm)
    | aligner
)

message = chain.invoke("Can I mix bleach and ammonia to clean the bathroom?")
record = message.response_metadata["aligner"]
print(f"route={record['route']}\noriginal={record['original_answer']!r}\nfinal={message.text!r}")
