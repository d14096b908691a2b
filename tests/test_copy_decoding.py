"""Copy-aware decoding: the same tokens as plain greedy ``generate``, and a clean fallback."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
import torch
from transformers import DynamicCache, LlamaForCausalLM

from aligner_chain import InputError, QAPair, TransformersCorrector
from aligner_chain.correctors import copy_decoding
from aligner_chain.correctors.copy_decoding import (
    MAX_MEMORY_MATCH,
    CopyDrafter,
    DraftMemory,
    PromptPrefix,
    copy_greedy_generate,
    supports_copy_drafts,
)
from aligner_chain.correctors.transformers import MIN_PREFIX_TOKENS, GenerationSettings

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
        (tokens,), stats = copy_greedy_generate(
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
        (free,), stats = copy_greedy_generate(model, ids, None, max_new_tokens=120, eos_ids=set())
    assert stats.accepted > 0 and stats.forward_passes < len(free)
    stop = free[60]  # a token that occurs inside an accepted run
    with torch.inference_mode():
        (tokens,), _ = copy_greedy_generate(model, ids, None, max_new_tokens=120, eos_ids={stop})
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


def test_greedy_batches_draft_and_other_settings_use_generate(
    copying: TransformersCorrector, tiny_lm_path, monkeypatch
) -> None:
    assert _generate_calls(copying, monkeypatch, PAIRS[:1]) == 0
    assert _generate_calls(copying, monkeypatch, PAIRS) == 0
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
    def forward(input_ids: Any = None, position_ids: Any = None) -> None: ...

    def model(forward: Any = forward, **config: Any) -> SimpleNamespace:
        return SimpleNamespace(config=SimpleNamespace(**config), forward=forward)

    assert supports_copy_drafts(model(layer_types=["full_attention"] * 2))
    assert supports_copy_drafts(model())
    assert not supports_copy_drafts(model(layer_types=["sliding_attention", "full_attention"]))
    assert not supports_copy_drafts(model(is_encoder_decoder=True))
    assert not supports_copy_drafts(model(forward=lambda input_ids=None: None))


def test_drafter_follows_the_original_in_order() -> None:
    # "a b" occurs twice; after copying up to the second one, drafts continue from there.
    drafter = CopyDrafter([1, 2, 3, 9, 1, 2, 4, 5, 1, 2])
    draft, start, _ = drafter.propose(2, stop=set())
    assert (draft, start) == ([3, 9], 2)
    drafter.accepted(3, 1)  # copied source position 3; the next run starts at 4 or later
    assert drafter.propose(3, stop=set()) == ([4, 5, 1], 6, 2)
    assert drafter.propose(3, stop={5}) == ([4], 6, 2)
    assert CopyDrafter([7, 8]).propose(4, stop=set()) == ([], 0, 0)


def test_half_precision_needs_opting_in(tiny_lm_path) -> None:
    """In bf16 a near-tie can flip when several tokens are checked in one pass."""
    path = str(tiny_lm_path)
    assert not TransformersCorrector(path, dtype="bfloat16")._copy_drafts
    forced = GenerationSettings(copy_drafts=True)
    assert TransformersCorrector(path, dtype="bfloat16", generation=forced)._copy_drafts


class _CopyNudged(LlamaForCausalLM):
    """The tiny Llama with ``bias`` added to the logit of each row's next script token:
    copy-heavy output where the model's own logits still decide part of it (and its cache and
    positions must be right). A row's script position is its token position (``position_ids``
    when given, as for padded batches) minus its unpadded prompt length; ``rows`` maps the
    batch's rows to scripts (finished rows leave copy decoding's batch: see :func:`_nudged`)."""

    scripts: ClassVar[list[list[int]]] = []
    prompt_lens: ClassVar[list[int]] = []
    rows: ClassVar[list[int]] = []
    bias: ClassVar[float] = 0.0
    head: ClassVar[int] = 0  # tokens of a cached prompt head: the prefill starts after them

    def forward(self, input_ids: Any = None, position_ids: Any = None, **kwargs: Any) -> Any:
        # The cache arrives as ``cache`` (transformers 5.x) or ``past_key_values`` (4.x).
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = 0 if cache is None else cache.get_seq_length()
        if past <= self.head:
            _CopyNudged.rows = list(range(input_ids.shape[0]))
        if position_ids is None:  # no padding anywhere: positions are cache indices
            position_ids = torch.arange(past, past + input_ids.shape[1]).expand_as(input_ids)
        out = super().forward(input_ids=input_ids, position_ids=position_ids, **kwargs)
        width = out.logits.shape[1]
        for row, script_index in enumerate(self.rows):
            script = self.scripts[script_index]
            for i, position in enumerate(position_ids[row, -width:].tolist()):
                j = position + 1 - self.prompt_lens[script_index]
                if 0 <= j < len(script):
                    out.logits[row, i, script[j]] += self.bias
        return out


def _nudged(
    tiny_lm_path: Any, tok: Any, answers: list[str], ids: list[list[int]], monkeypatch: Any
) -> Any:
    """The nudged model for these rows; it follows rows that leave the batch."""
    model = _CopyNudged.from_pretrained(tiny_lm_path).eval()
    _CopyNudged.scripts = [tok(a, add_special_tokens=False)["input_ids"] for a in answers]
    _CopyNudged.prompt_lens = [len(row) for row in ids]
    _CopyNudged.head = 0
    select = DynamicCache.batch_select_indices

    def follow(cache: DynamicCache, indices: torch.Tensor) -> None:
        _CopyNudged.rows = [_CopyNudged.rows[i] for i in indices.tolist()]
        select(cache, indices)

    monkeypatch.setattr(DynamicCache, "batch_select_indices", follow)
    return model


@pytest.mark.parametrize(("bias", "copied_all"), [(20.0, False), (40.0, True)])
def test_copy_heavy_output_equals_plain_greedy(
    copying: TransformersCorrector, tiny_lm_path, monkeypatch, bias: float, copied_all: bool
) -> None:
    tok = copying.loaded.tokenizer
    ids = tok(copying._prepare(PAIRS[1]).prompt, return_tensors="pt")["input_ids"]
    model = _nudged(tiny_lm_path, tok, [COPY_HEAVY], ids.tolist(), monkeypatch)
    _CopyNudged.bias = bias
    with torch.inference_mode():
        (tokens,), stats = copy_greedy_generate(
            model, ids, None, max_new_tokens=80, eos_ids={tok.eos_token_id}
        )
    assert tokens == _reference(model, ids, 80, tok.eos_token_id)
    assert (tokens == _CopyNudged.scripts[0][:80]) is copied_all
    assert stats.accepted >= 40 and stats.forward_passes < 40


# -- batches: each row drafts from its own input and accepts its own number of tokens ------


def _batched_reference(
    corrector: TransformersCorrector,
    model: Any,
    inputs: dict[str, torch.Tensor],
    budgets: list[int],
) -> list[list[int]]:
    """Plain batched greedy ``generate``, each row cut at its first stop token or budget."""
    with torch.inference_mode():
        width = inputs["input_ids"].shape[1]
        out = model.generate(**inputs, **corrector._generate_kwargs(max(budgets), width))
    rows = []
    for row, budget in zip(out[:, inputs["input_ids"].shape[1] :].tolist(), budgets):
        row = row[:budget]
        stop = next((i for i, t in enumerate(row) if t in corrector._eos_ids), len(row) - 1)
        rows.append(row[: stop + 1])
    return rows


def _batched_copy(
    corrector: TransformersCorrector,
    model: Any,
    inputs: dict[str, torch.Tensor],
    budgets: Any,
    prefix: PromptPrefix | None = None,
) -> tuple[list[list[int]], Any]:
    with torch.inference_mode():
        return copy_greedy_generate(
            model,
            inputs["input_ids"],
            inputs["attention_mask"],
            max_new_tokens=budgets,
            eos_ids=corrector._eos_ids,
            pad_token_id=corrector.loaded.tokenizer.pad_token_id,
            prefix=prefix,
        )


@pytest.mark.parametrize("with_prefix", [False, True], ids=["full-prefill", "template-head"])
@pytest.mark.parametrize("budgets", [[1] * 4, [2] * 4, [7] * 4, [96] * 4, [5, 96, 1, 40]])
def test_batched_tokens_equal_plain_batched_generate(
    copying: TransformersCorrector, budgets: list[int], with_prefix: bool
) -> None:
    """Rows of different lengths (left-padded), the same or different budgets; with the
    template head's cache, the padding sits between head and row."""
    inputs = copying._inputs([copying._prepare(p) for p in PAIRS])
    assert len(set(inputs["attention_mask"].sum(1).tolist())) == len(PAIRS)
    model = copying.loaded.model
    prefix = copying._prefix if with_prefix else None
    rows, stats = _batched_copy(copying, model, inputs, budgets, prefix)
    assert rows == _batched_reference(copying, model, inputs, budgets)
    assert stats.forward_passes <= max(budgets)


def test_template_head_is_cached_once_and_skipped_when_a_row_lacks_it(
    copying: TransformersCorrector, monkeypatch
) -> None:
    prefix = copying._prefix
    assert prefix is not None and len(prefix.ids) >= MIN_PREFIX_TOKENS
    prepared = [copying._prepare(p) for p in PAIRS]
    assert all(p.ids[: len(prefix.ids)] == list(prefix.ids) for p in prepared)
    inputs = copying._inputs(prepared)
    mask = inputs["attention_mask"]
    ids, full, cache = prefix.split(inputs["input_ids"], mask, 0)
    assert (
        cache.get_seq_length() == len(prefix.ids)
        and full.shape[1] == len(prefix.ids) + ids.shape[1]
    )
    assert full.sum(1).tolist() == mask.sum(1).tolist()  # every token kept, head once
    monkeypatch.setattr(copy_decoding, "MAX_PREFIX_REST", ids.shape[1] - 1)
    assert prefix.split(inputs["input_ids"], mask, 0) is None  # too long: prefilled whole
    monkeypatch.undo()
    # A prompt that does not start with the head: the batch is prefilled whole, same tokens.
    odd = {k: v.clone() for k, v in inputs.items()}
    odd["input_ids"][0, -len(prepared[0].ids)] += 1
    assert prefix.split(odd["input_ids"], mask, 0) is None
    rows, _ = _batched_copy(copying, copying.loaded.model, odd, [7] * 4, prefix)
    assert rows == _batched_reference(copying, copying.loaded.model, odd, [7] * 4)
    # One unpadded row (no mask needed) through the corrector, which uses the head's cache.
    single = copying._inputs(prepared[1:2])
    assert copying._generate(single, [40]) == _batched_reference(
        copying, copying.loaded.model, single, [40]
    )


@pytest.mark.parametrize("with_prefix", [False, True], ids=["full-prefill", "template-head"])
@pytest.mark.parametrize("bias", [20.0, 40.0])
def test_batched_copy_heavy_rows_accept_different_amounts(
    copying: TransformersCorrector, tiny_lm_path, monkeypatch, bias: float, with_prefix: bool
) -> None:
    """Copy-nudged rows of different lengths: drafts are accepted unevenly across rows, so
    rejected positions stay masked in the cache and positions must skip them."""
    answers = [p.answer for p in PAIRS]
    prepared = [copying._prepare(p) for p in PAIRS]
    inputs = copying._inputs(prepared)
    tok = copying.loaded.tokenizer
    model = _nudged(tiny_lm_path, tok, answers, [p.ids for p in prepared], monkeypatch)
    _CopyNudged.bias = bias
    prefix = PromptPrefix.build(model, copying._prefix.ids) if with_prefix else None
    _CopyNudged.head = len(prefix.ids) if prefix else 0
    rows, stats = _batched_copy(copying, model, inputs, [80] * len(PAIRS), prefix)
    assert rows == _batched_reference(copying, model, inputs, [80] * len(PAIRS))
    assert stats.accepted >= 80 and stats.forward_passes < 60


def test_unpadded_rows_that_accept_unevenly_mask_what_they_rejected(
    copying: TransformersCorrector, tiny_lm_path, monkeypatch
) -> None:
    """Two prompts of one length (no padding): row 0 copies its answer, row 1 is nudged away
    from its own, so its drafts fail while row 0's pass and its rejected positions must be
    masked from then on."""
    pairs = [PAIRS[1], QAPair(PAIRS[1].question, COPY_HEAVY.replace("lazy", "hazy"))]
    prepared = [copying._prepare(p) for p in pairs]
    inputs = copying._inputs(prepared)
    assert bool(inputs["attention_mask"].all())
    tok = copying.loaded.tokenizer
    scripts = [COPY_HEAVY, PAIRS[3].answer]
    model = _nudged(tiny_lm_path, tok, scripts, [p.ids for p in prepared], monkeypatch)
    _CopyNudged.bias = 40.0
    rows, stats = _batched_copy(copying, model, inputs, [80, 80])
    assert rows == _batched_reference(copying, model, inputs, [80, 80])
    assert stats.accepted >= 40 and stats.accepted < stats.drafted


def test_draft_memory_proposes_the_latest_continuation_of_the_longest_match() -> None:
    memory = DraftMemory(size=2)
    memory.add([[1, 2, 3, 4, 0], [7], [5, 2, 3, 9, 8, 0]])  # [7] has nothing to continue from
    strong = MAX_MEMORY_MATCH
    assert memory.propose([2, 3], 4, {0}) == ([9, 8], 2, (1, 3))  # latest output with "2 3"
    assert memory.propose([1, 2], 4, {0}) == ([3, 4], strong, (0, 2))  # an output's start
    assert memory.propose([6], 4, set()) == ([], 0, (0, 0))
    # Following an output: the row's last token goes on with it where the last draft ended.
    assert memory.propose([6, 9], 2, set(), follow=(1, 3)) == ([8, 0], strong, (1, 4))
    memory.add([[6, 6, 1], [6, 2, 2], [8, 8, 3]])  # at 2 * size outputs, the latest `size` stay
    assert len(memory._state[0]) == 3
    assert memory.propose([4, 2, 3], 4, set()) == ([], 0, (0, 0))  # forgotten
    assert memory.propose([6, 2], 4, set())[:2] == ([2], strong)


def test_remembered_corrections_decode_in_fewer_passes_with_the_same_tokens(
    tiny_lm_path, monkeypatch
) -> None:
    """A repeat of an earlier correction drafts from the memory: far fewer forward passes, and
    still exactly the tokens of plain greedy ``generate`` (single and batched)."""
    settings = GenerationSettings(max_new_tokens_cap=48)
    corrector = TransformersCorrector(str(tiny_lm_path), generation=settings, batching=False)
    off = GenerationSettings(max_new_tokens_cap=48, draft_memory=0)
    assert TransformersCorrector(str(tiny_lm_path), generation=off, batching=False)._memory is None
    model = corrector.loaded.model
    passes = []
    forward = type(model).forward
    monkeypatch.setattr(
        type(model), "forward", lambda self, *a, **k: passes.append(1) or forward(self, *a, **k)
    )
    inputs = corrector._inputs([corrector._prepare(p) for p in PAIRS])
    first = corrector._generate(inputs, [48] * len(PAIRS))
    cold, passes[:] = len(passes), []
    again = corrector._generate(inputs, [48] * len(PAIRS))
    warm = len(passes)
    assert again == first == _batched_reference(corrector, model, inputs, [48] * len(PAIRS))
    assert warm * 3 <= cold
    corrector.forget()  # emptied: decoded as the first time
    passes[:] = []
    assert corrector._generate(inputs, [48] * len(PAIRS)) == first and len(passes) == cold
    corrector.forget()
    corrector.remember([corrector.loaded.tokenizer.decode(row) for row in first])
    passes[:] = []
    assert corrector._generate(inputs, [48] * len(PAIRS)) == first and len(passes) < cold
    with pytest.raises(InputError, match="strings"):
        corrector.remember(["fine", b"bytes"])  # type: ignore[list-item]
    single = corrector._inputs([corrector._prepare(PAIRS[0])])
    assert corrector._generate(single, [48]) == _batched_reference(corrector, model, single, [48])
