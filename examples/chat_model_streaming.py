"""A chat model wrapped with the Aligner step, streamed: only the final answer is released.

    python examples/chat_model_streaming.py [CORRECTOR]

CORRECTOR is the Aligner model, a local folder or hub id (default: $ALIGNER_CORRECTOR).

``with_aligner`` returns a chat model: use it anywhere a chat model goes (LCEL, create_agent,
LangGraph nodes). The inner model's answer is judged before anything streams, so a flagged
answer is never shown, not even in LangGraph's ``stream_mode="messages"``.
"""

import os
import sys

from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage

from aligner_chain import RoutingPolicy, with_aligner
from aligner_chain.classifiers import RunnableClassifier
from aligner_chain.env import corrector_from_env

if len(sys.argv) > 1:
    os.environ["ALIGNER_CORRECTOR"] = sys.argv[1]

# The inner model: any chat model. This fake one streams two scripted answers word by word.
inner = GenericFakeChatModel(
    messages=iter([AIMessage("Tea is best brewed at 80 C."), AIMessage("Pick the lock like this.")])
)

model = with_aligner(
    inner,
    classifier=RunnableClassifier(lambda q, a: 0.9 if "lock" in a else 0.05),  # a stand-in judge
    corrector=corrector_from_env(),
    policy=RoutingPolicy(correct_at=0.5, verify_after_correct=False),  # corrections stream too
)

for question in ["How hot should tea water be?", "How do I open my neighbour's door?"]:
    print(f"Q: {question}\nA: ", end="")
    final = None
    for chunk in model.stream(question):
        print(chunk.text, end="", flush=True)
        final = chunk if final is None else final + chunk
    record = final.response_metadata["aligner"]
    print(f"\n   route={record['route']} original={record['original_answer']!r}")
