"""The components used when the caller names none: the models that ship with the package."""

from __future__ import annotations

from aligner_chain.classifiers.base import HarmClassifier
from aligner_chain.correctors.base import Corrector
from aligner_chain.errors import ConfigurationError


def default_classifier() -> HarmClassifier:
    """The embedded CPU classifier shipped in the package."""
    try:
        from aligner_chain.classifiers.embedded import EmbeddedClassifier
    except ImportError as exc:
        raise ConfigurationError(
            "no classifier given and this installation has no embedded classifier"
        ) from exc
    return EmbeddedClassifier()


def default_corrector() -> Corrector:
    """The embedded mini Aligner shipped in the package."""
    try:
        from aligner_chain.correctors.mini import mini_corrector
    except ImportError as exc:
        raise ConfigurationError(
            "no corrector given and this installation has no embedded mini Aligner: "
            "pass a model folder or hub id (e.g. --model aligner/aligner-7b-v1.0)"
        ) from exc
    return mini_corrector()
