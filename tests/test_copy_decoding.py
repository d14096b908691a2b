"""Copy-aware decoding: the same tokens as plain greedy ``generate``, and a clean fallback."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
import torch
from transformers import LlamaForCausalLM

from aligner_chain import QAPair, TransformersCorrector
from aligner_chain.correctors.copy_decoding import (
    CopyDrafter,
    copy_greedy_generate,
    supports_copy_drafts,
)
from aligner_chain.correctors.transformers import GenerationSettings

COPY_HEAVY = "The quick brown fox jumps over the lazy dog. Paris is the capital of France. " * 4
PAIRS = [
    QAPair("How do I bake bread?", "Mix flour, water, yeast and salt, then bake."),
    QAPair("Repeat this please.", COPY_HEAVY),
    QAPair("Hi", "Hello!"),
    QAPair("Tell me about Paris.", "Paris is the capital of France. " * 8),
]


@pytest.fixture(scope="module")
def copying(tiny_lm_path) -> TransformersCorrector:
    return TransformersCorrector(str(tiny_lm_path), batching=False)


@pytest.fixture(scope="module")
def plain(tiny_lm_path) -> TransformersCorrector:
    return TransformersCorrector(
        str(tiny_lm_path), generation=GenerationSettings(copy_drafts=False), batching=False
    )


def _reference(model: Any, ids: torch.Tensor, max_new_tokens: int, eos: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=eos,
        )
    return out[0, ids.shape[1] :].tolist()


@pytest.mark.parametrize("max_new_tokens", [1, 2, 7, 96])
@pytest.mark.parametrize("pair", PAIRS, ids=["bread", "copy-heavy", "short", "repeats"])
def test_tokens_equal_plain_greedy(
    copying: TransformersCorrector, pair: QAPair, max_new_tokens: int
) -> None:
    model, tok = copying.loaded.model, copying.loaded.tokenizer
    ids = tok(copying._prepare(pair).prompt, return_tensors="pt")["input_ids"]
    eos = tok.eos_token_id
    with torch.inference_mode():
        tokens, stats = copy_greedy_generate(
            model, ids, None, max_new_tokens=max_new_tokens, eos_ids={eos}
        )
    assert tokens == _reference(model, ids, max_new_tokens, eos)
    assert stats.forward_passes <= len(tokens)


def test_drafts_are_accepted_and_stop_tokens_end_them(copying: TransformersCorrector) -> None:
    """The random model falls into loops that drafts copy; a stop token inside a copied run
    must end generation exactly where plain greedy ends it."""
    model, tok = copying.loaded.model, copying.loaded.tokenizer
    ids = tok(copying._prepare(PAIRS[1]).prompt, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        free, stats = copy_greedy_generate(model, ids, None, max_new_tokens=120, eos_ids=set())
    assert stats.accepted > 0 and stats.forward_passes < len(free)
    stop = free[60]  # a token that occurs inside an accepted run
    with torch.inference_mode():
        tokens, _ = copy_greedy_generate(model, ids, None, max_new_tokens=120, eos_ids={stop})
    assert tokens == _reference(model, ids, 120, stop)
    assert tokens[-1] == stop and stop not in tokens[:-1]


def test_corrections_equal_with_and_without_drafts(
    copying: TransformersCorrector, plain: TransformersCorrector
) -> None:
    for pair in PAIRS:
        assert copying.correct([pair]) == plain.correct([pair])


def test_streamed_deltas_add_up_to_the_correction(copying: TransformersCorrector) -> None:
    *deltas, final = copying.stream_correction(PAIRS[3])
    assert "".join(deltas) == final.text == copying.correct([PAIRS[3]])[0].text


def _generate_calls(corrector: TransformersCorrector, monkeypatch, pairs: list[QAPair]) -> int:
    calls = []
    real = corrector.loaded.model.generate
    monkeypatch.setattr(
        corrector.loaded.model, "generate", lambda **kw: calls.append(kw) or real(**kw)
    )
    corrector.correct(pairs)
    monkeypatch.undo()
    return len(calls)


def test_batches_and_non_greedy_settings_use_generate(
    copying: TransformersCorrector, tiny_lm_path, monkeypatch
) -> None:
    assert _generate_calls(copying, monkeypatch, PAIRS[:1]) == 0
    assert _generate_calls(copying, monkeypatch, PAIRS[:2]) == 1
    for settings in (
        GenerationSettings.preset("paper"),
        GenerationSettings(repetition_penalty=1.1),
        GenerationSettings(extra={"no_repeat_ngram_size": 3}),
        GenerationSettings(copy_drafts=False),
    ):
        other = TransformersCorrector(str(tiny_lm_path), generation=settings, batching=False)
        assert not other._copy_drafts
        assert _generate_calls(other, monkeypatch, PAIRS[:1]) == 1


def test_batched_and_single_corrections_agree(copying: TransformersCorrector) -> None:
    assert copying.correct(PAIRS) == [copying.correct([p])[0] for p in PAIRS]


def test_unsupported_models_fall_back() -> None:
    def model(**config: Any) -> SimpleNamespace:
        return SimpleNamespace(config=SimpleNamespace(**config))

    assert supports_copy_drafts(model(layer_types=["full_attention"] * 2))
    assert supports_copy_drafts(model())
    assert not supports_copy_drafts(model(layer_types=["sliding_attention", "full_attention"]))
    assert not supports_copy_drafts(model(is_encoder_decoder=True))


def test_drafter_follows_the_original_in_order() -> None:
    # "a b" occurs twice; after copying up to the second one, drafts continue from there.
    drafter = CopyDrafter([1, 2, 3, 9, 1, 2, 4, 5, 1, 2])
    draft, start = drafter.propose(2, stop=set())
    assert (draft, start) == ([3, 9], 2)
    drafter.accepted(3, 1)  # copied source position 3; the next run starts at 4 or later
    assert drafter.propose(3, stop=set()) == ([4, 5, 1], 6)
    assert drafter.propose(3, stop={5}) == ([4], 6)
    assert CopyDrafter([7, 8]).propose(4, stop=set()) == ([], 0)


def test_half_precision_needs_opting_in(tiny_lm_path) -> None:
    """In bf16 a near-tie can flip when several tokens are checked in one pass."""
    path = str(tiny_lm_path)
    assert not TransformersCorrector(path, dtype="bfloat16")._copy_drafts
    forced = GenerationSettings(copy_drafts=True)
    assert TransformersCorrector(path, dtype="bfloat16", generation=forced)._copy_drafts


class _CopyNudged(LlamaForCausalLM):
    """The tiny Llama with ``bias`` added to the logit of the answer's next token: copy-heavy
    output where the model's own logits still decide part of it (and its cache must be right)."""

    script: ClassVar[list[int]] = []
    prompt_len: ClassVar[int] = 0
    bias: ClassVar[float] = 0.0

    def forward(self, input_ids: Any = None, past_key_values: Any = None, **kwargs: Any) -> Any:
        past = 0 if past_key_values is None else past_key_values.get_seq_length()
        out = super().forward(input_ids=input_ids, past_key_values=past_key_values, **kwargs)
        width = out.logits.shape[1]
        for i in range(width):
            j = past + input_ids.shape[1] - width + i + 1 - self.prompt_len
            if 0 <= j < len(self.script):
                out.logits[:, i, self.script[j]] += self.bias
        return out


@pytest.mark.parametrize(("bias", "copied_all"), [(20.0, False), (40.0, True)])
def test_copy_heavy_output_equals_plain_greedy(
    copying: TransformersCorrector, tiny_lm_path, bias: float, copied_all: bool
) -> None:
    tok = copying.loaded.tokenizer
    ids = tok(copying._prepare(PAIRS[1]).prompt, return_tensors="pt")["input_ids"]
    model = _CopyNudged.from_pretrained(tiny_lm_path).eval()
    _CopyNudged.script = tok(COPY_HEAVY, add_special_tokens=False)["input_ids"]
    _CopyNudged.prompt_len, _CopyNudged.bias = ids.shape[1], bias
    with torch.inference_mode():
        tokens, stats = copy_greedy_generate(
            model, ids, None, max_new_tokens=80, eos_ids={tok.eos_token_id}
        )
    assert tokens == _reference(model, ids, 80, tok.eos_token_id)
    assert (tokens == _CopyNudged.script[:80]) is copied_all
    assert stats.accepted >= 40 and stats.forward_passes < 40
