"""Correctors: models that rewrite a (question, answer) pair into a better answer."""

from aligner_chain.correctors.base import Corrector
from aligner_chain.correctors.remote import OpenAICompatibleCorrector
from aligner_chain.correctors.transformers import TransformersCorrector

__all__ = ["Corrector", "OpenAICompatibleCorrector", "TransformersCorrector"]
