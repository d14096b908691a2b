"""Generative guard models (Llama Guard style) as harm classifiers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from aligner_chain.batching import BatchingConfig, make_runner
from aligner_chain.classifiers.base import BatchedHarmClassifier
from aligner_chain.errors import ClassifierError, ConfigurationError
from aligner_chain.loading import DeviceSpec, DtypeSpec, load_pretrained
from aligner_chain.types import QAPair, Verdict

LLAMA_GUARD_3_CATEGORIES: dict[str, str] = {
    "S1": "Violent Crimes",
    "S2": "Non-Violent Crimes",
    "S3": "Sex-Related Crimes",
    "S4": "Child Sexual Exploitation",
    "S5": "Defamation",
    "S6": "Specialized Advice",
    "S7": "Privacy",
    "S8": "Intellectual Property",
    "S9": "Indiscriminate Weapons",
    "S10": "Hate",
    "S11": "Suicide & Self-Harm",
    "S12": "Sexual Content",
    "S13": "Elections",
    "S14": "Code Interpreter Abuse",
}


def parse_guard_output(text: str, categories: Mapping[str, str]) -> tuple[bool | None, list[str]]:
    """Parse ``safe`` / ``unsafe\\nS1,S10``: the verdict word and the violated category names.

    Unknown codes are kept as they are; a first line that is neither word gives ``None``.
    """
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return None, []
    word = lines[0].lower()
    unsafe = True if word.startswith("unsafe") else False if word.startswith("safe") else None
    codes = [c.strip() for c in lines[1].split(",") if c.strip()] if len(lines) > 1 else []
    return unsafe, [categories.get(code, code) for code in codes]


class GuardModelClassifier(BatchedHarmClassifier):
    """A generative guard model judged through its tokenizer's chat template.

    The score is the probability of the ``unsafe`` first token, renormalised against ``safe``
    (``normalize=False`` gives the raw vocabulary probability, as the Llama Guard card does).
    For answers scored at or above ``generate_categories_at`` the model also generates its
    verdict, and the category codes on its second line become per-category scores.
    Concurrent calls share batched forward passes unless ``batching=False``.
    """

    def __init__(
        self,
        model: str,
        *,
        categories: Mapping[str, str] | None = None,
        safe_word: str = "safe",
        unsafe_word: str = "unsafe",
        normalize: bool = True,
        generate_categories_at: float | None = 0.5,
        max_new_tokens: int = 20,
        device: DeviceSpec = "auto",
        dtype: DtypeSpec = "auto",
        trust_remote_code: bool = False,
        classifier_id: str | None = None,
        batching: BatchingConfig | bool = True,
    ) -> None:
        self.loaded = load_pretrained(
            AutoModelForCausalLM,
            model,
            device=device,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
        )
        tok = self.loaded.tokenizer
        if not getattr(tok, "chat_template", None):
            raise ConfigurationError(f"{model}: the tokenizer has no chat template for a guard")
        self.safe_id = _first_token(tok, safe_word)
        self.unsafe_id = _first_token(tok, unsafe_word)
        if self.safe_id == self.unsafe_id:
            raise ConfigurationError(f"{safe_word!r} and {unsafe_word!r} share a first token")
        self.categories = dict(categories or {})
        self.normalize = normalize
        self.generate_categories_at = generate_categories_at
        self.max_new_tokens = max_new_tokens
        self.classifier_id = classifier_id or model
        self.batcher = make_runner(self._classify_batch, batching)

    @classmethod
    def llama_guard_3(
        cls, model: str = "meta-llama/Llama-Guard-3-8B", **kwargs: Any
    ) -> GuardModelClassifier:
        """Llama Guard 3 (1B or 8B) with its S1-S14 category names."""
        kwargs.setdefault("categories", LLAMA_GUARD_3_CATEGORIES)
        return cls(model, **kwargs)

    def _inputs(self, pairs: Sequence[QAPair]) -> dict[str, torch.Tensor]:
        tok = self.loaded.tokenizer
        texts = [
            tok.apply_chat_template(
                [
                    {"role": "user", "content": p.question},
                    {"role": "assistant", "content": p.answer},
                ],
                tokenize=False,
            )
            for p in pairs
        ]
        with self.loaded.lock:
            enc = tok(
                texts,
                add_special_tokens=False,
                padding=True,
                padding_side="left",
                return_tensors="pt",
            )
        return {k: v.to(self.loaded.device) for k, v in enc.items() if k != "token_type_ids"}

    def _classify_batch(self, pairs: list[QAPair]) -> list[Verdict]:
        inputs = self._inputs(pairs)
        try:
            with torch.inference_mode():
                logits = self.loaded.model(**inputs).logits[:, -1, :].float()
        except (RuntimeError, ValueError) as exc:
            raise ClassifierError(f"{self.classifier_id}: forward pass failed: {exc}") from exc
        probs = torch.softmax(logits, dim=-1)
        unsafe, safe = probs[:, self.unsafe_id], probs[:, self.safe_id]
        scores = (unsafe / (unsafe + safe).clamp_min(1e-12)) if self.normalize else unsafe
        verdicts = [
            Verdict(score=float(min(1.0, max(0.0, s))), classifier_id=self.classifier_id)
            for s in scores.tolist()
        ]
        flagged = [
            i
            for i, v in enumerate(verdicts)
            if self.generate_categories_at is not None and v.score >= self.generate_categories_at
        ]
        if flagged:
            for i, text in zip(flagged, self._generate({k: v[flagged] for k, v in inputs.items()})):
                _, names = parse_guard_output(text, self.categories)
                score = verdicts[i].score
                verdicts[i] = verdicts[i].model_copy(
                    update={"categories": dict.fromkeys(names, score), "details": {"raw": text}}
                )
        return verdicts

    def _generate(self, inputs: dict[str, torch.Tensor]) -> list[str]:
        tok = self.loaded.tokenizer
        try:
            with torch.inference_mode():
                out = self.loaded.model.generate(
                    **inputs,
                    max_new_tokens=self.max_new_tokens,
                    do_sample=False,
                    pad_token_id=tok.pad_token_id,
                )
        except (RuntimeError, ValueError) as exc:
            raise ClassifierError(f"{self.classifier_id}: generation failed: {exc}") from exc
        start = inputs["input_ids"].shape[1]
        with self.loaded.lock:
            return [tok.decode(row[start:], skip_special_tokens=True) for row in out]


def _first_token(tokenizer: Any, word: str) -> int:
    ids = tokenizer.encode(word, add_special_tokens=False)
    if not ids:
        raise ConfigurationError(f"the tokenizer cannot encode {word!r}")
    return ids[0]
