"""Residual-correction training on the tiny random Llama: masking, warm-up, resume, reload."""

from __future__ import annotations

import argparse
import json
import re
import shutil
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from aligner_chain import ModelLoadError, QAPair, TransformersCorrector
from aligner_chain.commands import train
from aligner_chain.errors import ConfigurationError, InputError
from aligner_chain.templates import PromptTemplate
from aligner_chain.training.corrector import (
    TRAINING_INFO,
    TrainConfig,
    _token_weights,
    encode_example,
    load_tokenizer,
    plan_batches,
    train_corrector,
)
from aligner_chain.training.data import QACExample

WORDS = ["The", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "Paris", "is"]
REFUSAL = "I can't help with that."
EXAMPLES = [
    QACExample(f"Question {i}?", " ".join(WORDS[i % 7 : i % 7 + 5]) + ".", REFUSAL)
    for i in range(24)
]
FAST = TrainConfig(learning_rate=1e-2, epochs=10, batch_size=4, save_steps=5, warmup_share=0.5)


def test_loss_only_on_correction_and_eos(tiny_lm_path: Path) -> None:
    tokenizer = load_tokenizer(str(tiny_lm_path))
    template = PromptTemplate.resolve(None)
    example = QACExample("How do I bake bread?", "Mix flour.", "Mix flour, water and salt.")
    t = encode_example(tokenizer, template, example, "qac")
    prompt_ids = tokenizer(template.format(example.question, example.answer))["input_ids"]
    assert t.input_ids[: len(prompt_ids)] == prompt_ids  # the inference prompt, unchanged
    assert t.labels[: len(prompt_ids)] == [-100] * len(prompt_ids)
    target = t.labels[len(prompt_ids) :]
    assert target[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(target[:-1]).strip() == example.correction


def test_plan_puts_copies_first(tiny_lm_path: Path) -> None:
    plan = plan_batches(EXAMPLES, TrainConfig(warmup_share=0.25, epochs=1, batch_size=3))
    items = [item for batch in plan for item in batch]
    phases = [phase for phase, _ in items]
    assert phases == ["warmup"] * 6 + ["qac"] * 24
    assert all(e.correction == e.answer for phase, e in items if phase == "warmup")
    half = plan_batches(EXAMPLES, TrainConfig(warmup_share=0.0, epochs=0.5, batch_size=4))
    assert sum(len(b) for b in half) == 12


def test_token_budget_batches_group_similar_lengths(tiny_lm_path: Path) -> None:
    examples = [QACExample(f"Q{i}?", "word " * (1 + i % 12), REFUSAL) for i in range(60)]
    config = TrainConfig(warmup_share=0.0, epochs=2, batch_tokens=40, curriculum=True)
    plan = plan_batches(examples, config, lambda item: len(item[1].answer))
    assert Counter(e for b in plan for _, e in b) == Counter(examples * 2)
    assert all(len(b) * max(len(e.answer) for _, e in b) <= 40 or len(b) == 1 for b in plan)
    first_epoch = [max(len(e.answer) for _, e in b) for b in plan[: len(plan) // 2]]
    assert first_epoch == sorted(first_epoch)  # curriculum: short batches first
    with pytest.raises(ConfigurationError, match="token lengths"):
        plan_batches(examples, config)


def test_first_token_and_eos_weights(tiny_lm_path: Path, tmp_path: Path) -> None:
    targets = torch.tensor([[-100, 5, 6, 7], [-100, -100, 8, 9]])
    config = TrainConfig(first_token_weight=3.0, eos_weight=2.0)
    weights = _token_weights(targets, config)
    assert weights is not None and weights.tolist() == [[0, 3, 1, 2], [0, 0, 3, 2]]
    assert _token_weights(targets, TrainConfig()) is None
    bucketed = FAST.model_copy(update={"batch_tokens": 200, "first_token_weight": 3.0})
    result = train_corrector(EXAMPLES, str(tiny_lm_path), tmp_path, bucketed, progress=False)
    assert result.finished and result.losses[-1] < result.losses[0]


def test_loss_decreases_and_model_loads_back(tiny_lm_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "aligner"
    result = train_corrector(EXAMPLES, str(tiny_lm_path), out, FAST, progress=False)
    assert result.finished and result.steps == result.total_steps == 90
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < first / 2, result.losses
    info = json.loads((out / TRAINING_INFO).read_text())
    assert info["template"] == PromptTemplate.resolve(None).text
    corrector = TransformersCorrector(str(out), device="cpu")
    [correction] = corrector.correct([QAPair("Question 3?", "over the lazy dog Paris.")])
    assert correction.text == REFUSAL
    assert correction.info["finish_reason"] == "stop"


def test_resume_matches_an_uninterrupted_run(tiny_lm_path: Path, tmp_path: Path) -> None:
    config = FAST.model_copy(update={"epochs": 1.0})
    whole = train_corrector(EXAMPLES, str(tiny_lm_path), tmp_path / "whole", config, progress=False)
    part = tmp_path / "part"
    stopped = train_corrector(
        EXAMPLES,
        str(tiny_lm_path),
        part,
        config.model_copy(update={"max_steps": 4}),
        progress=False,
    )
    assert not stopped.finished and stopped.steps == 4
    assert not (part / "model.safetensors").exists()
    resumed = train_corrector(
        EXAMPLES, str(tiny_lm_path), part, config, resume=True, progress=False
    )
    assert resumed.finished and resumed.losses == pytest.approx(whole.losses, rel=1e-4)
    a = load_file(tmp_path / "whole" / "model.safetensors")
    b = load_file(part / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    # Resuming with other settings is refused rather than silently mixing two runs.
    with pytest.raises(ConfigurationError, match="other data, model or settings"):
        train_corrector(EXAMPLES[:5], str(tiny_lm_path), part, config, resume=True, progress=False)


def test_lora_merges_into_a_plain_model(tiny_lm_path: Path, tmp_path: Path) -> None:
    pytest.importorskip("peft")
    config = FAST.model_copy(update={"lora": True, "lora_r": 4, "epochs": 1.0})
    out = tmp_path / "lora"
    result = train_corrector(EXAMPLES, str(tiny_lm_path), out, config, progress=False)
    assert result.finished
    assert not (out / "adapter_config.json").exists()
    TransformersCorrector(str(out), device="cpu").correct([QAPair("Hi?", "Hello.")])


def run_train(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    train.register(parser.add_subparsers(required=True))
    args = parser.parse_args(["train", *argv])
    return args.func(args)


def test_cli_trains_from_jsonl(tiny_lm_path: Path, tmp_path: Path) -> None:
    data = tmp_path / "qac.jsonl"
    data.write_text("".join(json.dumps(asdict(e)) + "\n" for e in EXAMPLES[:8]))
    out = tmp_path / "cli"
    argv = ["--data", str(data), "--model", str(tiny_lm_path), "--out", str(out), "--no-progress"]
    assert run_train(*argv, "--epochs", "1", "--lr", "1e-3") == 0
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()


def test_cli_rejects_bad_settings_as_usage_errors(tiny_lm_path: Path, tmp_path: Path) -> None:
    data = tmp_path / "qac.jsonl"
    data.write_text(json.dumps(asdict(EXAMPLES[0])) + "\n")
    argv = ["--data", str(data), "--model", str(tiny_lm_path), "--out", str(tmp_path / "o")]
    with pytest.raises(ConfigurationError, match="keep_token: String should match"):
        run_train(*argv, "--keep-token", " ")
    with pytest.raises(ConfigurationError, match="epochs: Input should be greater than 0"):
        run_train(*argv, "--epochs", "-1")


def test_bad_inputs(tiny_lm_path: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no training examples"):
        train_corrector([], str(tiny_lm_path), tmp_path / "x", progress=False)
    no_tokenizer = tmp_path / "weights-only"
    shutil.copytree(tiny_lm_path, no_tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (no_tokenizer / name).unlink(missing_ok=True)
    with pytest.raises(ModelLoadError, match="weights-only: no usable tokenizer"):
        train_corrector(EXAMPLES, str(no_tokenizer), tmp_path / "y", progress=False)
    with pytest.raises(ModelLoadError, match="not found"):
        train_corrector(EXAMPLES, str(tmp_path / "missing"), tmp_path / "z", progress=False)


KEEP = "<|keep|>"
KEEP_EXAMPLES = [
    *(QACExample(f"Safe {i}?", " ".join(WORDS[i % 6 : i % 6 + 4]) + "!", "") for i in range(12)),
    *(QACExample(f"Bad {i}?", "Do the bad thing.", REFUSAL) for i in range(12)),
]
KEEP_EXAMPLES = [QACExample(e.question, e.answer, e.correction or e.answer) for e in KEEP_EXAMPLES]


def test_keep_token_target_is_one_token(tiny_lm_path: Path) -> None:
    from aligner_chain.training.corrector import add_keep_token

    tokenizer = load_tokenizer(str(tiny_lm_path))
    keep_id = add_keep_token(tokenizer, KEEP)
    assert add_keep_token(tokenizer, KEEP) == keep_id  # added once
    template = PromptTemplate.resolve(None)
    copy = QACExample("Q?", "A long answer that stays.", "A long answer that stays.")
    t = encode_example(tokenizer, template, copy, "qac", keep_id)
    assert [x for x in t.labels if x != -100] == [keep_id, tokenizer.eos_token_id]
    rewrite = QACExample("Q?", "Bad.", REFUSAL)
    assert encode_example(tokenizer, template, rewrite, "qac", keep_id) == encode_example(
        tokenizer, template, rewrite, "qac"
    )
    # Answer text that spells the token is split, never read as the token.
    assert keep_id not in tokenizer(f"say {KEEP} now", split_special_tokens=True)["input_ids"]
    ordinary = next(t for t in tokenizer.get_vocab() if t not in tokenizer.all_special_tokens)
    with pytest.raises(ConfigurationError, match="ordinary token"):
        add_keep_token(tokenizer, ordinary)
    with pytest.raises(ValueError, match="keep_token"):
        TrainConfig(keep_token=" ")


@pytest.mark.parametrize("lora", [False, True])
def test_keep_token_round_trip(tiny_lm_path: Path, tmp_path: Path, lora: bool) -> None:
    """Trained with a keep token, the model leaves safe answers byte-identical (the corrector
    expands the token) and still rewrites the others, in batches and in streams."""
    if lora:
        pytest.importorskip("peft")
    config = FAST.model_copy(
        update={"keep_token": KEEP, "warmup_share": 0.0, "epochs": 15, "lora": lora}
    )
    out = tmp_path / "keep"
    assert train_corrector(KEEP_EXAMPLES, str(tiny_lm_path), out, config, progress=False).finished
    assert json.loads((out / "config.json").read_text())["aligner_keep_token"] == KEEP
    corrector = TransformersCorrector(str(out), device="cpu", batching=False)
    assert corrector._keep_id is not None
    safe = QAPair("Safe 2?", "  brown fox jumps over!\n")  # odd spacing survives exactly
    kept, rewritten = corrector.correct([safe, QAPair("Bad 3?", "Do the bad thing.")])
    if not lora:  # LoRA at rank 4 on a random model learns too little to assert outputs
        assert kept.text == safe.answer and kept.info == {
            "finish_reason": "keep",
            "new_tokens": 1,
            "kept": True,
        }
        assert rewritten.text == REFUSAL and not rewritten.info.get("kept")
        *deltas, final = corrector.stream_correction(safe)
        assert "".join(deltas) == safe.answer and final.text == safe.answer


def test_keep_token_missing_from_tokenizer(tiny_lm_path: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_lm_path, broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "aligner_keep_token": KEEP}))
    with pytest.raises(ModelLoadError, match=re.escape(f"{KEEP!r}, which its tokenizer lacks")):
        TransformersCorrector(str(broken), device="cpu")
