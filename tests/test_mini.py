"""The mini Aligner preset: its data mix, its from-scratch backbone, and the shipped loader."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

import pytest

from aligner_chain import ModelLoadError, QAPair, TransformersCorrector
from aligner_chain.commands import train
from aligner_chain.correctors import mini
from aligner_chain.errors import InputError
from aligner_chain.training.data import QACExample
from aligner_chain.training.mini import (
    DEMO_HARMFUL,
    DEMO_SAFE,
    KEEP_TOKEN,
    MAX_CHARS,
    MAX_QUESTION_CHARS,
    MiniConfig,
    MiniMix,
    _correct_all,
    _flagged,
    build_backbone,
    build_mini_mix,
    choose_keep_bias,
    training_examples,
    write_model_card,
)

TINY = MiniConfig(vocab_size=400, hidden_size=32, layers=2, heads=2, intermediate_size=64)


def test_mix_pairs_harmful_to_safe_and_holds_questions_out(shared_data: Path) -> None:
    mix = build_mini_mix(shared_data)
    copies = [e for e in mix.train if e.answer == e.correction]
    corrections = [e for e in mix.train if e.answer != e.correction]
    assert len(corrections) > 1000 and len(copies) > len(corrections)  # as many as the data has
    assert all(
        len(e.question) <= MAX_QUESTION_CHARS and len(e.answer.strip()) <= MAX_CHARS
        for e in mix.train + mix.safe_eval + mix.harmful_eval
    )
    seen = {e.question for e in mix.train}
    assert not [e for e in mix.safe_eval + mix.harmful_eval if e.question in seen]
    assert len(mix.safe_eval) == len(mix.harmful_eval) == 200
    # Validation pairs (they choose the keep bias): unseen too, and apart from the held-out ones.
    assert len(mix.safe_val) == len(mix.harmful_val) == 400
    assert not {e.question for e in mix.safe_val + mix.harmful_val} & seen
    assert not set(mix.safe_val + mix.harmful_val) & set(mix.safe_eval + mix.harmful_eval)
    # The held-out sample does not move when the training mix is drawn differently.
    other = build_mini_mix(shared_data, MiniConfig(copies_per_correction=1.0))
    assert (other.safe_eval, other.harmful_eval) == (mix.safe_eval, mix.harmful_eval)
    assert other.train != mix.train


def test_training_examples_add_copies_of_corrections(shared_data: Path) -> None:
    mix = build_mini_mix(shared_data)
    examples = training_examples(mix)
    assert set(mix.train) <= set(examples)
    corrections = {e.correction for e in mix.train if e.answer != e.correction}
    assert sum(e.answer == e.correction and e.answer in corrections for e in examples) > 1000
    assert MiniConfig().train.keep_token == KEEP_TOKEN  # copies train as one token


def test_backbone_is_cased_and_loads_as_a_corrector(tmp_path: Path) -> None:
    texts = ["Hello, World! The QUICK brown fox.", "I can't help with that."] * 50
    out = build_backbone(texts, tmp_path / "init", TINY)
    corrector = TransformersCorrector(str(out), device="cpu")
    tokenizer = corrector.loaded.tokenizer
    text = "Hello, World!  The QUICK brown fox."
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    [correction] = corrector.correct([QAPair("Hi?", "Hello, World!")])
    assert isinstance(correction.text, str)


def test_missing_weights_are_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mini, "ASSET_DIR", tmp_path / "absent")
    with pytest.raises(ModelLoadError, match="absent: the mini Aligner weights are missing"):
        mini.mini_corrector()


def run_train(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    train.register(parser.add_subparsers(required=True))
    args = parser.parse_args(["train", *argv])
    return args.func(args)


def test_cli_argument_checks(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="--data and --model are required"):
        run_train("--out", str(tmp_path))
    with pytest.raises(InputError, match="drop --data/--model"):
        run_train("--preset", "mini", "--model", "x", "--out", str(tmp_path))


def test_model_card_states_the_measured_figures(tmp_path: Path) -> None:
    out = build_backbone(["Hello, World!"] * 20, tmp_path / "model", TINY)
    example = {"question": "Q?", "answer": "A.", "correction": "A."}
    report = {
        "safe_pairs": 200,
        "safe_exact_copy_rate": 0.915,
        "harmful_pairs": 200,
        "harmful_changed_rate": 0.8,
        "harmful_flagged_before": 0.9,
        "harmful_flagged_after": 0.25,
        "harmful_unflagged_after_rate": 0.75,
        "seconds_per_pair": 0.05,
        "examples": [example] * 5,
        "train_examples": 5000,
        "train_seconds": 1800,
        "total_seconds": 2400,
        "process_cpu_seconds": 3000,
        "command": "aligner-chain train --preset mini --out DIR",
        "config": asdict(TINY) | {"train": TINY.train.model_dump()},
    }
    card = write_model_card(out, report).read_text()
    assert "91.5 % of 200" in card and "75.0 %" in card and "30 min wall-clock" in card
    assert "--preset mini" in card and f"`{KEEP_TOKEN}`" in card and "it meets both" in card


def test_keep_bias_chosen_on_validation_pairs_is_what_the_corrector_does(tmp_path: Path) -> None:
    """The rates ``choose_keep_bias`` reports for its bias (computed from margins, not by
    decoding with it) are those of a corrector loaded afresh from the folder it wrote."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from aligner_chain.loading import clear_cache
    from aligner_chain.training.corrector import add_keep_token

    out = build_backbone(["Hello, World! I can't help with that."] * 20, tmp_path / "m", TINY)
    tokenizer = AutoTokenizer.from_pretrained(out)
    add_keep_token(tokenizer, KEEP_TOKEN)
    model = AutoModelForCausalLM.from_pretrained(out)
    model.resize_token_embeddings(len(tokenizer))
    model.config.aligner_keep_token = KEEP_TOKEN
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    safe = [*DEMO_SAFE, QACExample("Hi!", "Hello, World!", "")]
    harmful = [*DEMO_HARMFUL, QACExample("Hurt him?", "Hit him hard with a bat.", "")]
    mix = MiniMix([], [], [], safe, harmful)
    choice = choose_keep_bias(out, mix)
    assert json.loads((out / "config.json").read_text())["aligner_keep_bias"] == choice["keep_bias"]
    clear_cache()
    corrector = TransformersCorrector(str(out), template=mini.TEMPLATE, batching=False)
    assert corrector.keep_bias == choice["keep_bias"]
    copied = [o == e.answer for o, e in zip(_correct_all(corrector, safe), safe)]
    assert choice["val_safe_kept"] == sum(copied) / len(safe)
    after = _flagged([(e.question, o) for e, o in zip(harmful, _correct_all(corrector, harmful))])
    assert choice["val_harmful_unflagged"] == sum(not f for f in after) / len(harmful)
    with pytest.raises(ValueError, match="both labels"):
        choose_keep_bias(out, MiniMix([], [], [], safe, []))
