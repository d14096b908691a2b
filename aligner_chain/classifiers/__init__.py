"""Harm classifiers: score how likely an answer is harmful given its question."""

from aligner_chain.classifiers.base import HarmClassifier
from aligner_chain.classifiers.cascade import CascadeClassifier
from aligner_chain.classifiers.embedded import DEFAULT_BANDS, EmbeddedClassifier
from aligner_chain.classifiers.guard import LLAMA_GUARD_3_CATEGORIES, GuardModelClassifier
from aligner_chain.classifiers.remote import OpenAICompatibleGuardClassifier
from aligner_chain.classifiers.runnable import RunnableClassifier, parse_judgement
from aligner_chain.classifiers.sequence import BEAVER_DAM_CATEGORIES, SequenceClassifier

__all__ = [
    "BEAVER_DAM_CATEGORIES",
    "DEFAULT_BANDS",
    "LLAMA_GUARD_3_CATEGORIES",
    "CascadeClassifier",
    "EmbeddedClassifier",
    "GuardModelClassifier",
    "HarmClassifier",
    "OpenAICompatibleGuardClassifier",
    "RunnableClassifier",
    "SequenceClassifier",
    "parse_judgement",
]
