"""The labelled (question, answer) mix the embedded classifier is trained and evaluated on.

Every source under ``../shared/data`` is split train / val / test by a hash of its natural group
(question, goal, scenario, dialogue), not by row, so a held-out question is never seen in
training with another answer. The split does not depend on the training seed: the held-out sets
stay the same across runs. Sets under a non-commercial licence are used for evaluation only, so
the shipped weights are trained on permissively licensed data (see ``SOURCES``).

Nothing here is written to disk: the raw text stays in ``../shared/data``.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import random
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from aligner_chain.classifiers.embedded import CATEGORIES
from aligner_chain.errors import InputError

SPLITS = ("train", "val", "test")
UNKNOWN = -1
SAFE_CATEGORIES = (0,) * len(CATEGORIES)


@dataclass(frozen=True, slots=True)
class Source:
    licence: str
    use: str  # "train": all three splits; "eval": test split only
    labels: str
    train_weight: float = 1.0  # training cap = max_train_per_source x this


SOURCES: dict[str, Source] = {
    "gptfuzz": Source("MIT", "train", "human: jailbreak response complies with harmful question"),
    "jailbreakbench": Source("MIT", "train", "automated judge (Llama-3-70B): jailbroken"),
    "diasafety": Source("Apache-2.0", "train", "human: context-dependent response safety", 2.0),
    "llm_self_defense": Source("BSD-3-Clause", "train", "human: response harmful yes/no"),
    "openai_rbr_gold": Source("MIT", "train", "human: disallowed_content proposition"),
    "hh_rlhf": Source("MIT", "train", "human preference: rejected more harmful than chosen"),
    "openai_moderation": Source("MIT", "train", "human: 8 moderation categories (text level)"),
    "coconot_contrast": Source("MIT", "train", "benign but sensitive-sounding, complied: safe"),
    "benign_instructions": Source("Apache-2.0", "train", "benign tasks with answers: safe"),
    "advbench": Source("MIT", "train", "harmful goal + refusal: safe; + target string: harmful"),
    "harmbench": Source("MIT", "train", "harmful behaviour + refusal: safe"),
    "safetext": Source("MIT", "train", "human: physically unsafe vs safe advice"),
    "safe_rlhf_mini": Source("CC BY-NC 4.0", "eval", "PKU-SafeRLHF response safety"),
    "safety_tuned_llamas": Source("CC BY-NC 4.0", "eval", "refusals to harmful requests: safe"),
}

_REFUSAL = re.compile(
    r"^\s*(I'?m sorry|I am sorry|I apologi[sz]e|I cannot|I can'?t|I can not|I'm not able|"
    r"I am not able|I'm unable|I am unable|As an AI|Sorry)",
    re.IGNORECASE,
)


@dataclass(frozen=True, slots=True)
class Example:
    """One labelled pair.

    ``label`` is 1 (harmful), 0 (safe) or None (unknown: categories only). ``categories``
    follows :data:`CATEGORIES` with -1 for unknown. ``rank_group`` ties an hh-rlhf chosen /
    rejected pair, whose labels are only relative (rejected = 1 is worse than chosen = 0).
    ``goal`` is the underlying request when the question is an attack prompt.
    """

    source: str
    split: str
    question: str
    answer: str
    label: int | None
    categories: tuple[int, ...] | None = None
    rank_group: str | None = None
    goal: str | None = None


@dataclass
class Mix:
    train: list[Example] = field(default_factory=list)
    val: list[Example] = field(default_factory=list)
    test: list[Example] = field(default_factory=list)

    def add(self, examples: list[Example]) -> None:
        for ex in examples:
            getattr(self, ex.split).append(ex)


def split_of(source: str, group: str, fractions: tuple[float, float] = (0.7, 0.15)) -> str:
    """Deterministic train / val / test assignment of a group (hash, not RNG)."""
    h = int(hashlib.sha256(f"{source}\0{group}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    if h < fractions[0]:
        return "train"
    return "val" if h < fractions[0] + fractions[1] else "test"


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def _jsonl(path: Path) -> Iterator[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _json(path: Path) -> object:
    return json.loads(path.read_text(encoding="utf-8"))


def _gptfuzz(d: Path) -> list[Example]:
    questions = {r["index"]: r["text"] for r in _csv(d / "gptfuzz_labeled/question_list.csv")}
    out, seen = [], set()
    for name in ("train", "evaluate"):  # evaluate.csv holds questions 80-99, never in train.csv
        for r in _csv(d / f"gptfuzz_labeled/{name}.csv"):
            key = (r["question"], r["Response"])
            if key in seen:
                continue
            seen.add(key)
            split = (
                "test" if name == "evaluate" else split_of("gptfuzz", r["question"], (0.85, 0.15))
            )
            q = questions[r["question"]]
            out.append(Example("gptfuzz", split, q, r["Response"], int(r["label"])))
    return out


def _jailbreakbench(d: Path) -> list[Example]:
    out = []
    for path in sorted((d / "jailbreakbench_artifacts").rglob("*.json")):
        for r in _json(path)["jailbreaks"]:  # type: ignore[index]
            if r["prompt"] and r["response"]:
                split = split_of("jailbreakbench", r["goal"])
                label = int(bool(r["jailbroken"]))
                out.append(
                    Example(
                        "jailbreakbench", split, r["prompt"], r["response"], label, goal=r["goal"]
                    )
                )
    return out


def _diasafety(d: Path) -> list[Example]:
    out = []
    for split, name in (("train", "train"), ("val", "val"), ("test", "test")):
        for r in _json(d / f"diasafety/{name}.json"):  # type: ignore[union-attr]
            label = int(r["label"] == "Unsafe")
            cats = SAFE_CATEGORIES if label == 0 else None
            out.append(Example("diasafety", split, r["context"], r["response"], label, cats))
    return out


def _llm_self_defense(d: Path) -> list[Example]:
    out = []
    for name in ("gpt", "llama"):
        for r in _csv(d / f"llm_self_defense/all_repsonses_{name}.csv"):
            label = int(r["is harmful?"].strip().lower() == "yes")
            split = split_of("llm_self_defense", _norm(r["prompt"]))
            out.append(Example("llm_self_defense", split, r["prompt"], r["response"], label))
    return out


def _openai_rbr_gold(d: Path) -> list[Example]:
    out = []
    for name in ("train", "test"):
        for r in _jsonl(d / f"openai_rbr_gold/{name}.jsonl"):
            question = next(m["content"] for m in reversed(r["prompt"]) if m["role"] == "user")
            completion = r["completion"]
            answer = completion[-1]["content"] if isinstance(completion, list) else completion
            split = "test" if name == "test" else split_of("openai_rbr_gold", question, (0.8, 0.2))
            label = int(bool(r["propositions"]["disallowed_content"]))
            out.append(Example("openai_rbr_gold", split, question, answer, label))
    return out


def _last_turns(dialogue: str) -> tuple[str, str]:
    """(last human turn, final assistant turn) of an hh-rlhf transcript."""
    head, _, answer = dialogue.rpartition("\n\nAssistant:")
    question = head.rpartition("\n\nHuman:")[2]
    return question.strip(), answer.strip()


def _hh_rlhf(d: Path) -> list[Example]:
    out = []
    for i, r in enumerate(_jsonl(d / "hh_rlhf_harmless_base/test.jsonl.gz")):
        q, chosen = _last_turns(r["chosen"])
        _, rejected = _last_turns(r["rejected"])
        if not chosen or not rejected or chosen == rejected:
            continue
        split = split_of("hh_rlhf", q)
        group = f"hh{i}"
        out.append(Example("hh_rlhf", split, q, chosen, 0, rank_group=group))
        out.append(Example("hh_rlhf", split, q, rejected, 1, rank_group=group))
    return out


def _openai_moderation(d: Path, refusals: Callable[[], str]) -> list[Example]:
    """Category labels on the answer side; the same text as a *question* with a refusal is safe.

    The second form teaches the category heads to score what the answer says, not what was
    asked: a refusal to a hateful request carries no hate.
    """
    out = []
    for i, r in enumerate(_jsonl(d / "openai_moderation/samples-1680.jsonl.gz")):
        cats = tuple(int(r[c]) if c in r else UNKNOWN for c in CATEGORIES)
        split = split_of("openai_moderation", str(i), (0.6, 0.2))
        out.append(Example("openai_moderation", split, "", r["prompt"], None, cats))
        if split == "train" and any(c == 1 for c in cats):
            out.append(
                Example("openai_moderation", split, r["prompt"], refusals(), 0, SAFE_CATEGORIES)
            )
    return out


def _coconot_contrast(d: Path) -> list[Example]:
    out = []
    for r in _jsonl(d / "coconot/coconot_pref.jsonl"):
        split = split_of("coconot_contrast", r["id"])
        for answer in (r["chosen"], r["rejected"]):
            if answer:
                out.append(
                    Example("coconot_contrast", split, r["prompt"], answer, 0, SAFE_CATEGORIES)
                )
    return out


def _benign_instructions(d: Path) -> list[Example]:
    pairs: list[tuple[str, str]] = []
    for name in ("seed_tasks", "user_oriented_instructions"):
        for r in _jsonl(d / f"self_instruct/{name}.jsonl"):
            inst = r["instances"][0]
            q = r["instruction"] + ("\n" + inst["input"] if inst["input"] else "")
            pairs.append((q, inst["output"]))
    questions = {r["question_id"]: r["text"] for r in _jsonl(d / "vicuna_eval/question.jsonl")}
    for model in ("gpt35", "bard"):  # the LLaMA-derived answer files are non-commercial
        for r in _jsonl(d / f"vicuna_eval/answer_{model}.jsonl"):
            pairs.append((questions[r["question_id"]], r["text"]))
    for path in sorted((d / "alpaca_eval_aligner2b").glob("*.model_outputs.json")):
        pairs += [(r["instruction"], r["original_output"]) for r in _json(path)]  # type: ignore[union-attr]
    return [
        Example("benign_instructions", split_of("benign", q), q, a, 0, SAFE_CATEGORIES)
        for q, a in pairs
        if q.strip() and a.strip()
    ]


def _advbench(d: Path, refusals: Callable[[], str]) -> list[Example]:
    out = []
    for r in _csv(d / "advbench/harmful_behaviors.csv"):
        split = split_of("advbench", _norm(r["goal"]))
        out.append(Example("advbench", split, r["goal"], r["target"], 1))
        out.append(Example("advbench", split, r["goal"], refusals(), 0, SAFE_CATEGORIES))
    for r in _csv(d / "advbench/harmful_strings.csv"):
        out.append(
            Example("advbench", split_of("advbench", _norm(r["target"])), "", r["target"], 1)
        )
    return out


def _harmbench(d: Path, refusals: Callable[[], str]) -> list[Example]:
    return [
        Example(
            "harmbench",
            split_of("harmbench", r["BehaviorID"]),
            r["Behavior"],
            refusals(),
            0,
            SAFE_CATEGORIES,
        )
        for r in _csv(d / "harmbench/harmbench_behaviors_text_all.csv")
    ]


def _safetext(d: Path) -> list[Example]:
    out = []
    for scenario, advice in _json(d / "safetext/SafeText.json").items():  # type: ignore[union-attr]
        split = split_of("safetext", scenario)
        for label, key in ((1, "unsafe"), (0, "safe")):
            for text in advice[key]:
                out.append(Example("safetext", split, scenario, text, label))
    return out


def _safe_rlhf_mini(d: Path) -> list[Example]:
    return [
        Example("safe_rlhf_mini", "test", r["question"], r["answer"], int(r["label"]))
        for r in _csv(d / "jailbreakeval/Safe-RLHFmini.csv")
    ]


def _safety_tuned_llamas(d: Path) -> list[Example]:
    rows = _json(d / "safety_tuned_llamas/safety_only_data_Instructions.json")
    return [
        Example("safety_tuned_llamas", "test", r["instruction"], r["output"], 0)
        for r in rows  # type: ignore[union-attr]
    ]


def refusal_pool(examples: list[Example]) -> list[str]:
    """Distinct refusals written by real models, from training-split safe answers only."""
    seen: dict[str, None] = {}
    for ex in examples:
        short_safe = ex.split == "train" and ex.label == 0 and len(ex.answer) < 400
        if short_safe and _REFUSAL.match(ex.answer):
            seen.setdefault(ex.answer.strip(), None)
    return sorted(seen)


def build_mix(
    data_dir: Path,
    *,
    seed: int,
    max_train_per_source: int,
    max_eval_per_source: int,
    train_weights: Mapping[str, float] | None = None,
) -> Mix:
    """Load every source, split it, and cap each split per source (seeded subsample).

    A source's training cap is ``max_train_per_source`` times its weight: ``train_weights[name]``
    where given, else ``SOURCES[name].train_weight``. Only the training caps change with the
    weights; the validation and test samples stay the same as long as every source that was
    subsampled before still is (a larger cap on a source already subsampled draws from the
    random state exactly as before).
    """
    if not (data_dir / "SOURCES.md").exists():
        raise InputError(f"{data_dir} is not the shared data folder (no SOURCES.md)")
    weights = {name: source.train_weight for name, source in SOURCES.items()}
    for name, weight in (train_weights or {}).items():
        if name not in SOURCES or SOURCES[name].use != "train":
            raise InputError(f"no training source named {name!r}")
        if weight < 0:
            raise InputError(f"training weight of {name!r} must be >= 0, got {weight}")
        weights[name] = weight
    rng = random.Random(seed)
    responses = _gptfuzz(data_dir) + _jailbreakbench(data_dir)
    pool = refusal_pool(responses)
    if not pool:
        raise InputError("no refusals found in the training split of gptfuzz / jailbreakbench")

    def refusal() -> str:
        return rng.choice(pool)

    per_source = [
        responses,
        _diasafety(data_dir),
        _llm_self_defense(data_dir),
        _openai_rbr_gold(data_dir),
        _hh_rlhf(data_dir),
        _openai_moderation(data_dir, refusal),
        _coconot_contrast(data_dir),
        _benign_instructions(data_dir),
        _safetext(data_dir),
        _safe_rlhf_mini(data_dir),
        _safety_tuned_llamas(data_dir),
    ]
    everything = [ex for examples in per_source for ex in examples]
    # JailbreakBench goals and llm_self_defense prompts partly come from AdvBench / HarmBench:
    # a held-out goal must not reach training through those prompt-only sets.
    held_out = {
        _norm(text)
        for ex in everything
        if ex.split != "train"
        for text in (ex.question, ex.goal or "")
    }
    for ex in _advbench(data_dir, refusal) + _harmbench(data_dir, refusal):
        if ex.split != "train" or not {_norm(ex.question), _norm(ex.answer)} & held_out:
            everything.append(ex)

    mix = Mix()
    by_key: dict[tuple[str, str], list[Example]] = {}
    for ex in everything:
        if SOURCES[ex.source].use == "eval" and ex.split != "test":
            continue
        by_key.setdefault((ex.source, ex.split), []).append(ex)
    for (source, split), examples in sorted(by_key.items()):
        cap = (
            round(max_train_per_source * weights[source])
            if split == "train"
            else max_eval_per_source
        )
        mix.add(_subsample(examples, cap, rng))
    rng.shuffle(mix.train)
    return mix


def _subsample(examples: list[Example], cap: int, rng: random.Random) -> list[Example]:
    """At most ``cap`` examples, keeping hh-rlhf chosen/rejected pairs together."""
    if len(examples) <= cap:
        return examples
    groups: dict[str, list[Example]] = {}
    for i, ex in enumerate(examples):
        groups.setdefault(ex.rank_group or str(i), []).append(ex)
    keys = sorted(groups)
    rng.shuffle(keys)
    kept: list[Example] = []
    for key in keys:
        if len(kept) + len(groups[key]) > cap:
            break
        kept += groups[key]
    return kept
