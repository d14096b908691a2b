"""What can be checked of integrations/ without a GPU: script syntax, dry runs, configs, the
pass-through chat template and the client settings. (The transformers serve path runs end to
end in test_remote.py.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from aligner_chain.classifiers.remote import OpenAICompatibleGuardClassifier
from aligner_chain.correctors.remote import OpenAICompatibleCorrector

ROOT = Path(__file__).parents[1] / "integrations"
SCRIPTS = sorted(ROOT.rglob("*.sh"))
BASH = shutil.which("bash")

pytestmark = pytest.mark.skipif(BASH is None, reason="needs bash")


def dry_run(script: Path, *args: str, **env: str) -> str:
    result = subprocess.run(
        [BASH, str(script), *args],
        env={**os.environ, "DRY_RUN": "1", **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return result.stdout


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_scripts_parse_and_are_executable(script: Path) -> None:
    subprocess.run([BASH, "-n", str(script)], check=True, timeout=30)
    assert os.access(script, os.X_OK)


def test_vllm_aligner_launch() -> None:
    out = dry_run(ROOT / "vllm" / "serve_aligner.sh", TP="4", ALIGNER_API_KEY="sk-dry")
    assert out.startswith("vllm serve aligner/aligner-7b-v1.0 --config ")
    assert "--tensor-parallel-size 4" in out
    assert "sk-dry" not in out  # the key travels as VLLM_API_KEY, not in argv
    out = dry_run(ROOT / "vllm" / "serve_aligner.sh", NGRAM_TOKENS="8")
    assert '\\"num_speculative_tokens\\":\\ 8' in out


def test_vllm_guard_and_ray_launch() -> None:
    assert "meta-llama/Llama-Guard-3-8B" in dry_run(ROOT / "vllm" / "serve_guard.sh")
    ray = ROOT / "vllm" / "ray_multinode.sh"
    assert dry_run(ray, "head").startswith("ray start --head --port 6379")
    assert "--address 10.0.0.1:6379" in dry_run(ray, "worker", "10.0.0.1")
    serve = dry_run(ray, "serve", NODES="3", GPUS_PER_NODE="4")
    for flag in (
        "--tensor-parallel-size 4",
        "--pipeline-parallel-size 3",
        "--distributed-executor-backend ray",
    ):
        assert flag in serve
    bad = subprocess.run([BASH, str(ray), "nonsense"], capture_output=True, timeout=30)
    assert bad.returncode == 2


def test_vllm_configs() -> None:
    aligner = yaml.safe_load((ROOT / "vllm" / "aligner.yaml").read_text())
    assert aligner["enable-prefix-caching"] is True and aligner["max-model-len"] == 2048
    spec = json.loads(aligner["speculative-config"])
    assert spec["method"] == "ngram" and spec["prompt_lookup_max"] >= spec["prompt_lookup_min"]
    guard = yaml.safe_load((ROOT / "vllm" / "llama-guard-3.yaml").read_text())
    assert guard["enable-prefix-caching"] is True and guard["max-logprobs"] >= 5


def test_client_settings_build_the_clients(tiny_lm_path: Path) -> None:
    cfg = yaml.safe_load((ROOT / "vllm" / "client.yaml").read_text())
    aligner = yaml.safe_load((ROOT / "vllm" / "aligner.yaml").read_text())
    guard_server = yaml.safe_load((ROOT / "vllm" / "llama-guard-3.yaml").read_text())
    corrector_cfg = {**cfg["corrector"], "tokenizer": str(tiny_lm_path)}  # no hub here
    corrector = OpenAICompatibleCorrector(**corrector_cfg)
    assert corrector.model == aligner["served-model-name"]
    assert corrector.context == aligner["max-model-len"]
    guard = OpenAICompatibleGuardClassifier.llama_guard_3(**cfg["guard"])
    assert guard.model == guard_server["served-model-name"]
    assert guard.top_logprobs <= guard_server["max-logprobs"]


def test_passthrough_template_renders_exactly_the_aligner_prompt(tiny_lm_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_path)
    prompt = "BEGINNING OF CONVERSATION: USER: Edit ... {q} | {a} ASSISTANT:"
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        chat_template=(ROOT / "vllm" / "passthrough.jinja").read_text(),
        tokenize=False,
        add_generation_prompt=True,
    )
    assert rendered == tokenizer.bos_token + prompt
