"""The aligner-chain console script, run as a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aligner_chain.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def correct_tiny(model, *extra: str) -> subprocess.CompletedProcess[str]:
    """``correct`` on the tiny model, correcting every answer (no classifier)."""
    return cli(
        "correct",
        "-q",
        "How?",
        "-a",
        "Like this.",
        "--model",
        str(model),
        "--classifier",
        "none",
        *extra,
    )


def test_correct_prints_the_record_as_json(tiny_lm_path) -> None:
    done = correct_tiny(tiny_lm_path, "--json")
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert record["original_answer"] == "Like this." and record["route"] == "correct"


def test_correct_prints_the_final_answer(tiny_lm_path, tmp_path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("mode: always\nverify_after_correct: false\n")
    done = correct_tiny(tiny_lm_path, "--policy", str(policy))
    assert done.returncode == 0 and done.stdout.strip()


@pytest.mark.parametrize(
    "args,message",
    [
        (["-q", " ", "-a", "x"], "--question is empty"),
        (["-q", "x", "-a", ""], "--answer is empty"),
        (["-q", "x", "-a", "y", "--model", "/no/such/model", "--classifier", "none"], "not found"),
    ],
)
def test_usage_errors_exit_2(args, message) -> None:
    done = cli("correct", *args)
    assert done.returncode == 2 and message in done.stderr


def test_bad_policy_file_exits_2(tiny_lm_path, tmp_path) -> None:
    policy = tmp_path / "bad.yaml"
    policy.write_text("correct_at: 7\n")
    done = cli(
        "correct", "-q", "x", "-a", "y", "--model", str(tiny_lm_path), "--policy", str(policy)
    )
    assert done.returncode == 2 and "bad.yaml" in done.stderr


def test_missing_arguments_exit_2() -> None:
    assert cli("correct", "-q", "x").returncode == 2
