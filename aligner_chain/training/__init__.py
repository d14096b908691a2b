"""The learning loop: turning logged corrections into data, and training Aligners on it.

Submodules import torch only where they train, so exporting data stays light.
"""
