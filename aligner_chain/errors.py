"""The exceptions aligner-chain raises: one hierarchy rooted in :class:`AlignerError`.

Catch ``AlignerError`` to handle everything the library raises on purpose; the subclasses say
which stage failed so an application can react (retry a remote corrector, fix a policy file, ...).
"""

from __future__ import annotations


class AlignerError(Exception):
    """Base class of every error raised on purpose by aligner-chain."""


class InputError(AlignerError, ValueError):
    """The input cannot be judged: wrong type, empty text, no question or answer, too large."""


class ConfigurationError(AlignerError, ValueError):
    """A policy, template or component is configured inconsistently (bad file, bad value)."""


class ModelLoadError(AlignerError, OSError):
    """A model or tokenizer could not be loaded from the given path or hub id."""


class ClassifierError(AlignerError, RuntimeError):
    """A harm classifier failed while scoring (model error, remote failure, unparsable judge)."""


class CorrectorError(AlignerError, RuntimeError):
    """A corrector failed while generating, or produced no usable correction."""


class RefusedError(AlignerError):
    """Raised when the policy's fallback is ``raise`` and an answer could not be made safe.

    The decision record (with the original answer) travels on the exception as ``record``.
    """

    def __init__(self, message: str, record: object | None = None) -> None:
        super().__init__(message)
        self.record = record


class BackpressureError(AlignerError, RuntimeError):
    """A bounded request queue is full: the caller should retry later or shed load."""
