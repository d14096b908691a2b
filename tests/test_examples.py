"""Every script in examples/ runs offline with the tiny local corrector (as CI runs them)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parents[1] / "examples"

EXPECTED = {
    "lcel_chain.py": ["route=skip", "route=correct"],
    "own_graph.py": ["[reask]", "[skip] It is sunny in Paris today."],
    "guarded_rag.py": ["route=correct", "original='Mixing them"],
    "chat_model_streaming.py": ["A: Tea is best brewed at 80 C.", "route=correct"],
    "agent_middleware.py": [" tool [-] 12 ladders in stock", "   ai [correct]"],
}


def test_every_example_is_covered() -> None:
    assert {p.name for p in EXAMPLES.glob("*.py")} == set(EXPECTED)


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_example_runs(script: str, tiny_lm_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("ALIGNER_CORRECTOR", None)
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script), str(tiny_lm_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for marker in EXPECTED[script]:
        assert marker in done.stdout
