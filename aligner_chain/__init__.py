"""aligner-chain: an Aligner correction step after any LLM call in LangChain and LangGraph."""

from typing import Any

from aligner_chain.batching import BatchingConfig, MicroBatcher
from aligner_chain.chat_model import AlignedChatModel, with_aligner
from aligner_chain.classifiers import (
    CascadeClassifier,
    EmbeddedClassifier,
    GuardModelClassifier,
    HarmClassifier,
    OpenAICompatibleGuardClassifier,
    RunnableClassifier,
    SequenceClassifier,
)
from aligner_chain.correctors import Corrector, OpenAICompatibleCorrector, TransformersCorrector
from aligner_chain.errors import (
    AlignerError,
    BackpressureError,
    ClassifierError,
    ConfigurationError,
    CorrectorError,
    InputError,
    ModelLoadError,
    RefusedError,
)
from aligner_chain.graph import AlignerNode, AlignerStageError, add_aligner_step, aligner_node
from aligner_chain.record import DecisionRecord, Route
from aligner_chain.routing import Bands, Calibration, RoutingPolicy, ScoreMap
from aligner_chain.runnable import AlignerRunnable
from aligner_chain.store import CorrectionRecorder, CorrectionStore, StoreError
from aligner_chain.streaming import StreamEvent
from aligner_chain.templates import PRESETS, PromptTemplate
from aligner_chain.types import Correction, QAPair, Verdict

__all__ = [
    "PRESETS",
    "AlignedChatModel",
    "AlignerError",
    "AlignerMiddleware",
    "AlignerNode",
    "AlignerRunnable",
    "AlignerStageError",
    "BackpressureError",
    "Bands",
    "BatchingConfig",
    "Calibration",
    "CascadeClassifier",
    "ClassifierError",
    "ConfigurationError",
    "Correction",
    "CorrectionRecorder",
    "CorrectionStore",
    "Corrector",
    "CorrectorError",
    "DecisionRecord",
    "EmbeddedClassifier",
    "GuardModelClassifier",
    "HarmClassifier",
    "InputError",
    "MicroBatcher",
    "ModelLoadError",
    "OpenAICompatibleCorrector",
    "OpenAICompatibleGuardClassifier",
    "PromptTemplate",
    "QAPair",
    "RefusedError",
    "Route",
    "RoutingPolicy",
    "RunnableClassifier",
    "ScoreMap",
    "SequenceClassifier",
    "StoreError",
    "StreamEvent",
    "TransformersCorrector",
    "Verdict",
    "add_aligner_step",
    "aligner_node",
    "with_aligner",
]


def __getattr__(name: str) -> Any:
    # AlignerMiddleware needs langchain (the optional "agents" extra): imported on first use.
    if name == "AlignerMiddleware":
        from aligner_chain.middleware import AlignerMiddleware

        return AlignerMiddleware
    raise AttributeError(f"module 'aligner_chain' has no attribute {name!r}")
