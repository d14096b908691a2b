"""The embedded mini Aligner: a small corrector that ships with the package and runs on a CPU.

It copies safe answers and replaces harmful ones with safe answers; it does not make the
helpfulness rewrites of a full Aligner. Its training command, data and measured figures are in
``aligner_chain/assets/mini_aligner/MODEL_CARD.md``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aligner_chain.correctors.transformers import TransformersCorrector
from aligner_chain.errors import ModelLoadError

ASSET_DIR = Path(__file__).resolve().parents[1] / "assets" / "mini_aligner"
TEMPLATE = "aligner-7b-v1.0"
"""The prompt the mini Aligner was trained with (training and inference must match)."""
MODEL_ID = "aligner-chain/mini-aligner"


def mini_corrector(**kwargs: Any) -> TransformersCorrector:
    """The shipped mini Aligner; keyword arguments go to :class:`TransformersCorrector`."""
    if not (ASSET_DIR / "config.json").is_file():
        raise ModelLoadError(
            f"{ASSET_DIR}: the mini Aligner weights are missing from this installation; "
            "rebuild them with `aligner-chain train --preset mini --out DIR`"
        )
    kwargs.setdefault("template", TEMPLATE)
    kwargs.setdefault("model_id", MODEL_ID)
    kwargs.setdefault("device", "cpu")
    return TransformersCorrector(str(ASSET_DIR), **kwargs)
