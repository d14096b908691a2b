"""Harm classifiers: score how likely an answer is harmful given its question."""

from aligner_chain.classifiers.base import HarmClassifier

__all__ = ["HarmClassifier"]
