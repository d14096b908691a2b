"""Building the Aligner step and the upstream model from environment variables.

The deployable graphs in ``graphs/`` are loaded by the LangGraph CLI/server, which passes no
arguments: everything comes from the environment (or the ``.env`` file ``langgraph.json`` names).

- ``ALIGNER_UPSTREAM``: the upstream chat model as an ``init_chat_model`` spec
  (``openai:gpt-4o-mini``, ``ollama:llama3.1``). Unset: the offline demo model
  (:class:`DemoChatModel`), which only echoes; it exists so the graphs run without a network.
- ``ALIGNER_CORRECTOR``: the corrector, a local model folder or hub id; with
  ``ALIGNER_CORRECTOR_URL`` (an OpenAI-compatible server such as vLLM), the served model's name,
  also used to load its tokenizer. Unset: the embedded mini Aligner, when installed.
- ``ALIGNER_CLASSIFIER``: ``embedded`` (default, when installed), ``none`` (correct every
  answer, the paper's setting), ``judge:<init_chat_model spec>`` (an LLM judge),
  ``guard:<model>`` (a Llama-Guard-style model) or a sequence-classifier folder or hub id.
- ``ALIGNER_POLICY``: a routing policy file (``.yaml``/``.json``).
- ``ALIGNER_TEMPLATE``: the corrector's prompt preset or format string.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import Field

from aligner_chain import defaults
from aligner_chain.classifiers.base import HarmClassifier
from aligner_chain.correctors.base import Corrector
from aligner_chain.errors import AlignerError, ConfigurationError
from aligner_chain.routing import RoutingPolicy
from aligner_chain.runnable import AlignerRunnable

logger = logging.getLogger(__name__)

UPSTREAM = "ALIGNER_UPSTREAM"
CORRECTOR = "ALIGNER_CORRECTOR"
CORRECTOR_URL = "ALIGNER_CORRECTOR_URL"
CLASSIFIER = "ALIGNER_CLASSIFIER"
POLICY = "ALIGNER_POLICY"
TEMPLATE = "ALIGNER_TEMPLATE"


def _env(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or None


def upstream_from_env() -> BaseChatModel:
    """The chat model named by ``ALIGNER_UPSTREAM``, or the offline demo model."""
    spec = _env(UPSTREAM)
    if spec is None:
        logger.warning("%s is not set: using the offline demo model, which only echoes", UPSTREAM)
        return DemoChatModel()
    return _chat_model(spec)


def classifier_from_spec(spec: str) -> HarmClassifier | None:
    """A classifier from a spec: ``embedded``, ``none`` (None: correct every answer),
    ``judge:<init_chat_model spec>``, ``guard:<model>``, or a sequence-classifier folder or id."""
    if spec == "none":
        return None
    if spec == "embedded":
        return _shipped(defaults.default_classifier, f"name another classifier ({CLASSIFIER})")
    if spec.startswith("judge:"):
        from aligner_chain.classifiers.runnable import RunnableClassifier

        return RunnableClassifier(_chat_model(spec.removeprefix("judge:")))
    if spec.startswith("guard:"):
        from aligner_chain.classifiers.guard import GuardModelClassifier

        return GuardModelClassifier(spec.removeprefix("guard:"))
    from aligner_chain.classifiers.sequence import SequenceClassifier

    return SequenceClassifier(spec)


def corrector_from_spec(
    model: str | None = None, url: str | None = None, template: str | None = None
) -> Corrector:
    """A corrector: a local folder or hub id, or (with ``url``) an OpenAI-compatible server
    serving ``model``; neither: the embedded mini Aligner, which keeps the prompt it was
    trained on, so it cannot take a ``template``."""
    if url is not None:
        if model is None:
            raise ConfigurationError(
                f"a corrector URL ({CORRECTOR_URL}) needs the served model's name "
                f"({CORRECTOR}); its tokenizer is loaded locally to build the prompt"
            )
        from aligner_chain.correctors.remote import OpenAICompatibleCorrector

        return OpenAICompatibleCorrector(url, model, template=template)
    if model is not None:
        from aligner_chain.correctors.transformers import TransformersCorrector

        return TransformersCorrector(model, template=template)
    if template is not None:
        raise ConfigurationError(
            f"the prompt template {template!r} needs a corrector model ({CORRECTOR} or "
            f"{CORRECTOR_URL}): the embedded mini Aligner only takes the prompt it was trained on"
        )
    return _shipped(
        defaults.default_corrector, f"name a corrector ({CORRECTOR} or {CORRECTOR_URL})"
    )


def build_aligner(
    *,
    classifier: str = "embedded",
    model: str | None = None,
    url: str | None = None,
    policy: str | None = None,
    template: str | None = None,
) -> AlignerRunnable:
    """The whole step from specs (what the CLI's flags and the graphs' variables name)."""
    loaded = RoutingPolicy.load(policy) if policy else None
    judge = classifier_from_spec(classifier)
    if judge is None:
        loaded = (loaded or RoutingPolicy()).model_copy(update={"mode": "always"})
    shadow = loaded is not None and loaded.mode == "shadow"
    corrector = None if shadow else corrector_from_spec(model, url, template)
    # Without a policy file the classifier's own fitted bands apply.
    return AlignerRunnable(classifier=judge, corrector=corrector, policy=loaded)


def classifier_from_env() -> HarmClassifier | None:
    """The classifier named by ``ALIGNER_CLASSIFIER``; None for ``none``."""
    return classifier_from_spec(_env(CLASSIFIER) or "embedded")


def corrector_from_env(template: str | None = None) -> Corrector:
    """The corrector named by ``ALIGNER_CORRECTOR`` / ``ALIGNER_CORRECTOR_URL``;
    ``template`` overrides ``ALIGNER_TEMPLATE`` (the RAG graph needs ``aligner-rag``)."""
    return corrector_from_spec(_env(CORRECTOR), _env(CORRECTOR_URL), template or _env(TEMPLATE))


def aligner_from_env(template: str | None = None) -> AlignerRunnable:
    """The whole step: classifier, corrector and policy from the environment."""
    return build_aligner(
        classifier=_env(CLASSIFIER) or "embedded",
        model=_env(CORRECTOR),
        url=_env(CORRECTOR_URL),
        policy=_env(POLICY),
        template=template or _env(TEMPLATE),
    )


def _shipped(factory: Any, hint: str) -> Any:
    """A shipped default model, or a ConfigurationError that names the variable to set."""
    try:
        return factory()
    except (AlignerError, ImportError, OSError) as exc:
        raise ConfigurationError(f"{exc}; {hint}") from exc


def _chat_model(spec: str) -> BaseChatModel:
    try:
        from langchain.chat_models import init_chat_model
    except ImportError as exc:
        raise ConfigurationError(
            f"the model spec {spec!r} needs langchain: pip install 'aligner-chain[agents]'"
        ) from exc
    return init_chat_model(spec)


class DemoChatModel(BaseChatModel):
    """The offline demo upstream: no model, no network, deterministic.

    It answers ``Offline demo answer: <the last human text>``. With tools bound, it first calls
    the first tool with the human text as its first argument, then answers with the tool's
    result. Set ``ALIGNER_UPSTREAM`` for a real model.
    """

    tool_specs: list[dict[str, Any]] = Field(default_factory=list)

    @property
    def _llm_type(self) -> str:
        return "aligner-demo"

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> Runnable:
        specs = [convert_to_openai_tool(t)["function"] for t in tools]
        return self.model_copy(update={"tool_specs": specs})

    def _generate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kw: Any
    ) -> ChatResult:
        last = messages[-1] if messages else None
        human = next((m.text for m in reversed(messages) if isinstance(m, HumanMessage)), "")
        if isinstance(last, ToolMessage):
            reply = AIMessage(f"Offline demo answer, from the tool: {last.text}")
        elif self.tool_specs and isinstance(last, HumanMessage):
            spec = self.tool_specs[0]
            arg = next(iter(spec.get("parameters", {}).get("properties", {})), "input")
            call = {"name": spec["name"], "args": {arg: human}, "id": f"demo-{len(messages)}"}
            reply = AIMessage("", tool_calls=[call])
        else:
            reply = AIMessage(f"Offline demo answer: {human}")
        return ChatResult(generations=[ChatGeneration(message=reply)])
