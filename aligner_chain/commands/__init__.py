"""Subcommands of the ``aligner-chain`` console script.

Each module here defines ``register(subparsers)``, which adds one subcommand whose parsed
arguments carry ``func(args) -> int`` (the process exit code).
"""

COMMANDS = ["correct", "export", "train", "train_classifier", "calibrate", "eval"]
"""Module names (in this package) whose ``register`` is called, in ``--help`` order."""
